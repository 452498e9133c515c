"""The key index's compiled side (:mod:`stream_fm.model.keyindex`): hashing, probing, inserting,
removing and compacting keys held as UTF-8 bytes in an arena, found through an open-addressing
table of row numbers. The per-sample kernels of :mod:`stream_fm.model.fastpath` inline ``hash_key`` and
``find``."""

from __future__ import annotations

import numba as nb
import numpy as np

from stream_fm.model._kernels import _splitmix64

EMPTY = -1  # a free slot of the table
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


@nb.njit(cache=True, error_model="numpy", inline="always")
def hash_key(data, a, b, salt):
    h = FNV_OFFSET ^ salt
    for i in range(a, b):
        h = (h ^ np.uint64(data[i])) * FNV_PRIME
    _, h = _splitmix64(h)
    return h


@nb.njit(cache=True, error_model="numpy", inline="always")
def find(data, a, b, h, table, start, length, tag, arena):
    """(row or -1, slot where the probe stopped) for the key ``data[a:b]`` of hash ``h``."""
    mask = table.shape[0] - 1
    j = np.int64(h & np.uint64(mask))
    t = np.uint32(h >> np.uint64(32))
    n = b - a
    while True:
        r = table[j]
        if r == EMPTY:
            return -1, j
        if tag[r] == t and length[r] == n:
            s = start[r]
            same = True
            for q in range(n):
                if arena[s + q] != data[a + q]:
                    same = False
                    break
            if same:
                return r, j
        j = (j + 1) & mask


@nb.njit(cache=True, error_model="numpy", inline="always")
def put(data, a, b, h, r, j, table, start, length, tag, arena, sizes):
    """Enter key ``data[a:b]`` (hash ``h``) as row ``r`` in the empty slot ``j``."""
    used = sizes[1]
    table[j] = r
    start[r] = used
    length[r] = b - a
    tag[r] = np.uint32(h >> np.uint64(32))
    for q in range(b - a):  # (data may be ``bytes``, which numba does not slice-assign from)
        arena[used + q] = data[a + q]
    sizes[1] = used + b - a
    sizes[0] += 1


@nb.njit(cache=True, error_model="numpy")
def lookup_keys(data, lengths, salt, table, start, length, tag, arena, out):
    """``out[i]``: the row of key i or -1; ``out[n:]``: the positions of the absent keys."""
    n = len(lengths)
    absent = 0
    b = 0
    for i in range(n):
        a, b = b, b + lengths[i]
        out[i], _ = find(data, a, b, hash_key(data, a, b, salt), table, start, length, tag, arena)
        if out[i] < 0:
            out[n + absent] = i
            absent += 1
    return absent


@nb.njit(cache=True, error_model="numpy")
def add_keys(data, lengths, done, next_row, row_stop, out, salt, table, start, length, tag, arena, sizes):
    """The rows of the packed keys from position ``done`` on into ``out``: each absent key is
    added as row ``next_row``, ``next_row + 1``, ... in order of first appearance (its repeats
    then find it), below ``row_stop``. Returns (keys done, next row): it stops at the first
    absent key that finds no room (rows used up, or the index full: ``make_room``, then call
    again). The index's arguments are :attr:`KeyIndex.add_args`."""
    b = 0
    for i in range(done):
        b += lengths[i]
    for i in range(done, len(lengths)):
        a, b = b, b + lengths[i]
        h = hash_key(data, a, b, salt)
        r, j = find(data, a, b, h, table, start, length, tag, arena)
        if r < 0:
            full = next_row >= start.shape[0] or sizes[1] + (b - a) > arena.shape[0]
            if next_row >= row_stop or full or 2 * (sizes[0] + 1) > table.shape[0]:
                return i, next_row
            r = next_row
            next_row += 1
            put(data, a, b, h, r, j, table, start, length, tag, arena, sizes)
        out[i] = r
    return len(lengths), next_row


@nb.njit(cache=True, error_model="numpy")
def insert_keys(data, lengths, rows, salt, table, start, length, tag, arena, sizes):
    """Returns -1, or the position of a key already present (nothing after it inserted)."""
    b = 0
    for i in range(len(lengths)):
        a, b = b, b + lengths[i]
        h = hash_key(data, a, b, salt)
        found, j = find(data, a, b, h, table, start, length, tag, arena)
        if found >= 0:
            return i
        put(data, a, b, h, rows[i], j, table, start, length, tag, arena, sizes)
    return -1


@nb.njit(cache=True, error_model="numpy")
def remove_rows(rows, salt, table, start, length, tag, arena, sizes):
    mask = table.shape[0] - 1
    for i in range(rows.shape[0]):
        r = rows[i]
        n = length[r]
        if n < 0:
            continue
        s = start[r]
        _, j = find(arena, s, s + n, hash_key(arena, s, s + n, salt), table, start, length, tag, arena)
        # backward-shift deletion: pull later members of the probe chain into the hole
        hole = j
        k = (j + 1) & mask
        while table[k] != EMPTY:
            m = table[k]
            home = np.int64(hash_key(arena, start[m], start[m] + length[m], salt) & np.uint64(mask))
            # m may move to the hole if its home is not cyclically in (hole, k]
            if (k - home) & mask >= (k - hole) & mask:
                table[hole] = m
                hole = k
            k = (k + 1) & mask
        table[hole] = EMPTY
        length[r] = -1
        sizes[0] -= 1
        sizes[2] += n


@nb.njit(cache=True, error_model="numpy")
def rebuild(salt, table, start, length, arena):
    mask = table.shape[0] - 1
    for r in range(length.shape[0]):
        n = length[r]
        if n < 0:
            continue
        j = np.int64(hash_key(arena, start[r], start[r] + n, salt) & np.uint64(mask))
        while table[j] != EMPTY:
            j = (j + 1) & mask
        table[j] = r


@nb.njit(cache=True, error_model="numpy")
def compact(start, length, arena, out):
    used = 0
    for r in range(length.shape[0]):
        n = length[r]
        if n < 0:
            continue
        s = start[r]
        out[used : used + n] = arena[s : s + n]
        start[r] = used
        used += n
    return used


@nb.njit(cache=True, error_model="numpy")
def gather(start, length, arena, n_rows):
    offsets = np.zeros(n_rows + 1, np.int64)
    for r in range(n_rows):
        offsets[r + 1] = offsets[r] + max(length[r], 0)
    data = np.empty(offsets[n_rows], np.uint8)
    for r in range(n_rows):
        n = length[r]
        if n > 0:
            data[offsets[r] : offsets[r] + n] = arena[start[r] : start[r] + n]
    return data, offsets
