"""The update rules: one step of learning per sample, compiled (numba, nopython).

Three optimizers, chosen per model (``SparseFM(optimizer=...)``):

- ``"normalized"`` (the default): AdaGrad made invariant to the scale of each feature and to
  the number of features a sample has. Each row keeps the largest |x| seen for its feature
  (``N``, in an extra column of its factor accumulators) and learns as if x were ``x / N``: a
  price in cents and one in millions take the same steps (VW's ``--normalized``; Ross, Mineiro
  and Langford, "Normalized online learning", UAI 2013). The step of w and V is also divided by
  the average squared norm of the (normalized) samples seen so far, so that a sample of 20
  features moves the prediction about as far as one of 5. Accumulators start from
  ``initial_accumulator``, so that a feature's first steps are measured, and the bias has a rate
  of its own (``bias_learning_rate``): it tracks the base rate, which matters most when clicks
  are rare. The latent vectors have theirs too (``factor_learning_rate``), smaller than the
  linear weights': interactions are learned from pairs, which are seen more rarely. With
  ``center`` (on by default), a feature's weight is learned as if the feature were centred on
  its running mean (its sum of x over the samples so far, this one included, absent counted as
  0): the step is taken on ``x - mean`` and the intercept takes ``-step * mean``, so that an age
  or a price far from 0 no longer drags the intercept along with its weight (an ill-conditioned
  pair: census-like table -2% log loss, ``benchmarks/bench_quality.py``). An indicator's mean
  is its frequency: a rare id learns almost as without it, a feature in every sample leaves the
  base rate to the intercept. With ``dense_factors`` (on by default), the latent vectors of a
  row present in many of the samples so far start their AdaGrad from a fraction of the initial
  accumulator (``DENSE_ACCUMULATOR`` of it at a share of ``DENSE_SHARES[1]`` or more, all of it
  at ``DENSE_SHARES[0]`` or less, geometric in between). The initial accumulator is there to
  damp the first steps of a rare id, which a few noisy samples would otherwise throw about; but
  a latent vector's gradient is the size of the other vectors (``x * s_f``), tiny while every
  vector is near its initial draw, so for a feature seen in most samples the same number damps
  hundreds of steps, not a few, and its interactions form late (Phishing: 0.2759 -> 0.2711).
  All of its state is per-coordinate sums (accumulators, the samples' norms, the rows' sums of
  x and counts) or maxima (``N``), which merge by addition and by max.
- ``"adagrad"``: per-parameter rates ``learning_rate / sqrt(sum g^2)``.
- ``"sgd"``: a constant rate (the reference's algorithm).

Calibration (``SparseFM(calibrate=...)``, on by default with ``"normalized"``): four numbers
fitted online to the reports, one Newton step per sample after the model's own step; see
:mod:`stream_fm.model.calibration`.

Every gradient component is clipped to +-``clip_gradient`` and a step that would leave a
non-finite value anywhere is skipped whole (counted), whatever the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np

from stream_fm.model._kernels import (
    B_GAIN0,
    B_LIN_MEAN,
    B_PAIR_MEAN,
    B_W0_REPORT,
    CAL_SIZE,
    _gather,
    _parts,
    _parts_old,
    _proba,
    _score,
    _scratch,
)
from stream_fm.model.calibration import step as calibration_step

__all__ = ["HP_SIZE", "OPTIMIZERS", "OPT_ADAGRAD", "OPT_NORMALIZED", "OPT_SGD", "extra_columns",
           "hyperparameters", "learn"]  # fmt: skip

OPT_SGD, OPT_ADAGRAD, OPT_NORMALIZED = 0, 1, 2
OPTIMIZERS = {"normalized": OPT_NORMALIZED, "adagrad": OPT_ADAGRAD, "sgd": OPT_SGD}

# hyper-parameter vector layout (one array keeps the numba call cheap); HP_STD is for new rows
HP_LR, HP_L2W, HP_L2V, HP_CLIP, HP_EPS, HP_STD, HP_LR_BIAS, HP_ACC0, HP_LR_FACTOR = range(9)
HP_CALIBRATE, HP_CENTER, HP_AVERAGE, HP_NONNEGATIVE, HP_DENSE = 9, 10, 11, 12, 13
HP_SIZE = 14

# The normalized optimizer's columns after a row's k factor accumulators: the largest |x| seen
# (N), the sum of the row's x over the samples it was in (``center``) and their number
# (``dense_factors``)
COL_SCALE, COL_SUM, COL_COUNT = 0, 1, 2

# ``dense_factors``: a row in at least DENSE_SHARES[1] of the samples so far starts its latent
# vectors' accumulators from DENSE_ACCUMULATOR * initial_accumulator; one in at most
# DENSE_SHARES[0] from all of it; in between, geometric in the share. Measured on the quality
# suite (benchmarks/bench_quality.py): 1/8 between 5% and 20%; 1/16 and 1/4 did worse on Phishing.
DENSE_ACCUMULATOR = 0.125
DENSE_SHARES = (0.05, 0.2)

_DBL_MAX = np.finfo(np.float64).max
# AdaGrad's epsilon (``"adagrad"``: the accumulator's floor under the square root)
ADAGRAD_EPS = 1e-8


def hyperparameters(model: Any) -> np.ndarray:
    """A model's settings as the kernels read them (``HP_*``: one array keeps the numba call cheap)."""
    m = model
    return np.array([m.learning_rate, m.l2_w, m.l2_v, m.clip_gradient, ADAGRAD_EPS, m.init_std,
                     m.bias_learning_rate, m.initial_accumulator, m.factor_learning_rate,
                     float(m.calibrate), float(m.center), float(m.average_intercept),
                     float(m.nonnegative_gains), float(m.dense_factors)])  # fmt: skip


