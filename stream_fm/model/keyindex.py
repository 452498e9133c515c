"""The feature-key index: key (a string) -> parameter row, in flat numpy arrays.

A Python ``dict[str, int]`` costs about 140 bytes a feature (the key's ``str`` object, the row's
``int`` object, the dict's slots): as much as the parameters of a k = 8 model. This index keeps
each key once, as UTF-8 bytes in an arena, and finds it through an open-addressing table of row
numbers (linear probing, load factor at most 1/2), all in compiled code; about 40 bytes a
feature at 10 bytes a key. Lookups compare the key's bytes, so they are exact: two keys never
share a row, whatever their hashes.

Keys reach the compiled side as a batch of UTF-8 bytes (:func:`pack_keys`), and a snapshot stores
them back to back plus offsets (:func:`encode_keys`), so a snapshot's keys load without a Python
string each.

Compiled callers that are not handed the arrays one by one (the per-sample kernels of
:mod:`stream_fm.model.fastpath`) find them through ``KeyIndex.pointers``: their addresses and sizes, kept
current by every method that replaces an array.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stream_fm.model._keyindex_kernels import (
    EMPTY,
    add_keys,
    compact,
    gather,
    insert_keys,
    lookup_keys,
    rebuild,
    remove_rows,
)

__all__ = ["KeyIndex", "add_keys", "decode_keys", "encode_keys", "gather_keys", "keys_at", "pack_keys"]

# ``KeyIndex.pointers``: the salt, then each array's address and length
I_SALT, I_TABLE, I_SLOTS, I_START, I_ROWS, I_LENGTH, I_TAG, I_ARENA, I_ARENA_BYTES, I_SIZES, I_SIZE = range(
    11
)


def encode_keys(keys: Sequence[str] | Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 UTF-8 bytes back to back, int64 offsets of length n + 1).

    Any string round-trips through :func:`decode_keys`, lone surrogates included.
    """
    data, lengths = pack_keys(keys if isinstance(keys, list) else list(keys))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.frombuffer(lengths, np.uint8) if isinstance(lengths, bytes) else lengths, out=offsets[1:])
    return np.frombuffer(data, np.uint8), offsets


