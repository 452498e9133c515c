"""The per-sample path: one sample from its dict to the model with no Python in between.

A call into a numba function from Python costs about a microsecond before it starts (each array
argument is checked and unboxed), as much as the work for a whole sample. So ``predict_proba_one``
and ``learn_one`` go to the C encoder (``_encode.c``), which writes the sample's keys into a buffer
on its stack and calls the kernels below directly, through their C addresses (numba ``cfunc``).

The kernels find the model's arrays through a *pointer table*: an int64 array of addresses and
sizes (``M_*`` below) that the owner rewrites whenever it replaces an array (:func:`publish`),
and that holds the address of the key index's own table (``KeyIndex.pointers``). The arrays are
owned by Python objects as usual; the tables only point at them.

The same kernels serve :class:`~stream_fm.SparseFM` and :class:`~stream_fm.serve.serving.Predictor`.
"""

from __future__ import annotations

import zlib
from typing import Any

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from stream_fm import _encode
from stream_fm.errors import FeatureError
from stream_fm.model import _kernels, features, updates
from stream_fm.model._kernels import BIAS_SIZE
from stream_fm.model._keyindex_kernels import add_keys, find, hash_key
from stream_fm.model.keyindex import (
    I_ARENA,
    I_ARENA_BYTES,
    I_LENGTH,
    I_ROWS,
    I_SALT,
    I_SIZE,
    I_SIZES,
    I_SLOTS,
    I_START,
    I_TABLE,
    I_TAG,
    KeyIndex,
)
from stream_fm.model.updates import HP_SIZE, HP_STD

__all__ = [
    "MODE_ADD",
    "MODE_HASH",
    "MODE_LOOKUP",
    "Bound",
    "add_rows",
    "bucket_rows",
    "hashing",
    "pointer_table",
    "publish",
]

# the model's pointer table
(M_BIAS, M_W, M_V, M_GW, M_GV, M_LAST, M_COUNTS, M_HP, M_INDEX, M_ROWS, M_K, M_OPT, M_GW_ROWS, M_MODE,
 M_SEED, M_HASH_SALT, M_HASH_MASK, M_GV_COLS, M_SIZE) = range(19)  # fmt: skip
# how rows are found: in the index (absent keys: the Python path), in the index adding absent
# keys (unbounded model), or by hashing
MODE_LOOKUP, MODE_ADD, MODE_HASH = range(3)
# a model's counters (``counts``): the kernels' two, then samples learned and rows handed out
C_SKIPPED, C_TRAINED, C_SAMPLES, C_ROWS = range(4)
# the sample table the C encoder fills (_encode.c's S_* enum)
S_N, S_DATA, S_BYTES, S_LENGTHS, S_VALS, S_ROWS, S_LABEL = range(7)


def pointer_table() -> np.ndarray:
    return np.zeros(M_SIZE, np.int64)


def publish(
    table: np.ndarray,
    *,
    bias: np.ndarray,
    w: np.ndarray,
    V: np.ndarray,
    gw: np.ndarray,
    gV: np.ndarray,
    last: np.ndarray,
    counts: np.ndarray,
    hp: np.ndarray,
    index: KeyIndex,
    opt: int,
    mode: int,
    seed: int = 0,
    hash_bits: int | None = None,
) -> None:
    """Point ``table`` at these arrays. Call again whenever one of them is replaced: a stale
    address is a use after free. The arrays must be C-contiguous, of the kernels' dtypes."""
    for a, dtype in ((bias, np.float64), (w, np.float64), (V, np.float64), (gw, np.float64),
                     (gV, np.float64), (last, np.int64), (counts, np.int64), (hp, np.float64)):  # fmt: skip
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"an array of {a.dtype} (contiguous: {a.flags.c_contiguous}), expected {dtype}")
    if (
        w.shape[0] != V.shape[0]
        or w.shape[0] != last.shape[0]
        or counts.shape[0] < 4
        or hp.shape[0] != HP_SIZE
        or bias.shape[0] != BIAS_SIZE
    ):
        raise ValueError("inconsistent model arrays")
    table[M_BIAS] = bias.ctypes.data
    table[M_W] = w.ctypes.data
    table[M_V] = V.ctypes.data
    table[M_GW] = gw.ctypes.data
    table[M_GV] = gV.ctypes.data
    table[M_LAST] = last.ctypes.data
    table[M_COUNTS] = counts.ctypes.data
    table[M_HP] = hp.ctypes.data
    table[M_INDEX] = index.pointers.ctypes.data
    table[M_ROWS] = w.shape[0]
    table[M_K] = V.shape[1]
    table[M_OPT] = opt
    table[M_GW_ROWS] = gw.shape[0]
    table[M_GV_COLS] = gV.shape[1]
    table[M_MODE] = mode
    table[M_SEED] = np.uint64(seed).view(np.int64)
    table[M_HASH_SALT], table[M_HASH_MASK] = hashing(seed, hash_bits) or (0, 0)


