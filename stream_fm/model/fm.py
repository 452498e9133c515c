"""SparseFM: an online degree-2 factorization machine for click-through rate, keyed by feature.

Parameters live in growable numpy slabs (``w``, ``V`` and the optimizer's state), one row per
feature; a :class:`~stream_fm.model.keyindex.KeyIndex` maps each feature key (``"ad=a17"``) to its row.
Samples are encoded in C (``_encode.c``); the Python side manages rows; the arithmetic runs in
compiled kernels (``_kernels.py``). One sample at a time goes from the C encoder to the kernels
directly (``fastpath.py``): no Python call in between.

The class is assembled from parts, each in a module named for what it holds: :mod:`rows` (the
slabs, admission and eviction), :mod:`state` (export and import), :mod:`fastpath` (the pointer
table of the per-sample kernels); this module holds the public API and the learning loop.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from river import base

from stream_fm import _encode
from stream_fm.errors import ConfigError
from stream_fm.model import _kernels, checks, fastpath, updates
from stream_fm.model.features import encode_batch
from stream_fm.model.keyindex import KeyIndex, encode_keys
from stream_fm.model.rows import Encoded, Rows, encode_rows
from stream_fm.model.state import StateCapture, StateIO

__all__ = ["SparseFM", "StateCapture", "encode_rows"]

_DEFAULT_RATES = {"normalized": 2.0, "adagrad": 0.06, "sgd": 0.06}
_DEFAULT_BIAS_RATE = 1.5
_DEFAULT_FACTOR_RATE = 1.0


class SparseFM(Rows, StateIO, fastpath.Bound, base.Classifier):
    """Online factorization machine for binary labels (clicks), trained by per-sample SGD.

    The model (Rendle, 2010) is ``y_hat = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j``,
    computed in O(k * nnz) over the sample's non-zero features, and ``p = sigma(y_hat)`` (with
    ``calibrate``: of y_hat's parts under gains fitted online). Each sample descends the log
    loss once, in arrival order.

    Parameters
    ----------
    n_factors
        Dimension k of the latent vectors. 1 to 256.
    optimizer
        ``"normalized"`` (the default: AdaGrad invariant to the unit of each numeric feature and
        to the number of features per sample, with accumulators that start at
        ``initial_accumulator`` and a bias of its own rate; see :mod:`stream_fm.model.updates`),
        ``"adagrad"`` (a per-parameter rate ``learning_rate / sqrt(sum g^2)``) or ``"sgd"`` (a
        constant rate: the reference's algorithm).
    learning_rate
        Step size of the linear weights, > 0. None: the optimizer's own (2.0 normalized, 0.06
        adagrad and sgd).
    bias_learning_rate
        The normalized optimizer's step size for the bias, > 0. None: 1.5 for normalized (the
        other optimizers step the bias with ``learning_rate``).
    factor_learning_rate
        Step size of the latent vectors, > 0. None: 1.0 for normalized, ``learning_rate`` for
        the others.
    initial_accumulator
        The normalized optimizer's accumulators start here, >= 0: a feature's first steps are
        ``learning_rate * g / sqrt(initial_accumulator + g^2)``, measured rather than full.
    calibrate
        Report ``sigma(c_0 * w0 + c_lin * linear part + c_pair * pairwise part + c_off)``, the
        four numbers fitted online to the reports (see :mod:`stream_fm.model.updates`). None: on with
        ``"normalized"``, off with the others (whose reports are then the textbook sigma(y_hat)).
    center
        The normalized optimizer learns each feature's weight as if the feature were centred on
        its running mean (the intercept takes the other side of each step): a number far from 0
        (an age, a price) no longer drags the intercept with it; an indicator's mean is its
        frequency. None: on with ``"normalized"``.
    average_intercept
        Report with an average of w0 over the samples learned (the t-th weighing t) instead of
        w0 itself: the intercept's steps, large next to a rare click, no longer move
        every report. None: on with ``calibrate``.
    nonnegative_gains
        The calibration's gains on w0 and on the two parts stop at 0 rather than turn a part the
        model learned upside down (a part that carries noise gets 0). None: on with ``calibrate``.
    dense_factors
        The latent vectors of a feature in 20% or more of the samples so far start from 1/8 of
        ``initial_accumulator`` (5% or less: all of it): their first gradients are small, and
        the full damping, meant for a rare id, holds them back. None: on with ``"normalized"``.
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
    between threads, share a :class:`~stream_fm.serve.serving.Predictor` of its snapshot.

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
        optimizer: str = "normalized",
        learning_rate: float | None = None,
        bias_learning_rate: float | None = None,
        factor_learning_rate: float | None = None,
        initial_accumulator: float = 0.5,
        calibrate: bool | None = None,
        center: bool | None = None,
        average_intercept: bool | None = None,
        nonnegative_gains: bool | None = None,
        dense_factors: bool | None = None,
        l2_w: float = 0.0,
        l2_v: float = 1e-4,
        init_std: float = 0.02,
        clip_gradient: float = 100.0,
        max_features: int | None = None,
        min_count: int = 1,
        admission_capacity: int = 1_000_000,
        hash_bits: int | None = None,
        seed: int = 0,
    ) -> None:
        self.n_factors = checks.check_int("n_factors", n_factors, 1, 256)
        if optimizer not in updates.OPTIMIZERS:
            raise ConfigError("optimizer", optimizer, f"one of {sorted(updates.OPTIMIZERS)}")
        self.optimizer = optimizer
        if learning_rate is None:  # each optimizer's own scale
            learning_rate = _DEFAULT_RATES[optimizer]
        self.learning_rate = checks.check_float("learning_rate", learning_rate, positive=True)
        if bias_learning_rate is None:
            bias_learning_rate = _DEFAULT_BIAS_RATE if optimizer == "normalized" else self.learning_rate
        self.bias_learning_rate = checks.check_float("bias_learning_rate", bias_learning_rate, positive=True)
        if factor_learning_rate is None:
            factor_learning_rate = _DEFAULT_FACTOR_RATE if optimizer == "normalized" else self.learning_rate
        self.factor_learning_rate = checks.check_float(
            "factor_learning_rate", factor_learning_rate, positive=True
        )
        self.initial_accumulator = checks.check_float("initial_accumulator", initial_accumulator)
        normalized = optimizer == "normalized"
        switch = checks.check_switch
        self.calibrate = switch("calibrate", calibrate, normalized, "on with normalized")
        self.center = switch("center", center, normalized, "on with normalized")
        cal = self.calibrate  # the calibration's refinements are on with it
        self.average_intercept = switch("average_intercept", average_intercept, cal, "on with calibrate")
        self.nonnegative_gains = switch("nonnegative_gains", nonnegative_gains, cal, "on with calibrate")
        self.dense_factors = switch("dense_factors", dense_factors, normalized, "on with normalized")
        self.l2_w = checks.check_float("l2_w", l2_w)
        self.l2_v = checks.check_float("l2_v", l2_v)
        self.init_std = checks.check_float("init_std", init_std)
        self.clip_gradient = checks.check_float("clip_gradient", clip_gradient, positive=True)
        self.max_features = (
            None if max_features is None else checks.check_int("max_features", max_features, 1)
        )
        self.min_count = checks.check_int("min_count", min_count, 1)
        self.admission_capacity = checks.check_int("admission_capacity", admission_capacity, 1)
        self.hash_bits = None if hash_bits is None else checks.check_int("hash_bits", hash_bits, 1, 30)
        self.seed = checks.check_int("seed", seed, 0, 2**63 - 1)
        if self.hash_bits is not None and (self.max_features is not None or self.min_count > 1):
            raise ConfigError(
                "hash_bits",
                hash_bits,
                "None when max_features or min_count > 1 is set (hashing already fixes memory)",
            )

        self._opt = updates.OPTIMIZERS[optimizer]
        self._hp = updates.hyperparameters(self)
        self._seed64 = np.uint64(self.seed)
        self._hashing = fastpath.hashing(self.seed, self.hash_bits)
        # [skipped, newly trained rows, samples seen, rows handed out]: written by kernels
        self._counts = np.zeros(4, np.int64)
        self.n_evicted = 0
        self.n_rejected = 0
        self._bias = _kernels.fresh_bias()  # w0 and the other dense state (_kernels.B_*)
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
    def calibration(self) -> tuple[float, float, float, float]:
        """(c_0, c_lin, c_pair, c_off): the gains on the intercept and on y_hat's linear and
        pairwise parts, and the offset, that reports go through; (1, 1, 1, 0) without
        ``calibrate``."""
        return tuple(float(v) for v in self._bias[_kernels.B_GAIN0 : _kernels.B_P])

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
        label = checks.label(y)
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
        labels = checks.labels(ys, len(xs))  # checked before anything changes
        return self._learn_encoded(self._encode(xs, learning=True), labels)

    # ------------------------------------------------------------------ encoding

    def _encode(self, xs: Iterable[Mapping[str, Any]], learning: bool = False) -> Encoded:
        """Encode a batch: absent keys get row -1 and are listed in ``misses``; but ``learning``
        while every key is admitted and none evicted, absent keys get new rows at once."""
        if learning and self._pointers[fastpath.M_MODE] == fastpath.MODE_ADD:
            data, lengths, vals, offsets = encode_batch(xs)
            return self._add_keys(data, lengths), vals, offsets, []
        return encode_rows(xs, self._index, self._hashing)

    # ------------------------------------------------------------------ prediction

    def _predict_encoded(self, encoded: Encoded) -> np.ndarray:
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

    def _learn_encoded(self, encoded: Encoded, labels: np.ndarray) -> np.ndarray:
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
        updates.learn(
            r, v, o, lab, self.samples_seen, self._opt, self._hp, self._bias,
            self._w, self._V, self._gw, self._gV, self._last, o_, self._counts,
        )  # fmt: skip
        self.samples_seen += stop - start

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able."""
        return {name: getattr(self, name) for name in _PARAMS}

    @classmethod
    def _unit_test_params(cls):
        yield {"seed": 42}


# the constructor's arguments, in its order
_PARAMS = ("n_factors", "optimizer", "learning_rate", "bias_learning_rate", "factor_learning_rate",
           "initial_accumulator", "calibrate", "center", "average_intercept", "nonnegative_gains",
           "dense_factors", "l2_w", "l2_v", "init_std", "clip_gradient", "max_features",
           "min_count", "admission_capacity", "hash_bits", "seed")  # fmt: skip