def decode_keys(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`encode_keys`."""
    raw = np.asarray(data, np.uint8).tobytes()
    o = np.asarray(offsets, np.int64).tolist()
    return [raw[o[i] : o[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(o) - 1)]


class KeyIndex:
    """Feature key -> row, for rows given out by the caller (the model), below 2**31.

    ``lookup`` only reads the table; :func:`add_keys`, ``insert`` and ``remove`` change it. Row
    ``r`` holds its key at ``arena[start[r] : start[r] + length[r]]``; a row without a key has
    length -1.
    """

    def __init__(self, rows: int = 1024, salt: int | None = None) -> None:
        # a random salt per index: a stream cannot be crafted to pile its keys into one probe
        # chain; the layout of the table never shows in any result
        self._salt = np.uint64(int.from_bytes(os.urandom(8), "little") if salt is None else salt)
        self._table = np.full(16, EMPTY, np.int32)
        self._start = np.zeros(rows, np.int64)
        self._length = np.full(rows, -1, np.int32)
        self._tag = np.zeros(rows, np.uint32)  # high bits of the key's hash: most probes stop here
        self._arena = np.zeros(1 << 16, np.uint8)
        self._sizes = np.zeros(3, np.int64)  # [keys, arena bytes used, arena bytes of removed keys]
        self.pointers = np.zeros(I_SIZE, np.int64)
        self._publish()

    def __len__(self) -> int:
        return int(self._sizes[0])

    # a copy (copy.deepcopy, river's clone) gets pointers to its own arrays, never the original's
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "pointers"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.pointers = np.zeros(I_SIZE, np.int64)
        self._publish()

    # where the key of row r is: arena[key_start[r] : key_start[r] + key_length[r]] (read-only)
    @property
    def key_start(self) -> np.ndarray:
        return self._start

    @property
    def key_length(self) -> np.ndarray:
        return self._length

    @property
    def arena(self) -> np.ndarray:
        return self._arena

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._table, self._start, self._length, self._tag, self._arena))

    # ------------------------------------------------------------------ reading

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, list[int]]:
        """The rows of ``keys`` (int64; -1 where absent), and the positions of the absent ones."""
        return self.lookup_packed(*pack_keys(keys))

    def lookup_packed(
        self, data: bytes | np.ndarray, lengths: bytes | np.ndarray
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`lookup` for keys packed as UTF-8 bytes back to back and their lengths."""
        n = len(lengths)
        out = np.empty(2 * n, np.int64)  # rows, then the positions of the absent keys
        absent = lookup_keys(
            data, lengths, self._salt, self._table, self._start, self._length, self._tag, self._arena, out
        )
        return out[:n], out[n : n + absent].tolist() if absent else []

    def get(self, key: str) -> int | None:
        row = int(self.lookup([key])[0][0])
        return None if row < 0 else row

    def key_of(self, row: int) -> str | None:
        n = int(self._length[row])
        if n < 0:
            return None
        a = int(self._start[row])
        return self._arena[a : a + n].tobytes().decode("utf-8", "surrogatepass")

    def as_dict(self) -> dict[str, int]:
        """Every key with its row (a plain dict: for tests and inspection, not the hot path)."""
        rows = np.flatnonzero(self._length >= 0)
        return dict(zip(decode_keys(*self.key_bytes(rows)), rows.tolist(), strict=True))

    def key_bytes(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys of ``rows`` in :func:`encode_keys` form ('' for a keyless row)."""
        return gather(self._start[rows], self._length[rows], self._arena, rows.shape[0])

    def parts(self, n_rows: int) -> dict[str, tuple[np.ndarray, int]]:
        """What :func:`gather_keys` needs to export the keys of rows ``0 .. n_rows-1``: each
        array with the length of its prefix in use (a caller copies these, to export later)."""
        return {
            "key_start": (self._start, n_rows),
            "key_length": (self._length, n_rows),
            "key_arena": (self._arena, int(self._sizes[1])),
        }

    # ------------------------------------------------------------------ writing

    @property
    def add_args(self) -> tuple[Any, ...]:
        """The index's part of the arguments of :func:`add_keys` (compiled, for a compiled caller
        that does more with the new rows in the same call). Stale after :meth:`make_room`."""
        return self._salt, self._table, self._start, self._length, self._tag, self._arena, self._sizes

    def make_room(self, n_keys: int, n_bytes: int, row_stop: int) -> None:
        """Room for ``n_keys`` more keys of ``n_bytes`` in all, on rows below ``row_stop``."""
        self._reserve_rows(row_stop)
        self._reserve_bytes(n_bytes)
        self._reserve_slots(len(self) + n_keys)

    def insert(self, keys: list[str], rows: np.ndarray) -> None:
        """Give key ``i`` row ``rows[i]``. The keys must be absent and distinct, the rows keyless."""
        bad = self._insert(*pack_keys(keys), rows)
        if bad >= 0:
            raise KeyError(f"key {keys[bad]!r} is already in the index")

    def _insert(self, data: bytes | np.ndarray, lengths: bytes | np.ndarray, rows: np.ndarray) -> int:
        n = len(lengths)
        self._reserve_rows(int(rows.max()) + 1 if n else 0)
        self._reserve_bytes(len(data))
        self._reserve_slots(len(self) + n)
        return insert_keys(
            data, lengths, rows, self._salt, self._table, self._start, self._length, self._tag, self._arena,
            self._sizes,
        )  # fmt: skip

    def remove(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Remove the keys of ``rows``; returns them."""
        keys = [self.key_of(int(r)) for r in rows]
        remove_rows(np.asarray(rows, np.int64), self._salt, self._table, self._start, self._length, self._tag,
                self._arena, self._sizes)  # fmt: skip
        used, dead = int(self._sizes[1]), int(self._sizes[2])
        if dead > (1 << 20) and 2 * dead > used:  # mostly removed keys: compact the arena
            self._new_arena(used - dead)
        return keys  # type: ignore[return-value]

    @classmethod
    def from_keys(cls, data: np.ndarray, offsets: np.ndarray, keyless: Iterable[int] = ()) -> KeyIndex:
        """An index giving key ``i`` row ``i`` (as :func:`gather_keys` wrote them), but for ``keyless``."""
        offsets = np.asarray(offsets, np.int64)
        n = offsets.shape[0] - 1
        index = cls(max(n, 1024))
        keep = np.ones(n, bool)
        keep[np.fromiter(keyless, np.int64)] = False
        rows = np.flatnonzero(keep)
        lengths = np.diff(offsets)[rows]
        kept, _ = gather(
            offsets[:-1][rows], lengths.astype(np.int32), np.asarray(data, np.uint8), rows.shape[0]
        )
        if index._insert(kept, lengths, rows) >= 0:
            raise ValueError("the same key is stored twice")
        return index

    # ------------------------------------------------------------------ growth

    def _reserve_rows(self, n: int) -> None:
        if n > self._start.shape[0]:
            size = max(n, self._start.shape[0] * 3 // 2)  # half as much again, as the model's slabs
            old = self._start, self._length, self._tag  # alive until no pointer points at them
            self._start = _grown(self._start, size, 0)
            self._length = _grown(self._length, size, -1)
            self._tag = _grown(self._tag, size, 0)
            self._publish()
            del old

    def _reserve_bytes(self, n: int) -> None:
        if int(self._sizes[1]) + n > self._arena.shape[0]:
            self._new_arena(int(self._sizes[1]) - int(self._sizes[2]) + n)

    def _new_arena(self, need: int) -> None:
        """A new arena of at least ``need`` bytes holding only the live keys, in row order."""
        arena = np.zeros(max(1 << 16, need + need // 2), np.uint8)
        old = self._arena  # alive until no pointer points at it
        self._sizes[1] = compact(self._start, self._length, old, arena)
        self._sizes[2] = 0
        self._arena = arena
        self._publish()
        del old

    def _reserve_slots(self, keys: int) -> None:
        """Keep the table at most half full for ``keys`` keys."""
        if 2 * keys > self._table.shape[0]:
            size = self._table.shape[0]
            while size < 2 * keys:
                size *= 2
            table = np.full(size, EMPTY, np.int32)
            rebuild(self._salt, table, self._start, self._length, self._arena)
            old, self._table = self._table, table  # the old one alive until no pointer points at it
            self._publish()
            del old

    def _publish(self) -> None:
        """Write the arrays' addresses into ``pointers``: after every change of an array."""
        p = self.pointers
        p[I_SALT] = self._salt.view(np.int64)
        for slot, a in ((I_TABLE, self._table), (I_START, self._start), (I_ARENA, self._arena)):
            p[slot], p[slot + 1] = a.ctypes.data, a.shape[0]
        p[I_LENGTH], p[I_TAG], p[I_SIZES] = (
            self._length.ctypes.data,
            self._tag.ctypes.data,
            self._sizes.ctypes.data,
        )


def pack_keys(keys: list[str]) -> tuple[bytes, bytes | np.ndarray]:
    """Python strings as their UTF-8 bytes joined, and their lengths: the form compiled code takes
    keys in (samples come packed from the C encoder; this serves keys held as strings). Lengths
    are ``bytes`` when no key is over 255 bytes long, else an int64 array."""
    joined = "".join(keys)
    if joined.isascii():  # lengths in characters are lengths in bytes
        data, parts = joined.encode("ascii"), keys
    else:
        parts = [k.encode("utf-8", "surrogatepass") for k in keys]
        data = b"".join(parts)
    try:
        return data, bytes(map(len, parts))
    except ValueError:  # a key of 256 bytes or more
        return data, np.fromiter(map(len, parts), np.int64, len(parts))


def keys_at(data: bytes | np.ndarray, lengths: np.ndarray, positions: Iterable[int]) -> list[str]:
    """The packed keys (UTF-8 bytes back to back, and their lengths) at ``positions``, as strings."""
    ends = np.cumsum(lengths).tolist()
    n = np.asarray(lengths).tolist()
    raw = data if isinstance(data, bytes) else np.asarray(data, np.uint8).tobytes()
    return [raw[ends[j] - n[j] : ends[j]].decode("utf-8", "surrogatepass") for j in positions]


def _grown(a: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, a.dtype)
    out[: a.shape[0]] = a
    return out


def gather_keys(start: np.ndarray, length: np.ndarray, arena: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys of a :meth:`KeyIndex.capture` in :func:`encode_keys` form ('' for a keyless row)."""
    return gather(start, length, arena, start.shape[0])
