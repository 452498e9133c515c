"""SparseFM: an online degree-2 factorization machine for click-through rate, keyed by feature.

Parameters live in growable numpy slabs (``w``, ``V`` and the optimizer's state), one row per
feature; a :class:`~stream_fm.keyindex.KeyIndex` maps each feature key (``"ad=a17"``) to its row.
Samples are encoded in C (``_encode.c``); the Python side manages rows; the arithmetic runs in
compiled kernels (``_kernels.py``). One sample at a time goes from the C encoder to the kernels
directly (``fastpath.py``): no Python call in between.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from river import base

from stream_fm import _encode, _kernels, fastpath
from stream_fm.errors import ConfigError, LabelError
from stream_fm.features import encode_batch
from stream_fm.keyindex import KeyIndex, decode_keys, encode_keys, gather_keys, keys_at, pack_keys

__all__ = ["SparseFM", "StateCapture", "encode_rows"]

_OPTIMIZERS = {"sgd": _kernels.OPT_SGD, "adagrad": _kernels.OPT_ADAGRAD}
_ADAGRAD_EPS = 1e-8
_STATE_FORMAT = 1
_UNTOUCHED = -1

# (rows, x values, CSR offsets, (position, key) of keys the index lacks)
_Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]


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

    A model is meant for one thread: learning while another thread predicts gives no guarantee
    about the numbers (the arrays it reads never go away under it, though). To share a model
    between threads, share a :class:`~stream_fm.serving.Predictor` of its snapshot.

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
        hp = [self.learning_rate, self.l2_w, self.l2_v, self.clip_gradient, _ADAGRAD_EPS, self.init_std]
        self._hp = np.array(hp)  # _kernels.HP_* then fastpath.HP_STD
        self._seed64 = np.uint64(self.seed)
        self._hashing = fastpath.hashing(self.seed, self.hash_bits)
        # [skipped, newly trained rows, samples seen, rows handed out]: written by kernels
        self._counts = np.zeros(4, np.int64)
        self.n_evicted = 0
        self.n_rejected = 0
        self._bias = np.zeros(2)  # [w0, AdaGrad accumulator of w0]
        self._index = KeyIndex()
        # keys given rows but not yet in the index nor initialised (``_init_new`` does both)
        self._fresh: dict[str, int] = {}
        self._free: list[int] = []
        self._pending: dict[str, int] = {}  # min_count admission: key -> sightings so far
        self._new_pointer_table()  # filled by _alloc
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

    # A copy needs a pointer table of its own: the original's points at the original's arrays.
    # copy.deepcopy comes through __setstate__; river's clone(include_attributes=True) copies
    # attribute by attribute, which the per-sample methods notice (``_bound_to`` is not self).
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
        self._pointers = fastpath.pointer_table()
        self._address = self._pointers.ctypes.data
        self._bound_to = self

    # ------------------------------------------------------------------ public API

    @property
    def samples_seen(self) -> int:
        return int(self._counts[fastpath.C_SAMPLES])

    @samples_seen.setter
    def samples_seen(self, n: int) -> None:
        self._counts[fastpath.C_SAMPLES] = n

    @property
    def _n_rows(self) -> int:
        """Rows handed out: the next new key gets this row (unless a row is free)."""
        return int(self._counts[fastpath.C_ROWS])

    @_n_rows.setter
    def _n_rows(self, n: int) -> None:
        self._counts[fastpath.C_ROWS] = n

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
        if self._bound_to is not self:
            self._bind()
        p = _encode.predict_one(x, self._address)
        return {False: 1.0 - p, True: p}

    def predict_one(self, x: Mapping[str, Any], **kwargs: Any) -> bool:
        return self.predict_proba_one(x)[True] > 0.5

    def predict_proba_batch(self, xs: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities for many samples at once (same numbers as ``predict_proba_one``)."""
        return self._predict_encoded(self._encode(xs))

    def learn_one(self, x: Mapping[str, Any], y: Any) -> None:
        """Update the model with one sample. Returns None, as river's estimators do."""
        label = _label(y)
        if self._bound_to is not self:
            self._bind()
        rest = _encode.learn_one(x, label, self._address)
        if rest is not None:  # keys to admit (a bounded model) or no room left: the Python path
            rows, vals, misses = rest
            rows = np.array(rows, np.int64)
            # one sample: nothing before it to train when an eviction needs a flush
            self._insert_missing(rows, [0, len(rows)], misses, lambda stop: None)
            offsets = np.array([0, len(rows)], np.int64)
            self._train(rows, np.array(vals, np.float64), offsets, np.array([label]), np.empty(1), 0, 1)

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
        if learning and self._pointers[fastpath.M_MODE] == fastpath.MODE_ADD:
            data, lengths, vals, offsets = encode_batch(xs)
            return self._add_keys(data, lengths), vals, offsets, []
        return encode_rows(xs, self._index, self._hashing)

    # ------------------------------------------------------------------ prediction

    def _predict_encoded(self, encoded: _Encoded) -> np.ndarray:
        rows, vals, offsets, _ = encoded
        out = np.empty(len(offsets) - 1)
        _kernels.predict(
            np.asarray(rows, np.int64),
            vals,
            offsets,
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
        done = 0  # samples [0, done) are trained

        def train_until(stop: int) -> None:
            nonlocal done
            if stop > done:
                self._train(rows, vals, offsets, labels, out, done, stop)
                done = stop

        if misses:
            self._insert_missing(rows, offsets, misses, train_until)
        train_until(n)
        return out

    def _train(
        self,
        rows: np.ndarray,
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
                self._alloc(_grown(self._w.shape[0]))
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
                self._alloc(_grown(row))
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
        adagrad = self._opt == _kernels.OPT_ADAGRAD
        # the old arrays stay alive until the pointer table no longer points at them
        olds = [getattr(self, name, None) for name in ("_w", "_V", "_gw", "_gV", "_last")]
        n_old = 0 if olds[0] is None else olds[0].shape[0]

        def grow(a: np.ndarray | None, shape: tuple[int, ...], fill: float) -> np.ndarray:
            new = np.full(shape, fill, dtype=np.float64 if fill != _UNTOUCHED else np.int64)
            if a is not None and a.shape[0]:
                new[:n_old] = a
            return new

        rows, factors = (capacity,), (capacity, k)
        shapes = (rows, factors, rows if adagrad else (0,), factors if adagrad else (0, k), rows)
        fills = (0.0, 0.0, 0.0, 0.0, _UNTOUCHED)
        self._w, self._V, self._gw, self._gV, self._last = map(grow, olds, shapes, fills)
        self._publish()
        del olds

    def _publish(self) -> None:
        """Point the per-sample kernels at the current arrays (after any of them changes) and
        tell them how to find rows: adding absent keys themselves only while every key is
        admitted and none evicted (else ``learn_one`` takes the Python path for new keys)."""
        if self.hash_bits is not None:
            mode = fastpath.MODE_HASH
        elif self.max_features is None and self.min_count <= 1 and not self._free:
            mode = fastpath.MODE_ADD
        else:
            mode = fastpath.MODE_LOOKUP
        fastpath.publish(
            self._pointers, bias=self._bias, w=self._w, V=self._V, gw=self._gw, gV=self._gV, last=self._last,
            counts=self._counts, hp=self._hp, index=self._index, opt=self._opt, mode=mode, seed=self.seed,
            hash_bits=self.hash_bits,
        )  # fmt: skip

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
        model._counts[:2] = [int(meta["n_skipped"]), int(meta["n_trained_rows"])]
        model._publish()  # a new index, free rows
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


def encode_rows(
    xs: Iterable[Mapping[str, Any]], index: KeyIndex, hashing: tuple[int, int] | None
) -> _Encoded:
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


def _grown(capacity: int) -> int:
    """The next capacity of the parameter slabs: half as much again (amortised O(1) growth that
    leaves at most a third of the memory unused, where doubling may leave half)."""
    return capacity + capacity // 2


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