def extra_columns(opt: int) -> int:
    """Columns of a row's factor accumulators beyond the k factors (normalized: ``COL_*``)."""
    return 3 if opt == OPT_NORMALIZED else 0


@nb.njit(cache=True, error_model="numpy", inline="always")
def _dloss(y, z):
    """dL/dy_hat of L = -ln sigma(y z) for y in {-1, +1}: -y sigma(-y z), without overflow."""
    m = y * z
    if m >= 0.0:
        e = math.exp(-m)
        return -y * e / (1.0 + e)
    return -y / (1.0 + math.exp(m))


@nb.njit(cache=True, error_model="numpy", inline="always")
def _clip(g, c):
    # min/max compile to branch-free instructions (the factor loop vectorises); NaN stays NaN
    return min(max(g, -c), c)


@nb.njit(cache=True, error_model="numpy", inline="always")
def _all_finite(a, n):
    """True if the first n values of C-contiguous ``a`` are finite (an OR-reduction that vectorises)."""
    flat = a.reshape(-1)
    bad = False
    for i in range(n):
        bad |= not (abs(flat[i]) <= _DBL_MAX)
    return not bad


@nb.njit(cache=True, error_model="numpy")
def learn(rows, vals, offsets, labels, step0, opt, hp, bias, w, V, gw, gV, last, out, counts):
    """Sequential learning over samples ``0..n-1``, one sample at a time.

    ``out[s]`` receives the probability predicted for sample s before its own update (untouched
    rows excluded, as in ``predict``; calibrated). The model learns on its own score y_hat; the
    calibration (``hp[HP_CALIBRATE]`` non-zero) then learns on the probability reported.
    ``counts[0]`` += updates skipped because they would have left a non-finite value in the
    model; ``counts[1]`` += rows trained for the first time.
    Every updated row is stamped ``last[r] = step0 + s`` (least-recently-updated eviction).
    ``bias`` is the dense state (``_kernels.B_*``): w0, its accumulator, the sum of the samples'
    normalized squared norms, the calibration.
    """
    k = V.shape[1]
    n = offsets.shape[0] - 1
    lr = hp[HP_LR]
    l2w = hp[HP_L2W]
    l2v = hp[HP_L2V]
    clip = hp[HP_CLIP]
    eps = hp[HP_EPS]
    lr_bias = hp[HP_LR_BIAS]
    acc0 = hp[HP_ACC0]
    lr_v = hp[HP_LR_FACTOR]  # the latent vectors' rate
    adagrad = opt == OPT_ADAGRAD
    normalized = opt == OPT_NORMALIZED
    calibrate = hp[HP_CALIBRATE] != 0.0
    center = normalized and hp[HP_CENTER] != 0.0
    average = hp[HP_AVERAGE] != 0.0
    nonnegative = hp[HP_NONNEGATIVE] != 0.0
    dense = normalized and hp[HP_DENSE] != 0.0
    share_lo, share_hi = DENSE_SHARES
    log_dense = math.log(DENSE_ACCUMULATOR)
    cal_centred = calibrate and hp[HP_CENTER] != 0.0
    cal_n = B_W0_REPORT - B_GAIN0
    cal = np.empty(cal_n, np.float64)  # the calibration after the sample (bias[B_GAIN0:])
    cal_x = np.empty(CAL_SIZE, np.float64)
    cal_u = np.empty(CAL_SIZE, np.float64)
    width, cr, cx, cnew = _scratch(offsets)
    new_w = np.empty(width, np.float64)
    new_gw = np.empty(width, np.float64)
    new_V = np.empty((width, k), np.float64)
    new_gV = np.empty((width, k), np.float64)
    sums = np.empty(k, np.float64)
    for s in range(n):
        m = _gather(rows, vals, offsets[s], offsets[s + 1], last, True, cr, cx, cnew)
        w0 = bias[0]
        lin, pair = _parts(cr, cx, m, w, V, sums)
        y_hat = w0 + (lin + pair)
        any_new = False
        for j in range(m):
            any_new |= cnew[j]
        if any_new:
            # what predict_proba_one would have said: rows never trained do not count yet
            lin, pair = _parts_old(cr, cx, cnew, m, w, V)
        p = _proba(_score(bias, lin, pair))
        out[s] = p

        # after the report: predict_proba_one sees the parameters as they were
        if normalized:
            rescaled = False
            for j in range(m):
                r = cr[j]
                scale = abs(cx[j])
                if scale > gV[r, k + COL_SCALE]:
                    if gV[r, k + COL_SCALE] == 0.0:
                        # a row's first sample: its initial vector was drawn for x / N (N = |x|),
                        # and is kept in the units of x, as every parameter is
                        shrink = 1.0 / scale
                    else:
                        # a larger |x| than any before: what was learned at the smaller scale
                        # overstated this feature's range; shrink it (as VW's normalized update)
                        ratio = gV[r, k + COL_SCALE] / scale
                        shrink = ratio * ratio
                        w[r] *= shrink
                    for f in range(k):
                        V[r, f] *= shrink
                    gV[r, k + COL_SCALE] = scale
                    rescaled = True
            if rescaled:
                a, b = _parts(cr, cx, m, w, V, sums)
                y_hat = w0 + (a + b)

        if not math.isfinite(y_hat):
            counts[0] += 1
            continue
        g = _dloss(2.0 * labels[s] - 1.0, y_hat)

        # Compute every new value first and commit only if all are finite, so that no sample
        # can leave NaN/inf in the model, whatever its inputs or the learning rate.
        g0 = _clip(g, clip)
        shift = 0.0  # what centring moves into the intercept
        per_sample = 1.0 / (step0 + s + 1)  # 1 / the samples so far, this one included
        # a row's mean x: its sum over the samples so far (absent counted as 0); 0 without center
        per_seen = per_sample if center else 0.0
        new_tot = 0.0
        rate = lr
        rate_v = lr_v
        if normalized:
            # the sample's norm in units of x / N (each row's scale N, updated above); x as it
            # comes, centred or not (the norm of x - mean made the steps too large: measured)
            norm = 0.0
            for j in range(m):
                nr = gV[cr[j], k + COL_SCALE]
                if nr > 0.0:
                    xt = cx[j] / nr
                    norm += xt * xt
            new_tot = bias[2] + norm
            if new_tot > 0.0:
                rate = lr * (step0 + s + 1) / new_tot
                rate_v = lr_v * (step0 + s + 1) / new_tot
            new_g0 = bias[1] + g0 * g0
            new_w0 = w0 - lr_bias * g0 / math.sqrt(new_g0 + acc0)
        elif adagrad:
            new_g0 = bias[1] + g0 * g0
            new_w0 = w0 - lr * g0 / math.sqrt(new_g0 + eps)
        else:
            new_g0 = bias[1]
            new_w0 = w0 - lr * g0
        for j in range(m):
            r = cr[j]
            x = cx[j]
            xx = x * x
            wr = w[r]
            if normalized:
                # AdaGrad on the parameters of x / N, written back in the units of x
                nr = gV[r, k + COL_SCALE]
                inv = 1.0 / nr if nr > 0.0 else 0.0
                # gradients, L2 and clipping in the units of x / N (the parameters times N)
                # learned as if x were centred on its mean: the step of w is taken on x - mean,
                # and the intercept takes -step * mean, so that the prediction at the mean stays
                # where it was (a number far from 0 no longer drags the intercept along with
                # every step of its weight)
                mean = (gV[r, k + COL_SUM] + x) * per_seen
                gr = _clip(g * (x - mean) * inv + l2w * wr * nr, clip)
                acc = gw[r] + gr * gr
                nw = wr - rate * gr / math.sqrt(acc + acc0) * inv
                shift += (nw - wr) * mean
                new_gw[j] = acc
                acc0_v = acc0
                if dense:
                    # the share of the samples so far that had this row, this one included
                    share = (gV[r, k + COL_COUNT] + 1.0) * per_sample
                    if share >= share_hi:
                        acc0_v = acc0 * DENSE_ACCUMULATOR
                    elif share > share_lo:
                        acc0_v = acc0 * math.exp(log_dense * (share - share_lo) / (share_hi - share_lo))
                for f in range(k):
                    v = V[r, f]
                    gv = _clip(g * (x * sums[f] - v * xx) * inv + l2v * v * nr, clip)
                    a2 = gV[r, f] + gv * gv
                    new_gV[j, f] = a2
                    new_V[j, f] = v - rate_v * gv / math.sqrt(a2 + acc0_v) * inv
            elif adagrad:
                gr = _clip(g * x + l2w * wr, clip)
                acc = gw[r] + gr * gr
                nw = wr - lr * gr / math.sqrt(acc + eps)
                new_gw[j] = acc
                for f in range(k):
                    v = V[r, f]
                    gv = _clip(g * (x * sums[f] - v * xx) + l2v * v, clip)
                    a2 = gV[r, f] + gv * gv
                    nv = v - lr_v * gv / math.sqrt(a2 + eps)
                    new_gV[j, f] = a2
                    new_V[j, f] = nv
            else:
                gr = _clip(g * x + l2w * wr, clip)
                nw = wr - lr * gr
                for f in range(k):
                    v = V[r, f]
                    nv = v - lr_v * _clip(g * (x * sums[f] - v * xx) + l2v * v, clip)
                    new_V[j, f] = nv
            new_w[j] = nw
        new_w0 -= shift
        finite = _all_finite(new_V, m * k) and _all_finite(new_w, m) and math.isfinite(new_w0)
        if adagrad or normalized:
            finite = finite and _all_finite(new_gV, m * k) and _all_finite(new_gw, m)
            finite = finite and math.isfinite(new_g0)
        if normalized:
            finite = finite and math.isfinite(new_tot)
        if calibrate:
            calibration_step(bias, lin, pair, p, labels[s], cal, cal_x, cal_u, nonnegative)
            finite = finite and _all_finite(cal, cal_n)
        if not finite:
            counts[0] += 1
            continue

        stamp = step0 + s
        bias[0] = new_w0
        bias[1] = new_g0
        if average:
            # weights growing with t (the t-th w0 weighs t): old values, learned before the
            # rest of the model settled, fade (Lacoste-Julien, Schmidt and Bach, 2012)
            bias[B_W0_REPORT] += 2.0 * (new_w0 - bias[B_W0_REPORT]) / (step0 + s + 2.0)
        else:
            bias[B_W0_REPORT] = new_w0
        if cal_centred:
            bias[B_LIN_MEAN] += (lin - bias[B_LIN_MEAN]) * per_sample
            bias[B_PAIR_MEAN] += (pair - bias[B_PAIR_MEAN]) * per_sample
        if normalized:
            bias[2] = new_tot
        if calibrate:
            for i in range(cal_n):
                bias[B_GAIN0 + i] = cal[i]
        for j in range(m):
            r = cr[j]
            if cnew[j]:
                counts[1] += 1
            last[r] = stamp
            w[r] = new_w[j]
            for f in range(k):
                V[r, f] = new_V[j, f]
            if adagrad or normalized:
                gw[r] = new_gw[j]
                for f in range(k):
                    gV[r, f] = new_gV[j, f]
            if center:
                gV[r, k + COL_SUM] += cx[j]
            if dense:
                gV[r, k + COL_COUNT] += 1.0
