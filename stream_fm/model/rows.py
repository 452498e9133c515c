"""Rows: the parameter slabs (one row per feature) and the policies that give rows out and take
them back.

A feature gets a row the first time a learned sample carries it, unless ``min_count`` admission
turns it away; ``max_features`` eviction frees the least recently updated rows when the model is
full. Rows are handed out in sample order, so that ``learn_batch`` equals a loop of ``learn_one``
even when admission and eviction happen mid-batch. :class:`Rows` is a part of
:class:`~stream_fm.model.SparseFM` (a mixin): it works on the model's arrays and key index.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stream_fm.model import _kernels, fastpath, updates
from stream_fm.model.features import encode_batch
from stream_fm.model.keyindex import KeyIndex, keys_at, pack_keys

__all__ = ["UNTOUCHED", "Encoded", "Rows", "encode_rows", "grown"]

UNTOUCHED = -1  # the ``last`` stamp of a row never trained

# (rows, x values, CSR offsets, (position, key) of keys the index lacks)
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]


class Rows:
    """Giving rows to keys, admitting and evicting them, growing the slabs (part of SparseFM)."""

    def _insert_missing(
        self,
        rows: np.ndarray,
        offsets: Sequence[int] | np.ndarray,
        misses: list[tuple[int, str]],
        train_until: Callable[[int], None],
    ) -> None:
        """Give rows to the keys the index lacks, in sample order (admission, eviction).

        A missing key was absent when the batch was encoded, so if it has a row now, that row
        was given out by this call: ``added`` (key -> row) is the only place to look."""
        if self.max_features is None and self.min_count <= 1:
            # unbounded: every key is admitted and nothing is evicted, so no flush is needed
            if not self._free:  # new rows in one compiled pass: a cold batch repeats its new keys
                added = self._add_keys(*pack_keys([key for _, key in misses]))
                for (j, _), row in zip(misses, added.tolist(), strict=True):
                    rows[j] = row
                return
            get = self._fresh.get
            for j, key in misses:
                row = get(key, -1)
                if row < 0:
                    row = self._new_row(key)
                rows[j] = row
            self._init_new()
            return
        added: dict[str, int] = {}
        s = 0
        mi = 0
        while mi < len(misses):
            j, key = misses[mi]
            mi += 1
            while offsets[s + 1] <= j:
                s += 1
            row = added.get(key, -1)
            if row < 0 and self._admit(key):
                if self.max_features is not None and self.n_features >= self.max_features:
                    # eviction reuses rows: train what came before this sample first, then look
                    # up again every later reference to an evicted row
                    self._init_new()
                    train_until(s)
                    # protect every row this sample uses, including keys it has yet to look up
                    end = offsets[s + 1]
                    protect = set(rows[offsets[s] : end])
                    for q, other in itertools.islice(misses, mi, None):
                        if q >= end:
                            break
                        protect.add(added.get(other, -1))
                    evicted = self._evict(protect=protect - {-1})
                    for gone in evicted.values():
                        added.pop(gone, None)
                    later = [(q, evicted[rows[q]]) for q in range(j + 1, len(rows)) if rows[q] in evicted]
                    if later:
                        for q, _ in later:
                            rows[q] = -1
                        misses = sorted(misses[mi:] + later)
                        mi = 0
                if self.max_features is None or self.n_features < self.max_features:
                    row = self._new_row(key)
                    added[key] = row
                else:
                    self.n_rejected += 1  # this one sample holds every row the model may have
            rows[j] = row
        self._init_new()

    def _admit(self, key: str) -> bool:
        if self.min_count <= 1:
            return True
        seen = self._pending.pop(key, 0) + 1
        if seen >= self.min_count:
            return True
        self._pending[key] = seen  # re-inserted last: the table forgets the oldest first
        self.n_rejected += 1
        if len(self._pending) > self.admission_capacity:
            for old in list(itertools.islice(self._pending, len(self._pending) // 2 or 1)):
                del self._pending[old]
        return False

    def _add_keys(self, data: bytes | np.ndarray, lengths: bytes | np.ndarray) -> np.ndarray:
        """The rows of the packed keys when every key is admitted and none evicted (unbounded,
        no free row): the absent ones get new rows in order of first appearance, as ``_new_row``
        gives them, in one compiled pass that also starts them afresh (``fastpath.add_rows``)."""
        n_keys = len(lengths)
        rows = np.empty(n_keys, np.int64)
        next_row = self._n_rows
        done = 0
        while True:
            done, next_row = fastpath.add_rows(
                data, lengths, done, next_row, self._w.shape[0], rows, *self._index.add_args,
                self._seed64, self.init_std, self._w, self._V, self._gw, self._gV, self._last,
            )  # fmt: skip
            if done == n_keys:
                break
            # out of room: grow what is short (the first call of a batch finds it, then one more)
            if next_row == self._w.shape[0]:
                self._alloc(grown(self._w.shape[0]))
            left = n_keys - done
            self._index.make_room(left, len(data), min(next_row + left, self._w.shape[0]))
        self._n_rows = next_row
        return rows

    def _new_row(self, key: str) -> int:
        """Give ``key`` a row; ``_init_new`` enters it in the index and sets its parameters."""
        if self._free:
            row = self._free.pop()
        else:
            row = self._n_rows
            if row == self._w.shape[0]:
                self._alloc(grown(row))
            self._n_rows += 1
        self._fresh[key] = row
        return row

    def _init_new(self) -> None:
        """Index the fresh keys and start their rows from scratch: w = 0, optimizer state 0,
        untouched, V from (seed, key)."""
        fresh = self._fresh
        if fresh:
            rows = np.fromiter(fresh.values(), np.int64, len(fresh))
            self._index.insert(list(fresh), rows)
            self._reset(rows)
            fresh.clear()

    def _reset(self, rows: np.ndarray) -> None:
        """w = 0, optimizer state 0, untouched, V from (seed, key) for ``rows`` (keys indexed)."""
        i = self._index
        _kernels.reset_rows(
            rows, i.key_start, i.key_length, i.arena, self._seed64, self.init_std,
            self._w, self._V, self._gw, self._gV, self._last,
        )  # fmt: skip

    def _evict(self, protect: set[int]) -> dict[int, str]:
        """Free the least recently updated 1/64 of the rows, never those in ``protect``.

        Returns the evicted rows with the keys they held.
        """
        assert self.max_features is not None
        stamps = self._last[: self._n_rows].copy()
        top = np.iinfo(np.int64).max
        stamps[self._free] = top
        stamps[list(protect)] = top
        n_evict = min(max(1, self.max_features // 64), self._n_rows)
        chosen = np.argpartition(stamps, n_evict - 1)[:n_evict]
        rows = sorted(int(r) for r in chosen if stamps[r] != top)
        evicted = dict(zip(rows, self._index.remove(rows), strict=True))
        self._free.extend(rows)
        self.n_evicted += len(evicted)
        return evicted

    def _alloc(self, capacity: int) -> None:
        """Grow (or create) the parameter slabs to ``capacity`` rows, keeping their contents."""
        k = self.n_factors
        stateful = self._opt != updates.OPT_SGD  # per-row optimizer state (accumulators, scale)
        acc = (capacity, k + updates.extra_columns(self._opt))
        # the old arrays stay alive until the pointer table no longer points at them
        olds = [getattr(self, name, None) for name in ("_w", "_V", "_gw", "_gV", "_last")]
        n_old = 0 if olds[0] is None else olds[0].shape[0]

        def grow(a: np.ndarray | None, shape: tuple[int, ...], fill: float) -> np.ndarray:
            new = np.full(shape, fill, dtype=np.float64 if fill != UNTOUCHED else np.int64)
            if a is not None and a.shape[0]:
                new[:n_old] = a
            return new

        rows, factors = (capacity,), (capacity, k)
        shapes = (rows, factors, rows if stateful else (0,), acc if stateful else (0, k), rows)
        fills = (0.0, 0.0, 0.0, 0.0, UNTOUCHED)
        self._w, self._V, self._gw, self._gV, self._last = map(grow, olds, shapes, fills)
        self._publish()
        del olds


def encode_rows(xs: Iterable[Mapping[str, Any]], index: KeyIndex, hashing: tuple[int, int] | None) -> Encoded:
    """Feature dicts -> (rows, x values, CSR offsets, misses): keys encoded in C, then looked up
    in ``index`` all at once (or hashed, if ``hashing`` = (CRC-32 start, mask) is given);
    ``misses`` are the (position, key) of the keys absent (row -1)."""
    data, lengths, vals, offsets = encode_batch(xs)
    if hashing is not None:
        rows = np.empty(lengths.shape[0], np.int64)
        fastpath.bucket_rows(data, lengths, hashing[0], hashing[1], rows)
        return rows, vals, offsets, []
    rows, absent = index.lookup_packed(data, lengths)
    return rows, vals, offsets, list(zip(absent, keys_at(data, lengths, absent), strict=True))


def grown(capacity: int) -> int:
    """The next capacity of the parameter slabs: half as much again (amortised O(1) growth that
    leaves at most a third of the memory unused, where doubling may leave half)."""
    return capacity + capacity // 2
