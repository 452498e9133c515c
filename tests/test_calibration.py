"""Calibration (stream_fm/model/updates.py): the reports against a plain reference, the model's own
learning untouched by it, what it does on noise and on a timid model, and old states."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_batch_equals_loop, learn_stream, log_loss, state_equal

from stream_fm import ConfigError, SparseFM
from stream_fm.model._kernels import (
    B_GAIN0,
    B_LIN,
    B_LIN_MEAN,
    B_NORMS,
    B_OFF,
    B_P,
    B_PAIR,
    B_PAIR_MEAN,
    B_W0_REPORT,
    CAL_PRIOR,
)


def _ids_stream(n: int, seed: int, signal: float, ctr: float, fields: int = 4, values: int = 40):
    """Categorical samples (every x is 1) whose clicks depend on per-value effects of size ``signal``."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0.0, signal, (fields, values))
    base = math.log(ctr / (1 - ctr))
    out = []
    for _ in range(n):
        ids = rng.integers(values, size=fields)
        z = base + effects[np.arange(fields), ids].sum()
        click = bool(rng.random() < 1 / (1 + math.exp(-z)))
        out.append(({f"f{i}": f"v{v}" for i, v in enumerate(ids)}, click))
    return out


def _parts(model: SparseFM, x: dict[str, str]) -> tuple[float, float]:
    """(linear part, pairwise part) of y_hat by the textbook formula, over trained rows only."""
    index = model._index.as_dict()
    rows = [index[f"{k}={v}"] for k, v in x.items() if f"{k}={v}" in index]
    rows = [r for r in rows if model._last[r] >= 0]
    V = model._V[rows]
    lin = float(sum(model._w[r] for r in rows))
    pair = 0.5 * float(np.sum(V.sum(axis=0) ** 2) - np.sum(V**2))
    return lin, pair


class _Reference:
    """The calibration written out with numpy: a Gaussian prior, one Newton step per sample;
    with ``centred``, the gains act on the parts' deviations from their running means (the means
    themselves pass at gain 1); with ``nonnegative``, a gain the step takes below 0 stops at 0."""

    def __init__(self, centred: bool, nonnegative: bool = True) -> None:
        self.theta = np.array([1.0, 1.0, 1.0, 0.0])
        self.H = np.diag(CAL_PRIOR)
        self.centred = centred
        self.nonnegative = nonnegative
        self.means = np.zeros(2)
        self.n = 0

    def _x(self, w0: float, lin: float, pair: float) -> np.ndarray:
        return np.array([w0, lin - self.means[0], pair - self.means[1], 1.0])

    def report(self, w0: float, lin: float, pair: float) -> float:
        z = self.theta @ self._x(w0, lin, pair) + self.means.sum()
        return 1.0 / (1.0 + math.exp(-z))

    def learn(self, w0: float, lin: float, pair: float, p: float, y: bool) -> None:
        x = self._x(w0, lin, pair)
        self.H += p * (1 - p) * np.outer(x, x)
        self.theta -= np.linalg.solve(self.H, (p - float(y)) * x)
        if self.nonnegative:
            self.theta[:3] = np.maximum(self.theta[:3], 0.0)
        self.n += 1
        if self.centred:
            self.means += (np.array([lin, pair]) - self.means) / self.n


