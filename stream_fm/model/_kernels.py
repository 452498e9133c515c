"""Compiled inner loops of the factorization machine (numba, nopython).

Everything here works on already-encoded samples in CSR form: ``rows[offsets[s]:offsets[s+1]]`` are
the parameter rows of sample ``s`` (``-1``: a feature the model does not hold) and ``vals`` their
x values. The Python side (``model.py``) owns the key index; these kernels own the arithmetic.

Notation follows Rendle (2010) and the reference (``shared/reference``): for one sample,
``s_f = sum_i v_if x_i`` and

    y_hat = w0 + sum_i w_i x_i + 1/2 sum_f (s_f^2 - sum_i v_if^2 x_i^2)          (eq. 8)
    d y_hat / d v_if = x_i s_f - v_if x_i^2                                       (eq. 12)

and the logistic loss L = -ln sigma(y y_hat), y in {-1, +1}, is *descended*:
theta <- theta - lr * dL/dtheta with dL/dy_hat = -y (1 - sigma(y y_hat)).

What a prediction reports is the *calibrated* score
``c_0 * w0_r + (m_lin + c_lin * (lin - m_lin)) + (m_pair + c_pair * (pair - m_pair)) + c_off``
where ``lin`` and ``pair`` are the linear and pairwise sums above: four numbers learned on top of
the model (see :mod:`stream_fm.model.updates`); they are 1, 1, 1 and 0 (the plain y_hat, bit for bit)
when calibration is off. ``w0_r`` is w0, or its average over the samples learned (the t-th
weighing t; ``average_intercept``); ``m_lin`` and ``m_pair`` are the parts' running means
(``center``), or 0.

A row whose ``last`` stamp is -1 has never been trained ("untouched"): it is invisible to
prediction, and while learning the prediction reported for a sample excludes such rows, so that
``learn_batch`` reports exactly what ``predict_proba_one`` would have said before the update.
The gradient does include them: their fresh latent vectors are real parameters of y_hat.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

__all__ = [
    "BIAS_SIZE",
    "bucket_seeds",
    "fresh_bias",
    "init_rows",
    "key_seeds",
    "predict",
    "predict_one",
    "reset_rows",
]

# The model's dense state, one float64 array (``bias``): the intercept w0 and its accumulator; the
# normalized optimizer's sum of the samples' squared norms; the calibration's gains on w0, on the
# linear and on the pairwise part, its offset, and the inverse of its curvature (a symmetric 4x4,
# stored as its upper triangle row by row: 00 01 02 03 11 12 13 22 23 33); the intercept reported.
B_W0, B_ACC, B_NORMS, B_GAIN0, B_LIN, B_PAIR, B_OFF, B_P = 0, 1, 2, 3, 4, 5, 6, 7
CAL_SIZE = 4
# then the intercept the report reads: an average of w0 over the samples learned, the t-th weighing
# t (``average_intercept``), or w0 itself; then the running means of the linear and the pairwise
# parts (with ``center`` and calibration; else 0): the calibration's gains scale the parts'
# deviations from them, and the means pass at gain 1
B_W0_REPORT = B_P + CAL_SIZE * (CAL_SIZE + 1) // 2
B_LIN_MEAN, B_PAIR_MEAN = B_W0_REPORT + 1, B_W0_REPORT + 2
BIAS_SIZE = B_W0_REPORT + 3
# The calibration's prior: centred on the identity, precision 1 for the parts' gains and the
# offset, 100 for w0's gain (the intercept is already learned for the base rate; its gain only
# discounts the intercept's wandering, slowly).
CAL_PRIOR = (100.0, 1.0, 1.0, 1.0)


@nb.njit(cache=True, inline="always")
def packed(i, j):
    """Where entry (i, j) of the calibration's symmetric 4x4 sits in its upper triangle, stored
    row by row (00 01 02 03 11 12 13 22 23 33)."""
    lo, hi = (i, j) if i <= j else (j, i)
    return lo * CAL_SIZE - lo * (lo - 1) // 2 + hi - lo


def fresh_bias(old: np.ndarray | None = None) -> np.ndarray:
    """A new model's dense state: w0 = 0, calibration the identity (gains 1, offset 0) under its
    prior. ``old``: a shorter state of an earlier format, copied into the front (its reported
    intercept is its w0)."""
    bias = np.zeros(BIAS_SIZE)
    bias[B_GAIN0] = bias[B_LIN] = bias[B_PAIR] = 1.0
    diagonal = [B_P + packed(i, i) for i in range(CAL_SIZE)]
    bias[diagonal] = 1.0 / np.array(CAL_PRIOR)
    if old is not None:
        bias[: len(old)] = old
        if len(old) <= B_W0_REPORT:
            bias[B_W0_REPORT] = bias[B_W0]
    return bias


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(cache=True, error_model="numpy", inline="always")
def _splitmix64(state):
    """One step of splitmix64: returns (new state, 64 random bits)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@nb.njit(cache=True, error_model="numpy", inline="always")
