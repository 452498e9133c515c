"""Merge rules for cluster mode (issue 13), simulated: how much log loss does learning in rounds on
P partitions, merging the partitions' deltas, cost against one sequential learner?

No Kafka and no processes: the arithmetic of the design alone. Samples go round-robin to P
partitions; round r of a partition is its next ``round_records`` samples. Every partition learns
its round on a copy of the *base* (the model with every earlier round merged), reporting each
sample's probability before learning it (progressive validation, as the single learner does);
then each partition's delta — for every row it touched, by key, the change of w, V and their
accumulators, and the row's scale N — is merged into the base by one rule:

- ``sum``: every partition's change added (each took its step from the same base: over-steps a
  row that several partitions touched);
- ``mean``: the changes of a row averaged over the partitions that touched it;
- ``sqrt``: the changes of a row added, divided by the square root of the number of partitions
  that touched it (between the two: one residual corrected m times, or m independent pieces);
- ``adagrad``: each partition's change of a coordinate weighted by its share of that coordinate's
  accumulator growth in the round (VW's ``accumulate`` with AdaGrad weighting; Agarwal et al.,
  JMLR 2014);
- ``rescaled``: every partition's change added, each scaled by sqrt(acc0 + A + a_p) /
  sqrt(acc0 + A + sum_q a_q), A the coordinate's accumulator in the base and a_p its growth in
  partition p: each step shrunk to the size AdaGrad would have given it after every partition's
  gradients, as a sequential learner would have. A row one partition touched gets its change as
  it is; a coordinate every partition touched early (the bias, a small field) gets about
  sqrt(P) times one partition's change, late about P times; the calibration is fused by its
  curvature (theta = theta_base + H^-1 sum_p H_p (theta_p - theta_base)).

Accumulators and the samples' norms merge by addition, N by max, whatever the rule; but for
``rescaled``, the dense state (w0 and the calibration) takes the mean of the partitions' values.

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
from stream_fm._kernels import B_ACC, B_GAIN0, B_NORMS, B_P, B_W0, CAL_SIZE
from stream_fm.keyindex import decode_keys, encode_keys
from stream_fm.updates import COL_SCALE, COL_SUM

RULES = ("sum", "mean", "sqrt", "adagrad", "rescaled")
STREAMS = {  # the three kinds the issue names
    "sparse ids (planted FM, 200k)": "planted FM, enough (200k)",
    "dense table (census-like, 48.8k)": "census-like table (48.8k)",
    "rare positives (100k, CTR 0.5%)": "rare positives (100k, CTR 0.5%)",
}


class Base:
    """The merged model as plain arrays, rows addressed by key."""

    def __init__(self, model: SparseFM) -> None:
        arrays, self.meta = model.export_state()
        self.a = {name: np.array(arrays[name]) for name in ("bias", "w", "V", "gw", "gV", "last")}
        self.keys = decode_keys(arrays["key_bytes"], arrays["key_offsets"])
        self.row = {key: r for r, key in enumerate(self.keys)}

    def model(self) -> SparseFM:
        key_bytes, key_offsets = encode_keys(self.keys)
        n = len(self.keys)
        meta = {**self.meta, "n_rows": n, "n_features": n, "n_trained_rows": n}
        arrays = {**self.a, "free": np.zeros(0, np.int64), "key_bytes": key_bytes, "key_offsets": key_offsets}
        return SparseFM.from_state(arrays, meta)


def delta(base: Base, learner: SparseFM, start: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """The rows ``learner`` touched since sample ``start``, by key, with their values before
    (the base's, or a fresh row's) and after."""
    arrays, _ = learner.export_state()
    touched = np.flatnonzero(arrays["last"] >= start)
    offsets = arrays["key_offsets"]
    keys = [
        bytes(arrays["key_bytes"][offsets[r] : offsets[r + 1]]).decode("utf-8", "surrogatepass")
        for r in touched
    ]
    after = {name: np.asarray(arrays[name])[touched] for name in ("w", "V", "gw", "gV", "last")}
    k = learner.n_factors
    before = {name: np.zeros_like(a) for name, a in after.items()}
    for i, key in enumerate(keys):
        r = base.row.get(key)
        if r is None:  # a fresh row: its vector is drawn from (seed, key), as every member would
            before["V"][i] = learner.initial_latent(key)
        else:
            for name in ("w", "V", "gw", "gV"):
                before[name][i] = base.a[name][r]
    # the row's scale N in base and learner: parameters learned at a smaller scale are shrunk by
    # (N_old / N_new)^2 when it grows (the normalized update), so changes are measured at one scale
    out = {f"d{name}": after[name] - before[name] for name in ("gw", "gV")}
    out["w"], out["V"], out["w_base"], out["V_base"] = after["w"], after["V"], before["w"], before["V"]
    out["N_base"] = before["gV"][:, k].copy()
    out["N"] = after["gV"][:, k]
    out["last"] = after["last"]
    out["bias"] = np.asarray(arrays["bias"])
    return keys, out


def merge(base: Base, deltas: list[tuple[list[str], dict[str, np.ndarray]]], rule: str, k: int) -> None:
    """Fold the round's deltas into ``base`` (partition order), vectorised over the touched rows."""
    keys = [key for ks, _ in deltas for key in ks]
    names = ("w", "V", "w_base", "V_base", "N_base", "dgw", "dgV", "N", "last")
    cat = {name: np.concatenate([d[name] for _, d in deltas]) for name in names}
    a = base.a
    new = list(dict.fromkeys(key for key in keys if key not in base.row))
    if new:
        start = len(base.keys)
        base.keys.extend(new)
        base.row.update((key, start + j) for j, key in enumerate(new))
        fresh = np.stack([SparseFM(**base.meta["config"]).initial_latent(key) for key in new])
        a["w"] = np.concatenate([a["w"], np.zeros(len(new))])
        a["V"] = np.concatenate([a["V"], fresh])
        a["gw"] = np.concatenate([a["gw"], np.zeros(len(new))])
        a["gV"] = np.concatenate([a["gV"], np.zeros((len(new), a["gV"].shape[1]))])
        a["last"] = np.concatenate([a["last"], np.full(len(new), -1, np.int64)])
    rows = np.array([base.row[key] for key in keys], np.int64)
    n = len(base.keys)
    # every value at the merged scale N* (the largest any partition saw): shrunk by (N / N*)^2
    merged_n = a["gV"][:, k].copy()
    np.maximum.at(merged_n, rows, cat["N"])
    n_star = np.where(merged_n[rows] > 0, merged_n[rows], 1.0)
    f_after = np.where(cat["N"] > 0, (cat["N"] / n_star) ** 2, 1.0)
    f_base = np.where(cat["N_base"] > 0, (cat["N_base"] / n_star) ** 2, 1.0)
    cat["dw"] = cat["w"] * f_after - cat["w_base"] * f_base
    cat["dV"] = cat["V"] * f_after[:, None] - cat["V_base"] * f_base[:, None]
    touched = np.unique(rows)
    old_n, new_n = a["gV"][touched, k], merged_n[touched]
    shrink = np.where(old_n > 0, (old_n / np.where(new_n > 0, new_n, 1.0)) ** 2, 1.0)
    a["w"][touched] *= shrink
    a["V"][touched] *= shrink[:, None]
    if rule == "sum":
        weight_w = np.ones(len(rows))
        weight_v = np.ones((len(rows), k))
    elif rule in ("mean", "sqrt"):
        count = np.bincount(rows, minlength=n).astype(float)
        weight_w = 1.0 / (count[rows] if rule == "mean" else np.sqrt(count[rows]))
        weight_v = np.repeat(weight_w[:, None], k, axis=1)
    elif rule == "rescaled":
        acc0 = base.meta["config"]["initial_accumulator"]
        tot_w = np.bincount(rows, cat["dgw"], minlength=n)
        before = a["gw"][rows] + acc0
        weight_w = np.sqrt((before + cat["dgw"]) / (before + tot_w[rows]))
        g = cat["dgV"][:, :k]
        tot_v = np.zeros((n, k))
        np.add.at(tot_v, rows, g)
        before_v = a["gV"][rows, :k] + acc0
        weight_v = np.sqrt((before_v + g) / (before_v + tot_v[rows]))
    else:  # adagrad: each partition's share of the coordinate's accumulator growth in the round
        count = np.bincount(rows, minlength=n).astype(float)
        tot_w = np.bincount(rows, cat["dgw"], minlength=n)
        weight_w = np.where(
            tot_w[rows] > 0, cat["dgw"] / np.where(tot_w[rows] > 0, tot_w[rows], 1), 1 / count[rows]
        )
        g = cat["dgV"][:, :k]
        tot_v = np.zeros((n, k))
        np.add.at(tot_v, rows, g)
        t = tot_v[rows]
        weight_v = np.where(t > 0, g / np.where(t > 0, t, 1), (1 / count[rows])[:, None])
    np.add.at(a["w"], rows, weight_w * cat["dw"])
    np.add.at(a["V"], rows, weight_v * cat["dV"])
    np.add.at(a["gw"], rows, cat["dgw"])
    np.add.at(a["gV"][:, :k], rows, cat["dgV"][:, :k])
    a["gV"][:, k + COL_SCALE] = merged_n
    np.add.at(a["gV"][:, k + COL_SUM], rows, cat["dgV"][:, k + COL_SUM])  # centring's sum of x adds
    np.maximum.at(a["last"], rows, cat["last"])
    biases = np.array([d["bias"] for _, d in deltas])
    old = a["bias"].copy()
    a["bias"] = biases.mean(axis=0)  # w0 and the calibration: the partitions' mean
    a["bias"][B_ACC] = old[B_ACC] + (biases[:, B_ACC] - old[B_ACC]).sum()
    a["bias"][B_NORMS] = old[B_NORMS] + (biases[:, B_NORMS] - old[B_NORMS]).sum()
    if rule == "sum":
        a["bias"][B_W0] = old[B_W0] + (biases[:, B_W0] - old[B_W0]).sum()
    elif rule == "rescaled":
        acc0 = base.meta["config"]["initial_accumulator"]
        grown = biases[:, B_ACC] - old[B_ACC]
        scale = np.sqrt((old[B_ACC] + acc0 + grown) / (old[B_ACC] + acc0 + grown.sum()))
        a["bias"][B_W0] = old[B_W0] + scale @ (biases[:, B_W0] - old[B_W0])
        a["bias"][B_GAIN0:] = _fused(old, biases)