def hashing(seed: int, hash_bits: int | None) -> tuple[int, int] | None:
    """Hashing mode's (CRC-32 start value, mask): a key's row is ``crc32(key, start) & mask``, the
    start value being the CRC-32 of the seed (8 bytes, little-endian). None without hashing."""
    if hash_bits is None:
        return None
    return zlib.crc32(seed.to_bytes(8, "little")), (1 << hash_bits) - 1


# ---------------------------------------------------------------------- compiled


def _crc_table() -> np.ndarray:
    table = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC = _crc_table()


@nb.njit(cache=True, error_model="numpy", inline="always")
def _crc32(data, a, b, start):
    """zlib.crc32(data[a:b], start): hashing mode's bucket of a key is its low bits."""
    c = np.uint32(start) ^ np.uint32(0xFFFFFFFF)
    for i in range(a, b):
        c = _CRC[(c ^ np.uint32(data[i])) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
    return np.int64(c ^ np.uint32(0xFFFFFFFF))


@nb.njit(cache=True, error_model="numpy")
def bucket_rows(data, lengths, salt, mask, out):
    """Hashing mode: ``out[i]`` = the bucket of packed key i."""
    b = 0
    for i in range(lengths.shape[0]):
        a, b = b, b + lengths[i]
        out[i] = _crc32(data, a, b, salt) & mask


@intrinsic
def _voidptr(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@nb.njit(inline="always")
def _array(address, shape, dtype):
    return nb.carray(_voidptr(address), shape, dtype)


@nb.njit(cache=True, error_model="numpy")
def add_rows(data, lengths, done, next_row, row_stop, out, salt, table, start, length, tag, arena, sizes,
              seed, std, w, V, gw, gV, last):  # fmt: skip
    """:func:`~stream_fm.model._keyindex_kernels.add_keys`, then the new rows started afresh: one call for the
    two, as new keys arrive a few at a time."""
    first = next_row
    done, next_row = add_keys(
        data, lengths, done, next_row, row_stop, out, salt, table, start, length, tag, arena, sizes
    )
    if next_row > first:
        _kernels.reset_rows(np.arange(first, next_row), start, length, arena, seed, std, w, V, gw, gV, last)
    return done, next_row


@nb.njit(inline="always")
def _sample(sample):
    """(key bytes, key lengths, x values, rows to fill, label) from the C encoder's sample table."""
    s = nb.carray(sample, (S_LABEL + 1,))
    n = s[S_N]
    data = _array(s[S_DATA], (s[S_BYTES],), np.uint8)
    lengths = _array(s[S_LENGTHS], (n,), np.int64)
    return data, lengths, _array(s[S_VALS], (n,), np.float64), _array(s[S_ROWS], (n,), np.int64), s[S_LABEL]


@nb.njit(inline="always")
def _params(m):
    """(bias, w, V, gw, gV, last) from a model's pointer table."""
    nr, k, ng = m[M_ROWS], m[M_K], m[M_GW_ROWS]
    bias = _array(m[M_BIAS], (BIAS_SIZE,), np.float64)
    w, V = _array(m[M_W], (nr,), np.float64), _array(m[M_V], (nr, k), np.float64)
    gw, gV = _array(m[M_GW], (ng,), np.float64), _array(m[M_GV], (ng, m[M_GV_COLS]), np.float64)
    return bias, w, V, gw, gV, _array(m[M_LAST], (nr,), np.int64)


@nb.njit(inline="always")
def _index(m):
    """The key index's arrays as :attr:`KeyIndex.add_args` has them, from its pointer table."""
    ix = _array(m[M_INDEX], (I_SIZE,), np.int64)
    rows = ix[I_ROWS]
    return (
        np.uint64(ix[I_SALT]),
        _array(ix[I_TABLE], (ix[I_SLOTS],), np.int32),
        _array(ix[I_START], (rows,), np.int64),
        _array(ix[I_LENGTH], (rows,), np.int32),
        _array(ix[I_TAG], (rows,), np.uint32),
        _array(ix[I_ARENA], (ix[I_ARENA_BYTES],), np.uint8),
        _array(ix[I_SIZES], (3,), np.int64),
    )


@nb.njit(cache=True, error_model="numpy")
def _find_rows(m, data, lengths, rows):
    """Rows of the sample's keys by the model's mode (absent: -1); True if none is absent."""
    if m[M_MODE] == MODE_HASH:
        bucket_rows(data, lengths, m[M_HASH_SALT], m[M_HASH_MASK], rows)
        return True
    salt, table, start, length, tag, arena, _ = _index(m)
    complete = True
    b = 0
    for i in range(lengths.shape[0]):
        a, b = b, b + lengths[i]
        rows[i], _ = find(data, a, b, hash_key(data, a, b, salt), table, start, length, tag, arena)
        complete &= rows[i] >= 0
    return complete


@nb.cfunc(types.float64(types.CPointer(types.int64), types.CPointer(types.int64)), cache=True,
          error_model="numpy")  # fmt: skip
def _predict_one(model, sample):
    m = nb.carray(model, (M_SIZE,))
    data, lengths, vals, rows, _ = _sample(sample)
    _find_rows(m, data, lengths, rows)
    bias, w, V, _, _, last = _params(m)
    return _kernels.predict_one(rows, vals, bias, w, V, last)


@nb.cfunc(types.float64(types.CPointer(types.int64), types.CPointer(types.int64)), cache=True,
          error_model="numpy")  # fmt: skip
def _learn_one(model, sample):
    """0: learned. 1: not learned, rows filled (-1: absent), for the Python path to finish."""
    m = nb.carray(model, (M_SIZE,))
    data, lengths, vals, rows, label = _sample(sample)
    n = lengths.shape[0]
    bias, w, V, gw, gV, last = _params(m)
    counts = _array(m[M_COUNTS], (C_ROWS + 1,), np.int64)
    hp = _array(m[M_HP], (HP_SIZE,), np.float64)
    if m[M_MODE] == MODE_ADD:
        # absent keys get the next rows, started afresh, as SparseFM._add_keys gives them
        seed = np.uint64(m[M_SEED])
        done, next_row = add_rows(data, lengths, 0, counts[C_ROWS], w.shape[0], rows, *_index(m), seed,
                                  hp[HP_STD], w, V, gw, gV, last)  # fmt: skip
        counts[C_ROWS] = next_row
        if done < n:  # out of room: the rest is looked up, and the Python path grows the arrays
            _find_rows(m, data, lengths, rows)
            return 1.0
    elif not _find_rows(m, data, lengths, rows):
        return 1.0
    offsets = np.zeros(2, np.int64)
    offsets[1] = n
    labels = np.full(1, float(label))
    out = np.empty(1)
    step = counts[C_SAMPLES]
    updates.learn(rows, vals, offsets, labels, step, m[M_OPT], hp, bias, w, V, gw, gV, last, out, counts)
    counts[C_SAMPLES] += 1
    return 0.0


_encode.configure(features._slow, features._as_dict, FeatureError, _predict_one.address, _learn_one.address)


class Bound:
    """The pointer table through which the per-sample kernels find a model's arrays (part of
    SparseFM). A copy needs a table of its own: the original's points at the original's arrays.
    ``copy.deepcopy`` comes through ``__setstate__``; river's ``clone(include_attributes=True)``
    copies attribute by attribute, which the per-sample methods notice (``_bound_to`` is not self).
    """

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pointers", "_address", "_bound_to")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind()

    def _bind(self) -> None:
        self._new_pointer_table()
        self._publish()

    def _new_pointer_table(self) -> None:
        """Where the per-sample kernels find this model's arrays (``_publish`` fills it in)."""
        self._pointers = pointer_table()
        self._address = self._pointers.ctypes.data
        self._bound_to = self

    def _publish(self) -> None:
        """Point the per-sample kernels at the current arrays (after any of them changes) and
        tell them how to find rows: adding absent keys themselves only while every key is
        admitted and none evicted (else ``learn_one`` takes the Python path for new keys)."""
        if self.hash_bits is not None:
            mode = MODE_HASH
        elif self.max_features is None and self.min_count <= 1 and not self._free:
            mode = MODE_ADD
        else:
            mode = MODE_LOOKUP
        publish(
            self._pointers, bias=self._bias, w=self._w, V=self._V, gw=self._gw, gV=self._gV, last=self._last,
            counts=self._counts, hp=self._hp, index=self._index, opt=self._opt, mode=mode, seed=self.seed,
            hash_bits=self.hash_bits,
        )  # fmt: skip