def _key_seed(data, a, b, seed):
    """The 64-bit seed of the key ``data[a:b]`` (UTF-8 bytes): FNV-1a over its bytes, started from
    the model's seed (mixed by splitmix64) and finished by splitmix64. Plain integer arithmetic,
    so every machine and every replica derives the same seed for the same (seed, key)."""
    _, h = _splitmix64(seed)
    h = _FNV_OFFSET ^ h
    for i in range(a, b):
        h = (h ^ np.uint64(data[i])) * _FNV_PRIME
    _, h = _splitmix64(h)
    return h


@nb.njit(cache=True, error_model="numpy")
def key_seeds(data, offsets, seed):
    """The seed of each key ``data[offsets[i]:offsets[i + 1]]`` (see ``_key_seed``)."""
    n = offsets.shape[0] - 1
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = _key_seed(data, offsets[i], offsets[i + 1], seed)
    return out


@nb.njit(cache=True, error_model="numpy")
def init_rows(V, rows, seeds, std):
    """Fill ``V[rows[i]]`` with N(0, std) draws that depend only on ``seeds[i]``.

    The seed of a row is a hash of (model seed, feature key), so a feature's initial latent
    vector never depends on the order in which features arrive (Box-Muller over splitmix64).
    """
    k = V.shape[1]
    two_pi = 2.0 * math.pi
    for i in range(rows.shape[0]):
        r = rows[i]
        state = seeds[i]
        f = 0
        while f < k:
            state, a = _splitmix64(state)
            state, b = _splitmix64(state)
            u1 = (float(a >> np.uint64(11)) + 1.0) * (1.0 / 9007199254740992.0)  # (0, 1]
            u2 = float(b >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # [0, 1)
            radius = math.sqrt(-2.0 * math.log(u1))
            V[r, f] = std * radius * math.cos(two_pi * u2)
            if f + 1 < k:
                V[r, f + 1] = std * radius * math.sin(two_pi * u2)
            f += 2


@nb.njit(cache=True, error_model="numpy")
def reset_rows(rows, key_start, key_length, arena, seed, std, w, V, gw, gV, last):
    """Start ``rows`` afresh: w = 0, optimizer state 0, untouched, V drawn from (seed, key), the
    key of row ``r`` being ``arena[key_start[r] : key_start[r] + key_length[r]]`` (the key
    index's arrays). One call, as new keys arrive a few at a time."""
    seeds = np.empty(rows.shape[0], np.uint64)
    for i in range(rows.shape[0]):
        a = key_start[rows[i]]
        seeds[i] = _key_seed(arena, a, a + key_length[rows[i]], seed)
    init_rows(V, rows, seeds, std)
    for i in range(rows.shape[0]):
        r = rows[i]
        w[r] = 0.0
        last[r] = -1
        if gw.shape[0]:
            gw[r] = 0.0
            gV[r, :] = 0.0


@nb.njit(cache=True, error_model="numpy", inline="always")
def _sigmoid(z):
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@nb.njit(cache=True, error_model="numpy", inline="always")
def _proba(z):
    # NaN only arises when extreme inputs overflow the sums; say "no idea" rather than NaN
    if z != z:
        return 0.5
    return _sigmoid(z)


@nb.njit(cache=True, error_model="numpy")
def _scratch(offsets):
    """Per-call scratch sized for the widest sample: (width, rows, x values, new flags)."""
    width = 1
    for s in range(offsets.shape[0] - 1):
        width = max(width, offsets[s + 1] - offsets[s])
    return width, np.empty(width, np.int64), np.empty(width, np.float64), np.empty(width, np.bool_)


@nb.njit(cache=True, error_model="numpy")
def bucket_seeds(n, seed):
    """Seeds for hashing mode's ``n`` buckets: bucket b plays the part of a key, mixed with the
    model's seed by splitmix64 (computed here: a Python string per bucket would cost seconds and
    gigabytes at large ``hash_bits``)."""
    out = np.empty(n, np.uint64)
    _, start = _splitmix64(seed)
    for b in range(n):
        _, out[b] = _splitmix64(start ^ np.uint64(b))
    return out


@nb.njit(cache=True, error_model="numpy", inline="always")
def _gather(rows, vals, a, b, last, learning, out_r, out_x, out_new):
    """Copy sample entries into scratch: drop unknown rows, merge repeated rows (x summed).

    Repeats happen with multi-hot duplicates, hash collisions or colliding keys; merging them
    gives each parameter row one gradient and one optimizer step per sample.
    """
    m = 0
    for e in range(a, b):
        r = rows[e]
        if r < 0:
            continue
        untouched = last[r] == -1
        if untouched and not learning:
            continue
        x = vals[e]
        dup = -1
        for j in range(m):
            if out_r[j] == r:
                dup = j
                break
        if dup >= 0:
            out_x[dup] += x
            continue
        out_r[m] = r
        out_x[m] = x
        out_new[m] = untouched
        m += 1
    return m


@nb.njit(cache=True, error_model="numpy", inline="always")
def _score(bias, lin, pair):
    """The calibrated score of a sample whose linear and pairwise sums are ``lin``, ``pair``."""
    m_lin = bias[B_LIN_MEAN]
    m_pair = bias[B_PAIR_MEAN]
    parts = (m_lin + bias[B_LIN] * (lin - m_lin)) + (m_pair + bias[B_PAIR] * (pair - m_pair))
    return bias[B_GAIN0] * bias[B_W0_REPORT] + parts + bias[B_OFF]


@nb.njit(cache=True, error_model="numpy", inline="always")
def _parts(cr, cx, m, w, V, sums):
    """(sum_i w_i x_i, the pairwise sum of eq. 8) over scratch entries ``0..m-1``; leaves s_f in
    ``sums``."""
    k = V.shape[1]
    lin = 0.0
    sq = 0.0
    sums[:] = 0.0
    for j in range(m):
        r = cr[j]
        x = cx[j]
        lin += w[r] * x
        for f in range(k):
            vx = V[r, f] * x
            sums[f] += vx
            sq += vx * vx
    inter = 0.0
    for f in range(k):
        inter += sums[f] * sums[f]
    return lin, 0.5 * (inter - sq)


@nb.njit(cache=True, error_model="numpy")
def _parts_old(cr, cx, cnew, m, w, V):
    """``_parts`` over the entries that are not new, in the same order (a rare second pass)."""
    keep = ~cnew[:m]
    rows = cr[:m][keep]
    return _parts(rows, cx[:m][keep], rows.shape[0], w, V, np.empty(V.shape[1], np.float64))


@nb.njit(cache=True, error_model="numpy")
def predict_one(rows, vals, bias, w, V, last):
    """``predict`` for a single sample, without the output array (the per-call path)."""
    _, cr, cx, cnew = _scratch(np.array([0, rows.shape[0]], np.int64))
    m = _gather(rows, vals, 0, rows.shape[0], last, False, cr, cx, cnew)
    lin, pair = _parts(cr, cx, m, w, V, np.empty(V.shape[1], np.float64))
    return _proba(_score(bias, lin, pair))


@nb.njit(cache=True, error_model="numpy")
def predict(rows, vals, offsets, bias, w, V, last, out):
    """out[s] = sigma(y_hat(sample s)) for every sample; reads the model, never writes it."""
    k = V.shape[1]
    n = offsets.shape[0] - 1
    _, cr, cx, cnew = _scratch(offsets)
    sums = np.empty(k, np.float64)
    for s in range(n):
        m = _gather(rows, vals, offsets[s], offsets[s + 1], last, False, cr, cx, cnew)
        lin, pair = _parts(cr, cx, m, w, V, sums)
        out[s] = _proba(_score(bias, lin, pair))
