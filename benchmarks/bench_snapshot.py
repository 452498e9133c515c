"""Snapshot costs for a model of 10^6 features at k = 8 (AdaGrad), and serving throughput.

- how long ingestion is paused by a snapshot (the in-memory copy on the learner's thread), for the
  first snapshot and for later ones (which copy into memory the writer already holds);
- the total write time (background thread) and the bytes on disk;
- the load time in a fresh process: ``serving.load`` (verify + index) and ``snapshot.restore``
  (a model ready to learn);
- ``Predictor.predict_batch`` throughput next to the live model's ``predict_proba_batch``.

    python benchmarks/bench_snapshot.py [--features 1000000] [--root /tmp/stream-fm-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import datasets
from common import machine, print_table

from stream_fm import SparseFM
from stream_fm.serve import serving
from stream_fm.snapshots import snapshot
from stream_fm.snapshots.snapshot_writer import SnapshotWriter

LOAD = """
import json, sys, time
t = time.perf_counter()
from stream_fm.serve import serving
from stream_fm.snapshots import snapshot
t_import = time.perf_counter() - t
t = time.perf_counter(); p = serving.load(sys.argv[1]); t_load = time.perf_counter() - t
t = time.perf_counter(); m, _ = snapshot.restore(p.path); t_restore = time.perf_counter() - t
print(json.dumps({"import": t_import, "load": t_load, "restore": t_restore}))
"""


def big_model(n_features: int) -> SparseFM:
    model = SparseFM(n_factors=8)
    per_sample = 16
    for start in range(0, n_features, per_sample * 4096):
        stop = min(start + per_sample * 4096, n_features)
        xs = [{f"f{j}": f"id{i + j}" for j in range(per_sample)} for i in range(start, stop, per_sample)]
        model.learn_batch(xs, [i % 5 == 0 for i in range(len(xs))])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=None, help="snapshot root (default: a temp dir)")
    parser.add_argument("--writes", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    root = args.root or Path(tempfile.mkdtemp(prefix="stream-fm-bench-"))
    shutil.rmtree(root, ignore_errors=True)
    model = big_model(args.features)
    print(f"model: {model.n_features:,} features, k = 8, adagrad; snapshot root {root}")

    rows = []

    def row(label: str, writer: SnapshotWriter) -> None:
        rows.append(
            (
                label,
                f"{1e3 * writer.last_pause_seconds:,.1f} ms",
                f"{writer.last_write_seconds:,.2f} s",
                f"{writer.last_bytes / 1e6:,.1f} MB",
            )
        )

    cold = SnapshotWriter(root, every_seconds=None, keep=2)
    cold.write_now(model)
    row("first snapshot, copy buffers not yet reserved", cold)
    # the worker's case: between triggers, maybe_write reserves the buffers on the writer's thread
    writer = SnapshotWriter(root, every_seconds=3600, keep=2)
    writer.maybe_write(model)
    writer.wait()
    for i in range(args.writes):
        writer.write_now(model)
        row(f"snapshot {i + 1}, buffers reserved in the background", writer)
    print_table(["write", "ingestion paused", "write (background)", "on disk"], rows)

    loads = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", LOAD, str(root)], check=True, capture_output=True, text=True
            ).stdout
        )
        for _ in range(3)
    ]
    best = {k: min(d[k] for d in loads) for k in loads[0]}
    print_table(
        ["fresh process (best of 3)", "seconds"],
        [
            ("import stream_fm", f"{best['import']:.2f}"),
            ("serving.load (verify checksums, build key index)", f"{best['load']:.2f}"),
            ("snapshot.restore (verify, a model ready to learn)", f"{best['restore']:.2f}"),
        ],
    )

    stream = datasets.synthetic(200_000)
    small = SparseFM(n_factors=8)
    xs, ys = [x for x, _ in stream], [y for _, y in stream]
    small.learn_batch(xs, ys)
    snapshot.write(root / "synthetic", small)
    predictor = serving.load(root / "synthetic")
    rates = []
    for name, fn in (
        ("SparseFM.predict_proba_batch", small.predict_proba_batch),
        ("Predictor.predict_batch", predictor.predict_batch),
    ):
        t = time.perf_counter()
        for i in range(0, len(xs), 4096):
            fn(xs[i : i + 4096])
        rates.append((name, f"{len(xs) / (time.perf_counter() - t):,.0f}"))
    # one at a time, twice over the same samples: the first pass fills the key cache
    for name in ("first pass", "second pass"):
        t = time.perf_counter()
        for x in xs[:50_000]:
            predictor.predict(x)
        rate = 50_000 / (time.perf_counter() - t)
        rates.append((f"Predictor.predict (one at a time, {name})", f"{rate:,.0f}"))
    print("\nserving throughput, synthetic stream (17 features a sample), batches of 4096")
    print_table(["predictor", "samples/s"], rates)
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
