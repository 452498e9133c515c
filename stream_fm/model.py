"""SparseFM: an online degree-2 factorization machine for click-through rate, keyed by feature.

Parameters live in growable numpy slabs (``w``, ``V`` and the optimizer's state), one row per
feature; a :class:`~stream_fm.keyindex.KeyIndex` maps each feature key (``"ad=a17"``) to its row.
The Python side encodes samples and manages rows; the arithmetic runs in compiled kernels
(``_kernels.py``).
"""

from __future__ import annotations

import itertools
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numba as nb
import numpy as np
from river import base

from stream_fm import _kernels
from stream_fm.errors import ConfigError, LabelError
from stream_fm.features import encode_batch, encode_into
from stream_fm.keyindex import KeyIndex, add_keys, decode_keys, encode_keys, gather_keys, pack_keys

__all__ = ["SparseFM", "StateCapture", "bucket_lookup", "encode_rows", "encode_rows_one"]

_OPTIMIZERS = {"sgd": _kernels.OPT_SGD, "adagrad": _kernels.OPT_ADAGRAD}
_ADAGRAD_EPS = 1e-8
_STATE_FORMAT = 1
_UNTOUCHED = -1

# (rows, x values, CSR offsets, (position, key) of keys the index lacks)
_Encoded = tuple[np.ndarray | list[int], list[float], list[int], list[tuple[int, str]]]


