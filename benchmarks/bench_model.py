"""Model speed and memory: SparseFM side by side with river's FMClassifier, in one run.

For each stream (synthetic: 16 Zipf categorical fields + 1 numeric; MovieLens 100K):

- predict_proba_one + learn_one, both models on the same first samples (river is slow);
- learn_batch from feature dicts (encoding included), on the same samples;
- encoding alone and the compiled update alone, over the whole stream (steady state);
- bytes per stored feature at k = 8 and the resident memory of a model with 10^6 features: what
  deleting the model gives back to the OS (what it holds), the RSS growth while it learned (which
  also counts what the allocators kept), and the model's own account (``memory_bytes``).

    python benchmarks/bench_model.py [--river-samples 10000]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
from river import facto

sys.path.insert(0, str(Path(__file__).parent))
import datasets
from common import machine, one_hot, print_table

from stream_fm import SparseFM
from stream_fm.model import updates

BATCH = 4096


def rate(n: int, seconds: float) -> float:
    return n / seconds


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_by_one(model, stream) -> None:
    for x, y in stream:
        model.predict_proba_one(x)
        model.learn_one(x, y)


def batches(model: SparseFM, xs, ys) -> None:
    for i in range(0, len(xs), BATCH):
        model.learn_batch(xs[i : i + BATCH], ys[i : i + BATCH])


def warm_up() -> None:
    """Compile the kernels (numba caches them on disk) so that no timing includes compilation."""
    m = SparseFM()
    m.learn_batch([{"a": "b", "n": 1.0}], [True])
    m.predict_proba_one({"a": "b"})
    m.learn_one({"a": "c", "l": ["x", "y"]}, False)


def speed(stream_name: str, stream: datasets.Stream, river_n: int) -> list[tuple[str, str, str]]:
    head = stream[:river_n]
    xs, ys = [x for x, _ in stream], [y for _, y in stream]
    hx, hy = xs[:river_n], ys[:river_n]
    nnz = np.mean([len(SparseFM()._encode([x])[0]) for x in hx[:1000]])
    print(f"\n{stream_name}: {len(stream):,} samples, {nnz:.1f} non-zero features per sample, k = 8")

    # river's FM cannot take lists (multi-hot): it gets samples encoded beforehand, untimed
    river_head = [(one_hot(x), y) for x, y in head]
    t_river = timed(lambda: one_by_one(facto.FMClassifier(n_factors=8, seed=0), river_head))
    t_one = timed(lambda: one_by_one(SparseFM(n_factors=8), head))
    t_batch = timed(lambda: batches(SparseFM(n_factors=8), hx, hy))
    r_river = rate(river_n, t_river)
    rows = [
        (f"river FMClassifier predict_proba_one + learn_one (first {river_n:,})", f"{r_river:,.0f}", "1x"),
        (
            f"SparseFM predict_proba_one + learn_one (first {river_n:,})",
            f"{rate(river_n, t_one):,.0f}",
            f"{t_river / t_one:,.0f}x",
        ),
        (
            f"SparseFM learn_batch from dicts (first {river_n:,})",
            f"{rate(river_n, t_batch):,.0f}",
            f"{t_river / t_batch:,.0f}x",
        ),
    ]

    # the whole stream, steady state: learn once, then time each stage on a second pass
    model = SparseFM(n_factors=8)
    t_full = timed(lambda: batches(model, xs, ys))
    encoded: list = []
    t_enc = timed(lambda: encoded.extend(model._encode(xs[i : i + BATCH]) for i in range(0, len(xs), BATCH)))
    arrays = [
        (
            np.array(r, np.int64),
            np.array(v),
            np.array(o, np.int64),
            np.array(ys[i * BATCH : (i + 1) * BATCH], float),
        )
        for i, (r, v, o, _) in enumerate(encoded)
    ]

    def update_only() -> None:
        for rws, vals, offs, labels in arrays:
            out = np.empty(len(offs) - 1)
            updates.learn(
                rws, vals, offs, labels, model.samples_seen, model._opt, model._hp, model._bias, model._w,
                model._V, model._gw, model._gV, model._last, out, model._counts,
            )  # fmt: skip

    t_upd = timed(update_only)
    rows += [
        ("SparseFM learn_batch from dicts, whole stream (first pass)", f"{rate(len(xs), t_full):,.0f}", "-"),
        ("  of which: feature encoding alone (dicts -> rows)", f"{rate(len(xs), t_enc):,.0f}", "-"),
        ("  of which: compiled update alone (encoded samples)", f"{rate(len(xs), t_upd):,.0f}", "-"),
    ]
    print_table(["measure", "samples/s", "vs river"], rows)
    return rows


def rss_bytes() -> int:
    """Resident bytes, after handing memory freed by Python back to the OS (glibc keeps freed
    heap chunks: what a run of batches left behind is not what the model holds)."""
    gc.collect()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(n_features: int = 1_000_000) -> list[tuple[str, str, str]]:
    rows = []
    for optimizer in ("normalized", "adagrad", "sgd"):
        gc.collect()
        before = rss_bytes()
        model = SparseFM(n_factors=8, optimizer=optimizer)
        per_sample = 16
        for start in range(0, n_features, per_sample * BATCH):
            stop = min(start + per_sample * BATCH, n_features)
            xs = [{f"f{j}": f"id{i + j}" for j in range(per_sample)} for i in range(start, stop, per_sample)]
            model.learn_batch(xs, [i % 5 == 0 for i in range(len(xs))])
            del xs
        with_model = rss_bytes()
        n, accounted = model.n_features, model.memory_bytes
        del model
        held = with_model - rss_bytes()  # what deleting the model gives back: what it holds
        rows.append(
            (
                f"{optimizer}: {n:,} features",
                f"{held / n:,.0f} B/feature ({held / 2**20:,.0f} MiB)",
                f"{(with_model - before) / n:,.0f} B/feature",
                f"{accounted / n:,.1f} B/feature",
            )
        )
    print(f"\nmemory, k = 8, keys like 'f3=id12345' ({n_features:,} features)")
    header = ["model", "resident, held by the model", "RSS growth while learning", "model.memory_bytes"]
    print_table(header, rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--river-samples", type=int, default=10_000)
    parser.add_argument("--synthetic-n", type=int, default=200_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    warm_up()
    speed(
        f"synthetic ({args.synthetic_n:,} samples)", datasets.synthetic(args.synthetic_n), args.river_samples
    )
    speed("MovieLens 100K", datasets.movielens100k(), args.river_samples)
    memory()


if __name__ == "__main__":
    main()
