"""Merge rules for cluster mode (issue 13), simulated: how much log loss does learning in rounds on
P partitions, merging the partitions' deltas, cost against one sequential learner?

No Kafka and no processes, but the package's own rounds (``stream_fm/cluster/rounds.py``): samples
go round-robin to P partitions; round r of a partition is its next ``round_records`` samples. Every
partition learns its round on the *base* (the model with every earlier round folded in) with
``learn_round``, which reports each sample's probability before learning it (progressive
validation, as the single learner does) and undoes the round; then ``fold_round`` folds the
round's deltas into the base. A row one partition trained takes that partition's values; a row
several trained merges their changes of w and V by one rule (``rounds.RULES``):

- ``mean``: the changes averaged over the m partitions that trained the row;
- ``sqrt``: the changes added, divided by sqrt(m) (between one residual corrected m times and m
  independent pieces);
- ``sum``: every change added (each took its step from the same base: over-steps);
- ``adagrad``: each change weighed by its partition's share of the round's growth of the
  coordinate's sum of g^2 (VW's ``accumulate`` with AdaGrad weighting; Agarwal et al., JMLR 2014).

Accumulators and sums of x merge by adding every partition's growth, N by max, whatever the rule;
the dense state (w0, the calibration, the averages) takes the partitions' mean, its sums added.
(An earlier version of this simulation, with its own arithmetic, also tried rescaling each step
to the size AdaGrad would have given it after every partition's gradients: it diverged.)

    python benchmarks/sim_merge.py [--partitions 6] [--rounds 100 500 2000] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import suite
from bench_quality import log_loss
from common import machine, print_table

from stream_fm import SparseFM
from stream_fm.cluster.rounds import RULES, fold_round, learn_round

STREAMS = {  # the three kinds the issue names
    "sparse ids (planted FM, 200k)": "planted FM, enough (200k)",
    "dense table (census-like, 48.8k)": "census-like table (48.8k)",
    "rare positives (100k, CTR 0.5%)": "rare positives (100k, CTR 0.5%)",
}


def cluster(stream: list, partitions: int, round_records: int, rule: str) -> np.ndarray:
    """Progressive predictions of the simulated cluster, in stream order."""
    parts = [list(range(p, len(stream), partitions)) for p in range(partitions)]
    out = np.empty(len(stream))
    base = SparseFM()
    for r, start in enumerate(range(0, max(map(len, parts)), round_records)):
        deltas = []
        for p in range(partitions):
            idx = parts[p][start : start + round_records]
            if idx:
                xs, ys = [stream[i][0] for i in idx], [stream[i][1] for i in idx]
                delta, out[idx] = learn_round(base, xs, ys, partition=p, round_=r)
                deltas.append(delta)
        fold_round(base, deltas, rule)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rounds", type=int, nargs="*", default=[100, 500, 2000], help="round_records")
    parser.add_argument("--only", nargs="*", help="streams whose name starts with one of these")
    args = parser.parse_args()
    print(f"machine: {machine()}\npartitions: {args.partitions}\n")
    rows = []
    for title, name in STREAMS.items():
        if args.only and not any(title.startswith(o) for o in args.only):
            continue
        stream = suite.SUITE[name][1]()
        y = np.array([label for _, label in stream], np.float64)
        single = log_loss(SparseFM().learn_batch([x for x, _ in stream], list(y)), y)
        for rule in RULES:
            cells = []
            for r in args.rounds:
                t = time.perf_counter()
                ll = log_loss(cluster(stream, args.partitions, r, rule), y)
                cells.append(f"{ll:.4f} ({100 * (ll / single - 1):+.2f}%)")
                print(
                    f"  {title} {rule} round {r}: {cells[-1]} in {time.perf_counter() - t:.0f}s", flush=True
                )
            rows.append((title, f"{single:.4f}", rule, *cells))
    print()
    print_table(
        ["stream", "single learner", "merge rule", *(f"{r} records a round" for r in args.rounds)], rows
    )


if __name__ == "__main__":
    main()
