"""Centring of numeric features and the averaged intercept (stream_fm/model/updates.py): what moves
where in one step, what they leave alone, what they buy, and states written before them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_batch_equals_loop, categorical_stream, learn_stream, log_loss, state_equal

from stream_fm import ConfigError, SparseFM
from stream_fm.model._kernels import B_W0, B_W0_REPORT
from stream_fm.model.updates import COL_SUM


def _table(n: int, seed: int, offset: float) -> list[tuple[dict, bool]]:
    """Three categorical columns and an age, ``offset + 12 z``, whose effect is ``0.8 z``."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0.0, 0.7, (3, 8))
    out = []
    for _ in range(n):
        ids = rng.integers(8, size=3)
        z = rng.normal()
        score = -1.0 + effects[np.arange(3), ids].sum() + 0.8 * z
        x: dict = {f"c{i}": f"v{v}" for i, v in enumerate(ids)}
        x["age"] = round(offset + 12.0 * z, 3) or 0.001
        out.append((x, bool(rng.random() < 1 / (1 + math.exp(-score)))))
    return out


def test_the_intercept_takes_the_other_side_of_a_centred_step():
    """One sample, from the same state, with and without centring: each weight steps on
    x - mean instead of x, and w0 moves by -(sum of step * mean) more; the latent vectors do not
    change."""
    stream = _table(300, seed=1, offset=40.0)
    on = SparseFM(seed=3, average_intercept=False)
    learn_stream(on, stream[:299])
    arrays, meta = on.export_state()
    off = SparseFM.from_state(arrays, {**meta, "config": {**meta["config"], "center": False}})
    x, y = stream[299]
    index, k = on._index.as_dict(), on.n_factors
    rows = [index[f"{f}={v}" if isinstance(v, str) else f] for f, v in x.items()]
    values = np.array([1.0, 1.0, 1.0, x["age"]])
    means = (on._gV[rows, k + COL_SUM] + values) * (1.0 / (on.samples_seen + 1))  # this one included
    age = rows[-1]
    assert abs(x["age"] - means[-1]) < 0.5 * x["age"]  # far from 0, nearer its mean
    before = on._w[rows].copy()
    on.learn_one(x, y)
    off.learn_one(x, y)
    steps = on._w[rows] - before
    g_sign = 1.0 if y else -1.0
    assert np.sign(steps[-1]) == g_sign * np.sign(x["age"] - means[-1])  # along x - mean
    assert np.sign(off._w[age] - before[-1]) == g_sign  # along x (> 0)
    assert on._bias[B_W0] == pytest.approx(off._bias[B_W0] - float(steps @ means), rel=1e-12, abs=1e-15)
    assert np.array_equal(on._V, off._V)


def test_a_feature_in_every_sample_leaves_the_base_rate_to_the_intercept():
    """An indicator's mean is its frequency: one present in every sample learns nothing beyond
    the intercept (its steps are on 1 - 1), while without centring it takes a share of the base
    rate, learned twice over."""
    stream = [({**x, "always": "on"}, y) for x, y in categorical_stream(3000, 2)]
    on, off = SparseFM(seed=1), SparseFM(seed=1, center=False)
    learn_stream(on, stream), learn_stream(off, stream)
    row = on._index.as_dict()["always=on"]
    assert abs(on._w[row]) < 1e-12  # rounding of 1 - mean aside
    assert abs(off._w[row]) > 0.2 * abs(off._bias[B_W0])


def test_a_number_far_from_zero_costs_little_with_centring():
    """The same age given as a deviation or in years (offset 40): with centring the offset costs
    under 1% of log loss; without, it costs more than twice that (measured: 0.5% and 1.5%).
    (The scale is still the largest |x|: a number whose spread is tiny next to its size, a
    year, learns slowly either way.)"""
    near, far = _table(20_000, seed=4, offset=0.0), _table(20_000, seed=4, offset=40.0)
    on_near = log_loss(learn_stream(SparseFM(seed=0), near), near)
    on_far = log_loss(learn_stream(SparseFM(seed=0), far), far)
    off_far = log_loss(learn_stream(SparseFM(seed=0, center=False), far), far)
    assert on_far < 1.01 * on_near
    assert off_far - on_near > 2 * (on_far - on_near)
    assert on_far < 0.995 * off_far


def test_learn_batch_equals_the_loop_with_centring():
    assert_batch_equals_loop(lambda: SparseFM(seed=5), _table(700, seed=9, offset=40.0), 128)


def test_the_averaged_intercept_steadies_reports_when_clicks_are_rare():
    """Rare clicks and ids that say nothing: each click kicks w0 up; reporting its running
    average instead gives lower log loss (measured: by 0.45%)."""
    rng = np.random.default_rng(6)
    stream = [({"a": f"v{rng.integers(500)}", "b": f"w{rng.integers(50)}"}, bool(rng.random() < 0.005))
              for _ in range(30_000)]  # fmt: skip
    averaged = SparseFM(seed=0)
    on, off = learn_stream(averaged, stream), learn_stream(SparseFM(seed=0, average_intercept=False), stream)
    assert log_loss(on, stream) < 0.997 * log_loss(off, stream)
    assert averaged._bias[B_W0_REPORT] != averaged._bias[B_W0]


def test_a_state_written_before_centring_loads_and_continues_exactly():
    """state_format 3 (no reported intercept, one column after a normalized row's accumulators,
    neither setting) is migrated: the model is made with both off, as it was, and goes on bit
    for bit."""
    stream = _table(1200, seed=8, offset=40.0)
    old = SparseFM(seed=2, center=False, average_intercept=False, dense_factors=False)
    learn_stream(old, stream[:600])
    arrays, meta = old.export_state()
    later = ("center", "average_intercept", "dense_factors")
    config = {k: v for k, v in meta["config"].items() if k not in later}
    v3 = SparseFM.from_state(
        {**arrays, "bias": arrays["bias"][:B_W0_REPORT], "gV": arrays["gV"][:, : old.n_factors + 1]},
        {**meta, "state_format": 3, "config": config},
    )
    assert (v3.calibrate, v3.center, v3.average_intercept, v3.dense_factors) == (True, False, False, False)
    assert np.array_equal(learn_stream(v3, stream[600:]), learn_stream(old, stream[600:]))
    assert state_equal(v3, old)


@pytest.mark.parametrize("name", ["center", "average_intercept"])
def test_the_switches_must_be_bools(name):
    with pytest.raises(ConfigError, match=f"{name}.*true, false or None"):
        SparseFM(**{name: "yes"})
    assert SparseFM(optimizer="adagrad").center is False
    assert SparseFM(calibrate=False).average_intercept is False
