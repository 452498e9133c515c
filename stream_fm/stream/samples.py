"""A partition's records turned into labelled samples: each record decoded (bad ones handed to a
callback, for the dead letters), impressions and clicks joined (:class:`~stream_fm.stream.join.Joiner`).
The single worker and cluster members share it; a member also tracks the oldest record its join
still needs (:func:`oldest_held`), where whoever owns the partition next re-reads from."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from stream_fm.stream.events import BadEvent, Click, Impression, decode
from stream_fm.stream.join import Joiner

__all__ = ["join_values", "oldest_held"]


def join_values(
    values: Sequence[bytes | None],
    joiner: Joiner,
    max_bytes: int,
    bad: Callable[[int, str, str], None],
    xs: list[dict[str, Any]],
    ys: list[bool],
    counts: Counter,
    offsets: Sequence[int] | None = None,
    offset_of: dict[str, int] | None = None,
) -> float | None:
    """Decode and join one partition's consecutive records: the samples they make are appended to
    ``xs`` and ``ys``, events counted by kind in ``counts``, bad ones handed to ``bad(index,
    reason, detail)``; returns the newest event time of a sample made. With ``offset_of``, the
    offset (from ``offsets``) of each impression the join takes in is kept by id, in the order
    they came (a cluster member re-reads from the oldest one its join still holds when a
    partition moves: :func:`oldest_held`)."""
    newest = None
    n_imp = n_click = n_sample = 0
    for i, value in enumerate(values):
        try:
            event = decode(value, max_bytes)
        except BadEvent as e:
            bad(i, e.reason, e.detail)
            continue
        if type(event) is Impression:
            n_imp += 1
            if offset_of is not None and offsets is not None:
                # every id the join holds is in offset_of (oldest_held drops only ids it does not)
                if event.id not in offset_of:
                    offset_of[event.id] = offsets[i]
                elif not joiner.holds(event.id):  # an id the join forgot, arriving again: anew
                    del offset_of[event.id]
                    offset_of[event.id] = offsets[i]
            out = joiner.impression(event.id, event.ts, event.features)
        elif type(event) is Click:
            n_click += 1
            out = joiner.click(event.impression_id, event.ts)
        else:
            n_sample += 1
            out = [(event.label, event.features, event.ts)]
            if event.ts is not None:
                out.extend(joiner.advance(event.ts))
        for label, features, ts in out:
            xs.append(features)
            ys.append(label)
            if ts is not None and (newest is None or ts > newest):
                newest = ts
    for kind, n in (("impression", n_imp), ("click", n_click), ("sample", n_sample)):
        if n:
            counts[kind] += n
    return newest


def oldest_held(offset_of: dict[str, int], joiner: Joiner, default: int) -> int:
    """The lowest offset of an impression ``joiner`` still holds (``default`` if none): the first
    held id of ``offset_of``, whose offsets grow in its order; the ids before it, which the join
    no longer holds, are dropped on the way (amortised O(1) an impression)."""
    for id in offset_of:
        if joiner.holds(id):
            break
    else:
        offset_of.clear()
        return default
    for gone in list(itertools.takewhile(lambda i: i != id, offset_of)):
        del offset_of[gone]
    return offset_of[id]
