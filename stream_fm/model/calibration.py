"""The calibration: what a model reports, fitted online on top of its y_hat (numba, nopython).

Calibration (``SparseFM(calibrate=...)``, on by default with ``"normalized"``): what the model
reports is ``sigma(c_0 * w0 + c_lin * lin + c_pair * pair + c_off)`` (with the refinements of
``center`` and ``average_intercept`` below: ``_kernels._score``), where ``lin`` and ``pair``
are the linear and pairwise parts of y_hat and the four numbers are a logistic regression fitted
online, one Newton step per sample, on the probabilities reported (stacking; the calibration
layer of McMahan et al., "Ad click prediction: a view from the trenches", KDD 2013, sec. 7). The
factorization machine learns on its own y_hat, as without it. A learning rate too small for the
stream leaves y_hat's parts too timid and the gains grow; features that carry only noise shrink
them, and the offset then holds the report near the base rate; ``c_0`` discounts the
intercept's wandering (its AdaGrad steps shrink only as 1/sqrt(n)). This is what makes one default
serve streams whose best learning rates differ several-fold (``benchmarks/bench_quality.py``).
With ``center``, the gains scale the linear and pairwise parts' deviations from their running
means, and the means pass at gain 1: centring leaves a feature's mean effect in the
linear part and its opposite in the intercept, and a gain that scaled one and not the other
would break them apart (Phishing: 0.2827 -> 0.2789). With ``average_intercept`` (on by default
with calibration) the intercept it reads is an average of w0 over the samples learned, the t-th
weighing t (Polyak averaging, weighted as Lacoste-Julien, Schmidt and Bach, 2012), rather than
w0: next to a rare click, w0's AdaGrad step is several times the base rate's own uncertainty,
and the report should not jump with it (rare positives: from behind the running mean of the
labels to ahead of it; ``benchmarks/bench_quality.py``).
With ``nonnegative_gains`` (on by default with calibration) a gain that a step would take below
0 stops at 0 (a clamp after the Newton step; the offset is free): the model learns each part to
lower the loss, so a negative gain, which turns the part upside down, is never what it needs; a
part that carries noise gets 0. Without it, Phishing's pairwise gain fell to -1.1 while the
interactions were still forming and needed 500 samples to climb back (0.2771 -> 0.2759).
Its state (four numbers, a 4x4 inverse curvature, the averages) depends on the order of samples:
a cluster must treat it as one dense coordinate.
"""

from __future__ import annotations

import numba as nb

from stream_fm.model._kernels import B_GAIN0, B_LIN_MEAN, B_P, B_PAIR_MEAN, B_W0_REPORT, CAL_SIZE, packed

__all__ = ["step"]


@nb.njit(cache=True, error_model="numpy", inline="always")
def step(bias, lin, pair, p, y, new, x, u, nonnegative):
    """One Newton step of the calibration on the sample just reported: ``new`` receives the four
    numbers and the inverse curvature after it (``bias[B_GAIN0:]``'s layout). ``x``, ``u``: scratch.
    With ``nonnegative``, a gain the step would take below 0 stops at 0 (the offset is free).

    The calibration is a logistic regression on x = (w0', lin - m_lin, pair - m_pair, 1) (the
    reported intercept and the parts' deviations from their means, 0 without ``center``), fitted
    online under a Gaussian prior: the curvature H gains p (1 - p) x x^T at this sample, and
    theta -= H^-1 (p - y) x. H^-1 is kept and updated by Sherman-Morrison (recursive least
    squares): with u = H^-1 x and d = 1 + p (1 - p) x.u, the new H^-1 is H^-1 - p (1 - p) u u^T / d
    and the step is (p - y) u / d. No solve, no square root: about fifty multiplications.
    """
    n = CAL_SIZE
    x[0] = bias[B_W0_REPORT]
    x[1] = lin - bias[B_LIN_MEAN]
    x[2] = pair - bias[B_PAIR_MEAN]
    x[3] = 1.0
    c = p * (1.0 - p)
    for i in range(n):  # u = P x, P symmetric, its upper triangle row by row
        acc = 0.0
        for j in range(n):
            acc += bias[B_P + packed(i, j)] * x[j]
        u[i] = acc
    xu = 0.0
    for i in range(n):
        xu += x[i] * u[i]
    d = 1.0 + c * xu
    step = (p - y) / d
    shrink = c / d
    at = n
    for i in range(n):
        new[i] = bias[B_GAIN0 + i] - step * u[i]
        if nonnegative and i < n - 1 and new[i] < 0.0:
            new[i] = 0.0
        for j in range(i, n):
            new[at] = bias[B_P + at - n] - shrink * u[i] * u[j]
            at += 1
