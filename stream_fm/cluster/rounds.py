"""Rounds (cluster mode): a partition's round as the samples it made, and a round folded into
the model by learning every partition's samples in partition order.

The owner of a partition joins the round's records into samples and publishes them, packed
(:func:`pack_round`): their keys' UTF-8 bytes and lengths, their x values and CSR offsets, as the
C encoder gives them, and their labels. Every member, the owner included, folds round r once every
partition's samples for it are in (:func:`fold_round`): it learns them, partition 0's first, with
the model's own update, so the model is the single learner's on the stream in round order:

    round 0 of partition 0, round 0 of partition 1, ..., round 1 of partition 0, ...

That order depends on the log only, so the model does not depend on the number of members, and
no merge rule stands between the cluster and the single learner: an earlier design learned each
round on a copy of the base and merged the partitions' changes of the model, which cost 1–9% of
log loss (every partition learned its round without the others' samples of it; README, "Cluster").
The price is that every member learns every sample (about a microsecond a sample, against the
8–10 µs of reading and joining the events, which only the owner does).

Settings whose result depends on the order in which keys arrive (``max_features`` eviction,
``min_count`` admission) and hashing are refused: cluster mode gives new keys their rows as they
first appear in a round (``SparseFM._add_keys``), as an unbounded model does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stream_fm.cluster.delta import Delta
from stream_fm.errors import ConfigError, DeltaError
from stream_fm.model import SparseFM, checks
from stream_fm.model.features import encode_batch

__all__ = ["SAMPLE_ARRAYS", "check_model", "fold_round", "pack_round"]

# a round's samples on the wire: keys' UTF-8 bytes, each key's length, each key's x, each sample's
# first key (CSR, one more than samples), each sample's label (0 or 1)
SAMPLE_ARRAYS = ("key_bytes", "key_lengths", "values", "offsets", "labels")


def check_model(model: SparseFM) -> None:
    """Refuse the settings a round cannot reproduce on every member."""
    refused = {
        "max_features": (model.max_features is not None, "None: eviction depends on arrival order"),
        "min_count": (model.min_count > 1, "1: admission depends on arrival order"),
        "hash_bits": (model.hash_bits is not None, "None: members exchange samples by key"),
    }
    for name, (bad, allowed) in refused.items():
        if bad:
            raise ConfigError(name, getattr(model, name), f"{allowed} (cluster mode)")


def pack_round(xs: Sequence[Mapping[str, Any]], ys: Sequence[Any], partition: int, round_: int) -> Delta:
    """One partition's samples of one round, packed for the sync topic (a bad sample raises
    ``FeatureError``, as ``learn_batch`` would, before anything is published)."""
    labels = checks.labels(ys, len(xs))
    data, lengths, values, offsets = encode_batch(xs)
    short = len(lengths) == 0 or int(lengths.max()) < 256  # keys' lengths in a byte if they fit
    arrays = {
        "key_bytes": data,
        "key_lengths": lengths.astype("|u1" if short else "<i4"),
        "values": values,
        "offsets": offsets.astype("<i4"),
        "labels": labels.astype("|u1"),
    }
    return Delta(partition, round_, arrays, {"samples": len(xs), "keys": len(lengths)})


def fold_round(model: SparseFM, deltas: Sequence[Delta]) -> np.ndarray:
    """Learn one round's samples (one delta per partition), in partition order whatever order the
    deltas came in; each sample's probability before it was learned, in that order."""
    check_model(model)
    deltas = sorted(deltas, key=lambda d: d.partition)
    if len({d.round for d in deltas}) > 1 or len({d.partition for d in deltas}) < len(deltas):
        raise ValueError("fold_round takes one delta per partition, all of one round")
    parts = [_unpacked(d) for d in deltas if d.meta["samples"]]
    if not parts:
        return np.empty(0)
    data = np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    values = np.concatenate([p[2] for p in parts])
    firsts = np.cumsum([0] + [len(p[1]) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p[3][1:] + f for p, f in zip(parts, firsts, strict=True)])
    labels = np.concatenate([p[4] for p in parts])
    rows = model._add_keys(data, lengths)  # unbounded (check_model): every key admitted
    return model._learn_encoded((rows, values, offsets.astype(np.int64), []), labels)


def _unpacked(delta: Delta) -> tuple[np.ndarray, ...]:
    """A delta's samples as the C encoder packs them (int64 lengths and offsets), checked: the
    arrays must agree with each other before a member learns them."""
    try:
        data, lengths, values, offsets, labels = (delta.arrays[name] for name in SAMPLE_ARRAYS)
    except KeyError as e:
        raise DeltaError(f"partition {delta.partition} round {delta.round}: no array {e}") from e
    lengths, offsets = lengths.astype(np.int64), offsets.astype(np.int64)
    n = delta.meta["samples"]
    consistent = (
        data.dtype == np.uint8
        and values.dtype == np.float64
        and len(labels) == n
        and len(offsets) == n + 1
        and offsets[0] == 0
        and offsets[-1] == len(lengths) == len(values)
        and bool((np.diff(offsets) >= 0).all())
        and bool((lengths >= 0).all())
        and int(lengths.sum()) == len(data)
        and bool(np.isfinite(values).all())
        and bool((labels <= 1).all())
    )
    if not consistent:
        raise DeltaError(f"partition {delta.partition} round {delta.round}: its sample arrays disagree")
    return data, lengths, values, offsets, labels.astype(np.float64)
