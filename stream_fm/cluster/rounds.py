"""Rounds (cluster mode): one partition's round learned on the base model and taken out as a
:class:`~stream_fm.cluster.delta.Delta`, and a round's deltas folded back into the base.

A member learns round r of partition p on the *base*, the model with every earlier round folded
in, and publishes what the round changed. :func:`learn_round` does that in place and undoes it:
it saves the rows the round's samples touch and the dense state, learns, takes the values of the
rows it trained, and puts the saved values back. The base is then as it was, but for the rows the
round gave to new keys, which stay untouched (``last`` -1: invisible to prediction).

:func:`fold_round` applies one round's deltas, in partition order whatever order they came in:

- a row that one partition trained takes that partition's values as they are, so that one
  partition reproduces the single learner bit for bit (tested);
- a row that several trained (and the dense state, when several partitions learned) takes the
  mean of their values for its parameters, the base plus every partition's growth for its sums
  (AdaGrad's accumulators, the sum of x, the samples' norms), the largest scale N and the latest
  ``last``. The mean is stable but slow for rows in most samples (``benchmarks/sim_merge.py``):
  the rule for shared rows is the open question of issue 13, and this one is provisional.

Settings whose result depends on the order in which keys arrive (``max_features`` eviction,
``min_count`` admission) and hashing (no keys to exchange) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stream_fm import checks
from stream_fm._kernels import B_ACC, B_NORMS
from stream_fm.cluster.delta import Delta
from stream_fm.errors import ConfigError
from stream_fm.fastpath import C_SKIPPED, C_TRAINED
from stream_fm.keyindex import decode_keys
from stream_fm.model import SparseFM
from stream_fm.updates import COL_SCALE

__all__ = ["ROW_ARRAYS", "RULES", "check_model", "fold_round", "learn_round"]

ROW_ARRAYS = ("w", "V", "gw", "gV", "last")
# how a row several partitions trained in a round merges their changes of w and V: their mean
# (the default), their sum over sqrt(m) or their sum (m partitions), or each weighed by its share
# of the round's growth of sum g^2 (VW's accumulate with AdaGrad weighting)
RULES = ("mean", "sqrt", "sum", "adagrad")
_DENSE_SUMS = [B_ACC, B_NORMS]  # per-sample sums in the dense state: the partitions' growths add


def check_model(model: SparseFM) -> None:
    """Refuse the settings a round cannot reproduce on every member."""
    refused = {
        "max_features": (model.max_features is not None, "None: eviction depends on arrival order"),
        "min_count": (model.min_count > 1, "1: admission depends on arrival order"),
        "hash_bits": (model.hash_bits is not None, "None: members exchange rows by key"),
    }
    for name, (bad, allowed) in refused.items():
        if bad:
            raise ConfigError(name, getattr(model, name), f"{allowed} (cluster mode)")


def _held(model: SparseFM) -> tuple[str, ...]:
    """The per-row arrays ``model`` keeps (``"sgd"`` keeps no accumulators)."""
    return tuple(name for name in ROW_ARRAYS if getattr(model, f"_{name}").shape[0])


def learn_round(
    model: SparseFM, xs: Sequence[Mapping[str, Any]], ys: Sequence[Any], partition: int, round_: int
) -> tuple[Delta, np.ndarray]:
    """Learn one round on ``model`` (the base) and undo it: the round's delta, and each sample's
    probability before it was learned (as ``learn_batch`` reports it)."""
    check_model(model)
    labels = checks.labels(ys, len(xs))
    sample_rows, vals, offsets, misses = model._encode(xs, learning=True)
    sample_rows = np.array(sample_rows, np.int64)
    if misses:  # rows to reuse (free ones): give them out before anything is learned
        model._insert_missing(sample_rows, offsets, misses, lambda stop: None)
    encoded = (sample_rows, vals, offsets, [])  # every key has its row now, untouched if new
    rows = np.unique(sample_rows)
    held = _held(model)
    saved = {name: getattr(model, f"_{name}")[rows].copy() for name in held}
    bias, counts = model._bias.copy(), model._counts.copy()
    start = model.samples_seen
    reports = model._learn_encoded(encoded, labels)
    trained = rows[model._last[rows] >= start]
    key_bytes, key_offsets = model._index.key_bytes(trained)
    arrays = {name: getattr(model, f"_{name}")[trained].copy() for name in held}
    arrays.update(key_bytes=key_bytes, key_offsets=key_offsets, bias=model._bias.copy())
    meta = {
        "samples": len(xs),
        "skipped": int(model._counts[C_SKIPPED] - counts[C_SKIPPED]),
        "newly_trained": int(model._counts[C_TRAINED] - counts[C_TRAINED]),
    }
    for name in held:
        getattr(model, f"_{name}")[rows] = saved[name]
    model._bias[:] = bias
    model._counts[[C_SKIPPED, C_TRAINED]] = counts[[C_SKIPPED, C_TRAINED]]
    model.samples_seen = start
    return Delta(partition, round_, arrays, meta), reports


def fold_round(model: SparseFM, deltas: Sequence[Delta], rule: str = "mean") -> None:
    """Fold one round's deltas (one per partition that learned) into ``model``, the base; rows
    several partitions trained are merged by ``rule`` (one of ``RULES``)."""
    check_model(model)
    if rule not in RULES:
        raise ConfigError("rule", rule, f"one of {RULES}")
    deltas = sorted(deltas, key=lambda d: d.partition)
    if len({d.round for d in deltas}) > 1 or len({d.partition for d in deltas}) < len(deltas):
        raise ValueError("fold_round takes one delta per partition, all of one round")
    base_bias = model._bias.copy()
    per_delta = [_rows_for(model, d) for d in deltas]
    touched, count = np.unique(np.concatenate([np.empty(0, np.int64), *per_delta]), return_counts=True)
    shared, m = touched[count > 1], count[count > 1]
    at = {int(r): i for i, r in enumerate(shared)}
    held = _held(model)
    base = {name: getattr(model, f"_{name}")[shared].copy() for name in held}
    sums = {name: np.zeros_like(base[name]) for name in held if name != "last"}
    weighted = {name: np.zeros_like(base[name]) for name in ("w", "V")}  # rule "adagrad"
    most = {name: base[name].copy() for name in ("last", "gV") if name in base}  # latest, largest
    for delta, where in zip(deltas, per_delta, strict=True):
        alone = np.isin(where, shared, invert=True)
        for name in held:  # rows only this partition trained: its values as they are
            getattr(model, f"_{name}")[where[alone]] = delta.arrays[name][alone]
        idx = np.array([at[int(r)] for r in where[~alone]], np.int64)
        after = {name: delta.arrays[name][~alone] for name in held}
        for name in sums:
            np.add.at(sums[name], idx, after[name])
        for name in most:
            np.maximum.at(most[name], idx, after[name])
        if rule == "adagrad" and "gw" in held:  # each change weighed by its growth of sum g^2
            k = model.n_factors
            np.add.at(weighted["w"], idx, (after["gw"] - base["gw"][idx]) * (after["w"] - base["w"][idx]))
            growth = after["gV"][:, :k] - base["gV"][idx, :k]
            np.add.at(weighted["V"], idx, growth * (after["V"] - base["V"][idx]))
    if len(shared):
        _merge_shared(model, shared, m, base, sums, most, weighted, rule)
    _merge_dense(model, base_bias, [d.arrays["bias"] for d in deltas])
    model.samples_seen += sum(d.meta["samples"] for d in deltas)
    model._counts[C_SKIPPED] += sum(d.meta["skipped"] for d in deltas)
    model._counts[C_TRAINED] += sum(d.meta["newly_trained"] for d in deltas)


def _rows_for(model: SparseFM, delta: Delta) -> np.ndarray:
    """The model's rows for the delta's keys, giving rows (from the seed and the key, as every
    member does) to the keys it does not hold."""
    keys = decode_keys(delta.arrays["key_bytes"], delta.arrays["key_offsets"])
    rows, missing = model._index.lookup(keys)
    if missing:  # unbounded (check_model): every key is admitted, nothing to train first
        model._insert_missing(rows, [0, len(rows)], [(i, keys[i]) for i in missing], lambda stop: None)
    return rows


def _merge_shared(
    model: SparseFM,
    shared: np.ndarray,
    m: np.ndarray,
    base: dict[str, np.ndarray],
    sums: dict[str, np.ndarray],
    most: dict[str, np.ndarray],
    weighted: dict[str, np.ndarray],
    rule: str,
) -> None:
    """Rows several partitions trained (``m`` of them each): the parameters by ``rule``; the
    accumulators and the sum of x the base plus every partition's growth; the largest scale and
    the latest stamp."""
    k = model.n_factors
    changes = {"w": sums["w"] - m * base["w"], "V": sums["V"] - m[:, None] * base["V"]}
    if rule == "adagrad" and "gw" in base:
        grown_w = sums["gw"] - m * base["gw"]
        grown_v = sums["gV"][:, :k] - m[:, None] * base["gV"][:, :k]
        # each partition's change weighed by its share of the round's growth of sum g^2
        # (a coordinate nobody's gradient moved: the mean)
        changes["w"] = np.where(
            grown_w > 0, weighted["w"] / np.where(grown_w > 0, grown_w, 1), changes["w"] / m
        )
        mv = m[:, None]
        changes["V"] = np.where(
            grown_v > 0, weighted["V"] / np.where(grown_v > 0, grown_v, 1), changes["V"] / mv
        )
    else:  # (adagrad without accumulators, "sgd": the mean)
        divide = {"mean": m, "sqrt": np.sqrt(m), "sum": np.ones_like(m)}.get(rule, m).astype(float)
        changes = {"w": changes["w"] / divide, "V": changes["V"] / divide[:, None]}
    model._w[shared] = base["w"] + changes["w"]
    model._V[shared] = base["V"] + changes["V"]
    model._last[shared] = most["last"]
    if "gw" in base:
        model._gw[shared] = base["gw"] + (sums["gw"] - m * base["gw"])
        gV = base["gV"] + (sums["gV"] - m[:, None] * base["gV"])
        if model._gV.shape[1] > k:  # normalized: the scale N is a maximum
            gV[:, k + COL_SCALE] = most["gV"][:, k + COL_SCALE]
        model._gV[shared] = gV


def _merge_dense(model: SparseFM, base: np.ndarray, after: list[np.ndarray]) -> None:
    """The dense state: one partition's as it is; several: the mean, and sums the base plus
    every partition's growth."""
    if not after:
        return
    if len(after) == 1:
        model._bias[:] = after[0]
        return
    stacked = np.stack(after)
    merged = stacked.mean(axis=0)
    merged[_DENSE_SUMS] = base[_DENSE_SUMS] + (stacked[:, _DENSE_SUMS] - base[_DENSE_SUMS]).sum(axis=0)
    model._bias[:] = merged