class SparseFM(base.Classifier):
    """Online factorization machine for binary labels (clicks), trained by per-sample SGD.

    The model (Rendle, 2010) is ``y_hat = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j``,
    computed in O(k * nnz) over the sample's non-zero features, and ``p = sigma(y_hat)``. Each
    sample descends the log loss once, in arrival order.

    Parameters
    ----------
    n_factors
        Dimension k of the latent vectors. 1 to 256.
    optimizer
        ``"adagrad"`` (a per-parameter rate ``learning_rate / sqrt(sum g^2)``: frequent features
        slow down, rare ones keep learning, which suits Zipf-distributed ids) or ``"sgd"``
        (a constant rate: the reference's algorithm).
    learning_rate
        Step size, > 0.
    l2_w, l2_v
        L2 penalties on the linear weights and on the latent vectors, >= 0, applied (lazily) to
        the rows a sample touches.
    init_std
        Standard deviation of a new feature's latent vector, >= 0. The vector is drawn from a
        hash of (``seed``, feature key), never from arrival order: seeded runs are bit-for-bit
        reproducible and replicas initialise a feature identically.
    clip_gradient
        Each gradient component is clipped to ``[-clip_gradient, clip_gradient]``, > 0.
    max_features
        Keep at most this many features (``None``: unbounded). When full, the least recently
        updated 1/64 of the rows is evicted at once (amortised O(1) per insertion).
    min_count
        A feature is stored only once seen in this many learned samples (1: at once). Sightings
        of not-yet-admitted keys are counted in a table of at most ``admission_capacity`` keys;
        when it fills up, the older half is forgotten.
    admission_capacity
        Bound of the admission counting table, >= 1.
    hash_bits
        If set (1 to 30), features are hashed (CRC-32, seeded) into ``2**hash_bits`` rows that
        are allocated up front: fixed memory, no keys stored, collisions share a row.
    seed
        Seed for the latent initialisation (and the hash), an int >= 0.

    Attributes
    ----------
    samples_seen
        Samples learned (including those whose update was skipped).
    n_features
        Features with a trained row (hashing mode: rows trained at least once).
    n_evicted, n_rejected, n_skipped
        Rows evicted by ``max_features``; sightings of features not (yet) admitted by
        ``min_count``; updates skipped because they would have left NaN/inf in the model.

    Examples
    --------
    >>> from stream_fm import SparseFM
    >>> m = SparseFM(n_factors=4, seed=0)
    >>> for _ in range(30):
    ...     m.learn_one({"user": "alice", "ad": "shoes"}, True)
    ...     m.learn_one({"user": "alice", "ad": "cars"}, False)
    >>> m.predict_one({"user": "alice", "ad": "shoes"}), m.predict_one({"user": "alice", "ad": "cars"})
    (True, False)
    >>> m.samples_seen, m.n_features
    (60, 3)
    """

    def __init__(
        self,
        n_factors: int = 8,
        optimizer: str = "adagrad",
        learning_rate: float = 0.06,
        l2_w: float = 0.0,
        l2_v: float = 1e-4,
        init_std: float = 0.01,
        clip_gradient: float = 100.0,
        max_features: int | None = None,
        min_count: int = 1,
        admission_capacity: int = 1_000_000,
        hash_bits: int | None = None,
        seed: int = 0,
    ) -> None:
        self.n_factors = _check_int("n_factors", n_factors, 1, 256)
        if optimizer not in _OPTIMIZERS:
            raise ConfigError("optimizer", optimizer, f"one of {sorted(_OPTIMIZERS)}")
        self.optimizer = optimizer
        self.learning_rate = _check_float("learning_rate", learning_rate, positive=True)
        self.l2_w = _check_float("l2_w", l2_w)
        self.l2_v = _check_float("l2_v", l2_v)
        self.init_std = _check_float("init_std", init_std)
        self.clip_gradient = _check_float("clip_gradient", clip_gradient, positive=True)
        self.max_features = None if max_features is None else _check_int("max_features", max_features, 1)
        self.min_count = _check_int("min_count", min_count, 1)
        self.admission_capacity = _check_int("admission_capacity", admission_capacity, 1)
        self.hash_bits = None if hash_bits is None else _check_int("hash_bits", hash_bits, 1, 30)
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        if self.hash_bits is not None and (self.max_features is not None or self.min_count > 1):
            raise ConfigError(
                "hash_bits",
                hash_bits,
                "None when max_features or min_count > 1 is set (hashing already fixes memory)",
            )

        self._opt = _OPTIMIZERS[optimizer]
        self._hp = np.array([self.learning_rate, self.l2_w, self.l2_v, self.clip_gradient, _ADAGRAD_EPS])
        self._seed64 = np.uint64(self.seed)
        self._bucket = None if self.hash_bits is None else bucket_lookup(self.seed, self.hash_bits)
        self._counts = np.zeros(2, np.int64)  # [skipped, newly trained rows]: written by kernels
        self.samples_seen = 0
        self.n_evicted = 0
        self.n_rejected = 0
        self._bias = np.zeros(2)  # [w0, AdaGrad accumulator of w0]
        self._index = KeyIndex()
        # keys given rows but not yet in the index nor initialised (``_init_new`` does both)
        self._fresh: dict[str, int] = {}
        self._free: list[int] = []
        self._pending: dict[str, int] = {}  # min_count admission: key -> sightings so far
        # The per-sample path: the encoding of the last sample predicted, reused by learn_one
        # when the caller then learns that same, unchanged dict (progressive validation, the
        # worker's pattern), while the index is unchanged (``_generation`` counts its changes).
        self._recent: tuple[Any, ...] | None = None
        self._generation = 0
        self._one_offsets = np.zeros(2, np.int64)
        self._one_label = np.zeros(1)
        self._one_out = np.zeros(1)
        if self.hash_bits is None:
            self._n_rows = 0
            self._alloc(1024)
        else:
            self._n_rows = 1 << self.hash_bits
            self._alloc(self._n_rows)
            buckets = np.arange(self._n_rows, dtype=np.int64)
            # a bucket's vector is drawn from (seed, bucket number), as a key's is from (seed, key)
            seeds = _kernels.bucket_seeds(self._n_rows, self._seed64)
            _kernels.init_rows(self._V, buckets, seeds, self.init_std)

    # ------------------------------------------------------------------ public API

    @property
    def n_skipped(self) -> int:
        return int(self._counts[0])

    @property
    def n_features(self) -> int:
        if self.hash_bits is None:
            return len(self._index) + len(self._fresh)
        return int(self._counts[1])

    @property
    def n_rows(self) -> int:
        """Parameter rows in use or free (the size of a state capture)."""
        return self._n_rows

    @property
    def w0(self) -> float:
        """The intercept."""
        return float(self._bias[0])

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the parameter slabs, the key index and the admission table (estimate)."""
        arrays = sum(a.nbytes for a in (self._w, self._V, self._gw, self._gV, self._last))
        return arrays + self._index.nbytes + sys.getsizeof(self._free) + sys.getsizeof(self._pending)

    def initial_latent(self, key: str) -> np.ndarray:
        """The latent vector feature ``key`` starts from: a function of (seed, key) alone."""
        out = np.zeros((1, self.n_factors))
        seeds = _kernels.key_seeds(*encode_keys([key]), self._seed64)
        _kernels.init_rows(out, np.zeros(1, np.int64), seeds, self.init_std)
        return out[0]

    def predict_proba_one(self, x: Mapping[str, Any], **kwargs: Any) -> dict[bool, float]:
        """``{False: 1 - p, True: p}``. Pure: unseen features contribute 0 and nothing is stored."""
        rows, vals, _ = self._encode_one(x)
        p = _kernels.predict_one(rows, vals, self._bias, self._w, self._V, self._last)
        return {False: 1.0 - p, True: p}

    def predict_one(self, x: Mapping[str, Any], **kwargs: Any) -> bool:
        return self.predict_proba_one(x)[True] > 0.5

    def predict_proba_batch(self, xs: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities for many samples at once (same numbers as ``predict_proba_one``)."""
        return self._predict_encoded(self._encode(xs))

    def learn_one(self, x: Mapping[str, Any], y: Any) -> None:
        """Update the model with one sample. Returns None, as river's estimators do."""
        label = _label(y)
        rows, vals, misses = self._encode_one(x)
        self._recent = None  # the rows are about to change
        if misses:
            # one sample: nothing before it to train when an eviction needs a flush
            self._insert_missing(rows, [0, len(rows)], misses, lambda stop: None)
        self._one_offsets[1] = len(rows)
        self._one_label[0] = label
        self._train(rows, vals, self._one_offsets, self._one_label, self._one_out, 0, 1)

    def learn_batch(self, xs: Sequence[Mapping[str, Any]], ys: Iterable[Any]) -> np.ndarray:
        """Learn samples in order; return each one's probability predicted *before* its update.

        The same sequential semantics and the same numbers, bit for bit, as a loop of
        ``predict_proba_one`` + ``learn_one``. A bad sample raises before anything is learned.
        """
        xs = xs if isinstance(xs, Sequence) else list(xs)
        labels = _labels(ys, len(xs))  # checked before anything changes
        return self._learn_encoded(self._encode(xs, learning=True), labels)

    # ------------------------------------------------------------------ encoding

    def _encode(self, xs: Iterable[Mapping[str, Any]], learning: bool = False) -> _Encoded:
        """Encode a batch: absent keys get row -1 and are listed in ``misses``; but ``learning``
        while every key is admitted and none evicted, absent keys get new rows at once."""
        unbounded = self.max_features is None and self.min_count <= 1
        if learning and unbounded and self._bucket is None and not self._free:
            keys, vals, offsets, _ = encode_batch(xs, None)
            return self._add_keys(keys), vals, offsets, []
        return encode_rows(xs, self._index, self._bucket)

    def _encode_one(self, x: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """One sample as (rows, x values, misses), without ``_encode``'s batch bookkeeping.

        The result is remembered: asked again for the same dict, still equal to a copy taken now
        and with the index unchanged since, it is returned without encoding again. The copy holds
        copies of the dict's lists (multi-hot values), so a list changed in place is seen too.
        """
        recent = self._recent
        if (
            recent is not None
            and recent[0] is x
            and recent[1] == self._generation
            and x == recent[2]  # the same values (a list value: the same list object) ...
            and recent[6] == recent[7]  # ... and each list value still as it was
        ):
            return recent[3], recent[4], recent[5]
        r, v, misses, lists = encode_rows_one(x, self._index, self._bucket)
        if type(x) is dict:
            self._recent = (x, self._generation, x.copy(), r, v, misses, lists, [a[:] for a in lists])
        else:
            self._recent = None
        return r, v, misses

    # ------------------------------------------------------------------ prediction

    def _predict_encoded(self, encoded: _Encoded) -> np.ndarray:
        rows, vals, offsets, _ = encoded
        out = np.empty(len(offsets) - 1)
        _kernels.predict(
            np.array(rows, np.int64),
            np.array(vals, np.float64),
            np.array(offsets, np.int64),
            self._bias,
            self._w,
            self._V,
            self._last,
            out,
        )
        return out

    # ------------------------------------------------------------------ learning

    def _learn_encoded(self, encoded: _Encoded, labels: np.ndarray) -> np.ndarray:
        rows, vals, offsets, misses = encoded
        n = len(offsets) - 1
        out = np.empty(n)
        vals_a = np.array(vals, np.float64)
        offs_a = np.array(offsets, np.int64)
        done = 0  # samples [0, done) are trained

        def train_until(stop: int) -> None:
            nonlocal done
            if stop > done:
                self._train(rows, vals_a, offs_a, labels, out, done, stop)
                done = stop

        if misses:
            self._insert_missing(rows, offsets, misses, train_until)
        train_until(n)
        return out

    def _train(
        self,
        rows: list[int] | np.ndarray,
        vals: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        out: np.ndarray,
        start: int,
        stop: int,
    ) -> None:
        if start == 0 and stop == len(offsets) - 1:  # the whole batch: no slicing (nor a copy)
            r, v, o, lab, o_ = np.asarray(rows, np.int64), vals, offsets, labels, out
        else:
            a, b = offsets[start], offsets[stop]
            r, v, o = np.array(rows[a:b], np.int64), vals[a:b], offsets[start : stop + 1] - a
            lab, o_ = labels[start:stop], out[start:stop]
        _kernels.learn(
            r, v, o, lab, self.samples_seen, self._opt, self._hp, self._bias,
            self._w, self._V, self._gw, self._gV, self._last, o_, self._counts,
        )  # fmt: skip
        self.samples_seen += stop - start

    def _insert_missing(
        self,
        rows: list[int] | np.ndarray,
        offsets: list[int],
        misses: list[tuple[int, str]],
        train_until: Callable[[int], None],
    ) -> None:
        """Give rows to the keys the index lacks, in sample order (admission, eviction).

        A missing key was absent when the batch was encoded, so if it has a row now, that row
        was given out by this call: ``added`` (key -> row) is the only place to look."""
        if self.max_features is None and self.min_count <= 1:
            # unbounded: every key is admitted and nothing is evicted, so no flush is needed
            if not self._free:  # new rows in one compiled pass: a cold batch repeats its new keys
                keys = [key for _, key in misses]
                added = self._add_keys(keys).tolist()
                for (j, _), row in zip(misses, added, strict=True):
                    rows[j] = row
                self._index.remember(keys, added)
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

    def _add_keys(self, keys: list[str]) -> np.ndarray:
        """The rows of ``keys`` when every key is admitted and none evicted (unbounded, no free
        row): the absent ones get new rows in order of first appearance, as ``_new_row`` gives
        them, in one compiled pass that also starts them afresh (``_add_rows``)."""
        data, lengths = pack_keys(keys)
        rows = np.empty(len(keys), np.int64)
        first = next_row = self._n_rows
        done = 0
        while True:
            done, next_row = _add_rows(
                data, lengths, done, next_row, self._w.shape[0], rows, *self._index.add_args,
                self._seed64, self.init_std, self._w, self._V, self._gw, self._gV, self._last,
            )  # fmt: skip
            if done == len(keys):
                break
            # out of room: grow what is short (the first call of a batch finds it, then one more)
            if next_row == self._w.shape[0]:
                self._alloc(2 * self._w.shape[0])
            left = len(keys) - done
            self._index.make_room(left, len(data), min(next_row + left, self._w.shape[0]))
        if next_row > first:
            self._n_rows = next_row
            self._generation += 1
        return rows

    def _new_row(self, key: str) -> int:
        """Give ``key`` a row; ``_init_new`` enters it in the index and sets its parameters."""
        self._generation += 1
        if self._free:
            row = self._free.pop()
        else:
            row = self._n_rows
            if row == self._w.shape[0]:
                self._alloc(2 * row)
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
        self._generation += 1
        self.n_evicted += len(evicted)
        return evicted

    def _alloc(self, capacity: int) -> None:
        """Grow (or create) the parameter slabs to ``capacity`` rows, keeping their contents."""
        k = self.n_factors
        adagrad = self._opt == _kernels.OPT_ADAGRAD
        old = getattr(self, "_w", None)
        n_old = 0 if old is None else old.shape[0]

        def grow(a: np.ndarray | None, shape: tuple[int, ...], fill: float) -> np.ndarray:
            new = np.full(shape, fill, dtype=np.float64 if fill != _UNTOUCHED else np.int64)
            if a is not None and a.shape[0]:
                new[:n_old] = a
            return new

        self._w = grow(old, (capacity,), 0.0)
        self._V = grow(getattr(self, "_V", None), (capacity, k), 0.0)
        self._gw = grow(getattr(self, "_gw", None), (capacity if adagrad else 0,), 0.0)
        self._gV = grow(getattr(self, "_gV", None), (capacity if adagrad else 0, k), 0.0)
        self._last = grow(getattr(self, "_last", None), (capacity,), _UNTOUCHED)

    # ------------------------------------------------------------------ state export / import

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able."""
        return {name: getattr(self, name) for name in _PARAMS}

    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to continue learning bit for bit: named arrays plus a JSON-able dict.

        No pickle: arrays are plain numeric ``ndarray``s; feature keys are stored as their UTF-8
        bytes (``surrogatepass``) back to back plus offsets, so any string round-trips exactly.
        The returned arrays are copies, safe to hand to another thread.
        """
        return self.capture_state().materialize()

    def capture_state(self, buffers: dict[str, np.ndarray] | None = None) -> StateCapture:
        """The fast half of :meth:`export_state`: a consistent copy of the state, taken while the
        caller holds the model still (parameter arrays copied, key strings referenced: they are
        immutable). ``materialize()`` does the rest and may run on another thread.

        ``buffers`` (name -> array, owned by the caller and filled in here) lets a periodic
        writer copy into memory it already holds: copying into fresh memory costs a page fault
        per 4 KiB, several times the copy itself. The arrays returned are then views into those
        buffers, valid until the next capture into them.
        """
        n = self._n_rows
        arrays = {"bias": self._bias.copy(), "free": np.array(self._free, np.int64)}
        for name, (a, count) in self._captured(n).items():
            arrays[name] = _copy_rows(a, count, buffers, name)
        keys = None
        if self.hash_bits is None:  # the index's arrays, gathered into keys by materialize()
            keys = tuple(arrays.pop(name) for name in ("key_start", "key_length", "key_arena"))
        meta = {
            "class": type(self).__name__,
            "state_format": _STATE_FORMAT,
            "config": self.get_config(),
            "samples_seen": self.samples_seen,
            "n_features": self.n_features,
            "n_rows": n,
            "n_evicted": self.n_evicted,
            "n_rejected": self.n_rejected,
            "n_skipped": self.n_skipped,
            "n_trained_rows": int(self._counts[1]),
        }
        return StateCapture(arrays, meta, keys, list(self._pending.items()))

    def reserve_buffers(self, buffers: dict[str, np.ndarray]) -> int:
        """Grow ``buffers`` for :meth:`capture_state` ahead of need, touching every page.

        A periodic writer calls this on its own thread between snapshots, so that the capture on
        the learner's thread is a plain copy, never a page fault. Returns the row count up to
        which the buffers fit.
        """
        n = self._n_rows
        for name, (a, count) in self._captured(n).items():
            target = count + count // 4 + 1024
            buf = buffers.get(name)
            if buf is None or buf.shape[0] < target or buf.shape[1:] != a.shape[1:] or buf.dtype != a.dtype:
                buf = np.zeros((target, *a.shape[1:]), a.dtype)
                buf.fill(0)  # np.zeros maps lazily: write every page now
                buffers[name] = buf
        return min(buffers[name].shape[0] for name in ("w", "V", "last"))

    def _captured(self, n: int) -> dict[str, tuple[np.ndarray, int]]:
        """The arrays a state capture copies, by name, each with the length of its prefix in
        use: the per-row parameter arrays (``n`` rows) and the key index's."""
        arrays = {"w": (self._w, n), "V": (self._V, n), "last": (self._last, n)}
        if self._gw.shape[0]:
            arrays.update(gw=(self._gw, n), gV=(self._gV, n))
        if self.hash_bits is None:
            arrays.update(self._index.parts(n))
        return arrays

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> SparseFM:
        """Rebuild a model from :meth:`export_state` output (arrays may be read-only/memory-mapped)."""
        if meta.get("class") != cls.__name__ or meta.get("state_format") != _STATE_FORMAT:
            raise ConfigError(
                "state_format",
                (meta.get("class"), meta.get("state_format")),
                f"({cls.__name__!r}, {_STATE_FORMAT})",
            )
        model = cls(**meta["config"])
        n = int(meta["n_rows"])
        k = model.n_factors
        expect = {"bias": (2,), "w": (n,), "V": (n, k), "last": (n,)}
        if model._gw.shape[0]:
            expect.update(gw=(n,), gV=(n, k))
        for name, shape in expect.items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = None if name not in arrays else tuple(arrays[name].shape)
                raise ConfigError(f"state array {name!r}", got, f"shape {shape}")
        if model.hash_bits is None:
            model._alloc(max(1024, n))
        model._n_rows = n
        model._bias[:] = arrays["bias"]
        model._w[:n] = arrays["w"]
        model._V[:n] = arrays["V"]
        model._last[:n] = arrays["last"]
        if model._gw.shape[0]:
            model._gw[:n] = arrays["gw"]
            model._gV[:n] = arrays["gV"]
        model._free = [int(r) for r in arrays["free"]]
        if model.hash_bits is None:
            model._index = KeyIndex.from_keys(arrays["key_bytes"], arrays["key_offsets"], model._free)
        if "pending_counts" in arrays:
            pending = decode_keys(arrays["pending_key_bytes"], arrays["pending_key_offsets"])
            model._pending = dict(zip(pending, arrays["pending_counts"].tolist(), strict=True))
        model.samples_seen = int(meta["samples_seen"])
        model.n_evicted = int(meta["n_evicted"])
        model.n_rejected = int(meta["n_rejected"])
        model._counts[:] = [int(meta["n_skipped"]), int(meta["n_trained_rows"])]
        return model

    # river: parameters for clone() / repr
    @classmethod
    def _unit_test_params(cls):
        yield {"seed": 42}


_PARAMS = (
    "n_factors",
    "optimizer",
    "learning_rate",
    "l2_w",
    "l2_v",
    "init_std",
    "clip_gradient",
    "max_features",
    "min_count",
    "admission_capacity",
    "hash_bits",
    "seed",
)


class StateCapture:
    """A model's state copied at one instant (:meth:`SparseFM.capture_state`)."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        keys: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        pending: list[tuple[str, int]],
    ) -> None:
        self.arrays, self.meta, self._keys, self._pending = arrays, meta, keys, pending

    def materialize(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta) as :meth:`SparseFM.export_state` returns them: keys encoded to bytes."""
        arrays = dict(self.arrays)
        if self._keys is not None:
            arrays["key_bytes"], arrays["key_offsets"] = gather_keys(*self._keys)
        if self._pending:
            arrays["pending_key_bytes"], arrays["pending_key_offsets"] = encode_keys(
                k for k, _ in self._pending
            )
            arrays["pending_counts"] = np.array([c for _, c in self._pending], np.int64)
        return arrays, dict(self.meta)


@nb.njit(cache=True, error_model="numpy")
def _add_rows(data, lengths, done, next_row, row_stop, out, salt, table, start, length, tag, arena, sizes,
              seed, std, w, V, gw, gV, last):  # fmt: skip
    """:func:`~stream_fm.keyindex.add_keys`, then the new rows started afresh: one call for the
    two, as new keys arrive a few at a time."""
    first = next_row
    done, next_row = add_keys(
        data, lengths, done, next_row, row_stop, out, salt, table, start, length, tag, arena, sizes
    )
    if next_row > first:
        _kernels.reset_rows(np.arange(first, next_row), start, length, arena, seed, std, w, V, gw, gV, last)
    return done, next_row


def encode_rows(
    xs: Iterable[Mapping[str, Any]], index: KeyIndex, bucket: Callable[[str], int] | None
) -> _Encoded:
    """Feature dicts -> (rows, x values, CSR offsets, misses): keys are parsed in Python, then
    looked up in ``index`` all at once (or hashed by ``bucket``, if given); ``misses`` are the
    (position, key) of the keys absent (row -1)."""
    if bucket is not None:
        return encode_batch(xs, bucket)
    keys, vals, offsets, _ = encode_batch(xs, None)
    rows, absent = index.lookup(keys)
    return rows, vals, offsets, [(j, keys[j]) for j in absent]


def encode_rows_one(
    x: Mapping[str, Any], index: KeyIndex, bucket: Callable[[str], int] | None
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]], list[list[Any]]]:
    """One sample as :func:`encode_rows` makes it, in arrays, and its list values; its keys are
    looked up in the index's cache as they are parsed, only the rest in the index."""
    rows: list[int] = []
    vals: list[float] = []
    misses: list[tuple[int, str]] = []
    lists = encode_into(x, index.cached.get if bucket is None else bucket, rows, vals, misses)
    if misses:
        misses = index.resolve(rows, misses)
    return np.array(rows, np.int64), np.array(vals, np.float64), misses, lists


