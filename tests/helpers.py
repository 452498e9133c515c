"""Helpers shared by the test modules: sample streams and model comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stream_fm import SparseFM

REPO = Path(__file__).resolve().parents[1]
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka-local.sh"


def categorical_stream(n: int, seed: int) -> list[tuple[dict, bool]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = {
            "user": f"u{rng.integers(50)}",
            "ad": f"a{rng.integers(30)}",
            "price": float(rng.exponential(2.0)),
            "mobile": bool(rng.random() < 0.5),
            "tags": [f"t{t}" for t in rng.choice(10, size=rng.integers(0, 3), replace=False)],
        }
        out.append((x, bool(rng.random() < 0.3)))
    return out


def learn_stream(model: SparseFM, stream: list[tuple[dict, bool]]) -> np.ndarray:
    """Learn ``stream`` in one ``learn_batch``; each sample's probability before its update."""
    return model.learn_batch([x for x, _ in stream], [y for _, y in stream])


def log_loss(p: np.ndarray, stream: list[tuple[dict, bool]]) -> float:
    """The mean log loss of probabilities ``p`` on ``stream``'s labels."""
    y = np.array([label for _, label in stream], float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def assert_batch_equals_loop(
    make: Callable[[], SparseFM], stream: list[tuple[dict, bool]], chunk: int
) -> None:
    """``learn_batch`` over chunks of ``stream`` reports and leaves exactly what a loop of
    ``predict_proba_one`` + ``learn_one`` does, bit for bit."""
    loop = make()
    expected = []
    for x, y in stream:
        expected.append(loop.predict_proba_one(x)[True])
        loop.learn_one(x, y)
    batch = make()
    parts = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    got = np.concatenate([batch.learn_batch([x for x, _ in p], [y for _, y in p]) for p in parts])
    assert np.array_equal(got, np.array(expected))
    assert state_equal(loop, batch)


def state_equal(a: SparseFM, b: SparseFM) -> bool:
    sa, ma = a.export_state()
    sb, mb = b.export_state()
    return ma == mb and sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def stream_fm_process(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """`stream-fm ARGS` as a child process, its output appended to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_fm", *args], stdout=out, stderr=out, env=env, cwd=cwd
        )