@pytest.mark.parametrize(
    ("average", "center", "nonnegative"),
    [(True, True, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_reports_are_the_calibrated_score_of_the_model_before_each_sample(average, center, nonnegative):
    """The reported intercept is the average of w0 over the samples learned, the n-th weighing n
    (``average_intercept``, on by default with calibration), or w0 itself; with ``center`` the
    gains scale the parts' deviations from their running means; with ``nonnegative_gains`` no
    gain goes below 0 (on this stream the pairwise part's would, for a while, without it)."""
    stream = _ids_stream(1500, seed=1, signal=0.8, ctr=0.2)
    plain = SparseFM(seed=4, calibrate=False, center=center)  # the same machine, reporting y_hat
    ref = _Reference(centred=center, nonnegative=nonnegative)
    lowest = np.full(3, np.inf)  # each gain's lowest value along the way
    expected = []
    w0_report = 0.0
    for n, (x, y) in enumerate(stream, start=1):
        lin, pair = _parts(plain, x)
        p = ref.report(w0_report, lin, pair)
        expected.append(p)
        ref.learn(w0_report, lin, pair, p, y)
        lowest = np.minimum(lowest, ref.theta[:3])
        plain.learn_one(x, y)
        w0_report = w0_report + 2 * (plain.w0 - w0_report) / (n + 1) if average else plain.w0
    calibrated = SparseFM(seed=4, average_intercept=average, center=center, nonnegative_gains=nonnegative)
    got = learn_stream(calibrated, stream)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0)
    bias = calibrated._bias
    np.testing.assert_allclose(bias[[B_GAIN0, B_LIN, B_PAIR, B_OFF]], ref.theta, rtol=1e-9, atol=1e-12)
    curvature = np.linalg.inv(ref.H)[np.triu_indices(4)]
    np.testing.assert_allclose(bias[B_P:B_W0_REPORT], curvature, rtol=1e-9, atol=1e-15)
    assert bias[B_W0_REPORT] == pytest.approx(w0_report, rel=1e-12)
    np.testing.assert_allclose(bias[[B_LIN_MEAN, B_PAIR_MEAN]], ref.means, rtol=1e-12, atol=0)
    assert ref.means.any() == center
    assert not np.allclose(ref.theta, [1.0, 1.0, 1.0, 0.0], atol=0.05)  # it did move
    assert (lowest.min() == 0.0) if nonnegative else (lowest.min() < 0.0)  # the floor was reached


def test_calibration_does_not_change_what_the_model_learns():
    stream = _ids_stream(2000, seed=2, signal=0.5, ctr=0.1)
    on, off = SparseFM(seed=7), SparseFM(seed=7, calibrate=False)
    p_on, p_off = learn_stream(on, stream), learn_stream(off, stream)
    assert not np.array_equal(p_on, p_off)
    a_on, _ = on.export_state()
    a_off, _ = off.export_state()
    for name in ("w", "V", "gw", "gV", "last", "key_bytes"):
        assert np.array_equal(a_on[name], a_off[name]), name
    assert np.array_equal(a_on["bias"][: B_NORMS + 1], a_off["bias"][: B_NORMS + 1])


def test_without_calibration_a_report_is_sigma_of_y_hat_and_the_state_stays_the_identity():
    stream = _ids_stream(800, seed=3, signal=0.8, ctr=0.3)
    model = SparseFM(seed=1, calibrate=False)
    for x, y in stream[:400]:
        model.learn_one(x, y)
    probe = [x for x, _ in stream[400:]]
    want = []
    for x in probe:
        lin, pair = _parts(model, x)
        want.append(1.0 / (1.0 + math.exp(-(model.w0 + lin + pair))))
    np.testing.assert_allclose(model.predict_proba_batch(probe), want, rtol=1e-12)
    assert model.calibration == (1.0, 1.0, 1.0, 0.0)
    assert SparseFM(optimizer="adagrad").calibrate is False and SparseFM().calibrate is True


def test_features_that_carry_only_noise_are_shrunk():
    """Rare clicks, ids that say nothing: the gain on the linear part falls far below 1 and the
    calibrated reports beat the model's own."""
    stream = _ids_stream(30_000, seed=5, signal=0.0, ctr=0.01, fields=6, values=30)
    model = SparseFM(seed=0)
    on = learn_stream(model, stream)
    off = learn_stream(SparseFM(seed=0, calibrate=False), stream)
    assert model._bias[B_LIN] < 0.5
    assert log_loss(on, stream) < 0.99 * log_loss(off, stream)


def test_a_model_that_learns_too_timidly_is_scaled_up():
    stream = _ids_stream(20_000, seed=6, signal=1.0, ctr=0.3)
    on = SparseFM(seed=0, learning_rate=0.05, factor_learning_rate=0.05)
    off = SparseFM(seed=0, learning_rate=0.05, factor_learning_rate=0.05, calibrate=False)
    p_on, p_off = learn_stream(on, stream), learn_stream(off, stream)
    assert on._bias[B_LIN] > 1.5
    assert log_loss(p_on, stream) < 0.98 * log_loss(p_off, stream)


def test_a_state_written_before_calibration_loads_and_continues_exactly():
    """state_format 2 (a dense state of three numbers) is migrated: the model is made without
    calibration, as it was, and predicts and learns on bit for bit."""
    stream = _ids_stream(1200, seed=8, signal=0.8, ctr=0.2)
    old = SparseFM(seed=2, calibrate=False, center=False, dense_factors=False)
    learn_stream(old, stream[:600])
    arrays, meta = old.export_state()
    later = ("calibrate", "center", "average_intercept", "dense_factors")
    config = {k: v for k, v in meta["config"].items() if k not in later}
    v2_meta = {**meta, "state_format": 2, "config": config}
    v2 = SparseFM.from_state({**arrays, "bias": arrays["bias"][:3], "gV": arrays["gV"][:, :9]}, v2_meta)
    assert v2.calibrate is False
    assert np.array_equal(learn_stream(v2, stream[600:]), learn_stream(old, stream[600:]))
    assert state_equal(v2, old)
    with pytest.raises(ConfigError, match=r"state array 'bias'.*shape \(3,\) in state_format 2"):
        SparseFM.from_state({**arrays, "bias": arrays["bias"][:5]}, v2_meta)


def test_learn_batch_equals_the_loop_with_calibration():
    assert_batch_equals_loop(lambda: SparseFM(seed=5), _ids_stream(700, seed=9, signal=0.8, ctr=0.3), 100)


def test_calibrate_must_be_a_bool():
    with pytest.raises(ConfigError, match="calibrate"):
        SparseFM(calibrate="yes")