def bucket_lookup(seed: int, hash_bits: int) -> Callable[[str], int]:
    """Hashing mode's key -> row: CRC-32 of the key's UTF-8 bytes, started from the CRC-32 of the
    seed (8 bytes, little-endian), keeping the low ``hash_bits`` bits."""
    salt = zlib.crc32(seed.to_bytes(8, "little"))
    mask = (1 << hash_bits) - 1

    def bucket(key: str) -> int:
        return zlib.crc32(key.encode("utf-8", "surrogatepass"), salt) & mask

    return bucket


def _copy_rows(a: np.ndarray, n: int, buffers: dict[str, np.ndarray] | None, name: str) -> np.ndarray:
    """``a[:n].copy()``, into ``buffers[name]`` when given (grown with a quarter of headroom)."""
    if buffers is None:
        return a[:n].copy()
    buf = buffers.get(name)
    if buf is None or buf.shape[0] < n or buf.shape[1:] != a.shape[1:] or buf.dtype != a.dtype:
        buf = buffers[name] = np.empty((n + n // 4 + 1024, *a.shape[1:]), a.dtype)
    out = buf[:n]
    np.copyto(out, a[:n])
    return out


def _label(y: Any) -> float:
    if y is True or y == 1:
        return 1.0
    if y is False or y == 0:
        return 0.0
    raise LabelError(y)


def _labels(ys: Iterable[Any], n: int) -> np.ndarray:
    labels = np.array([_label(y) for y in ys], np.float64)
    if labels.shape[0] != n:
        raise LabelError(f"{labels.shape[0]} labels for {n} samples")
    return labels


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(name, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(name, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    return int(value)


def _check_float(name: str, value: Any, positive: bool = False) -> float:
    allowed = "a finite number " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(name, value, allowed)
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(name, value, allowed)
    return v