def _fused(old: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """The calibration after the round (its numbers, then its inverse curvature): the partitions'
    moves fused by their curvatures (each H_p = the base's curvature plus what partition p added)."""
    iu = np.triu_indices(CAL_SIZE)

    def curvature(b: np.ndarray) -> np.ndarray:
        p = np.zeros((CAL_SIZE, CAL_SIZE))
        p[iu] = b[B_P:]
        return np.linalg.inv(p + np.triu(p, 1).T)

    theta0, h0 = old[B_GAIN0:B_P], curvature(old)
    hs = [curvature(b) for b in biases]
    h_new = h0 + sum(h - h0 for h in hs)
    rhs = sum(h @ (b[B_GAIN0:B_P] - theta0) for h, b in zip(hs, biases, strict=True))
    return np.concatenate([theta0 + np.linalg.solve(h_new, rhs), np.linalg.inv(h_new)[iu]])


def cluster(stream: list, partitions: int, round_records: int, rule: str) -> np.ndarray:
    """Progressive predictions of the simulated cluster, in stream order."""
    parts = [list(range(p, len(stream), partitions)) for p in range(partitions)]
    out = np.empty(len(stream))
    base = Base(SparseFM())
    k = base.meta["config"]["n_factors"]
    for start in range(0, max(map(len, parts)), round_records):
        seen = base.meta["samples_seen"]
        deltas, samples = [], 0
        for p in range(partitions):
            idx = parts[p][start : start + round_records]
            if not idx:
                continue
            learner = base.model()
            out[idx] = learner.learn_batch([stream[i][0] for i in idx], [stream[i][1] for i in idx])
            deltas.append(delta(base, learner, seen))
            samples += len(idx)
        merge(base, deltas, rule, k)
        base.meta = {**base.meta, "samples_seen": seen + samples}
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
