"""The update rules (stream_fm/model/updates.py): the normalized optimizer's invariances, the per-sample
contract under it, and the migration of states written before it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_batch_equals_loop, categorical_stream, learn_stream, state_equal

from stream_fm import ConfigError, SparseFM
from stream_fm.model.updates import COL_SCALE


def _scaled(stream: list[tuple[dict, bool]], factor: float) -> list[tuple[dict, bool]]:
    return [({**x, "price": x["price"] * factor}, y) for x, y in stream]


@pytest.mark.parametrize("factor", [1e-3, 1e3, 1e5])
def test_normalized_learning_does_not_depend_on_the_unit_of_a_number(factor):
    """A price in cents or in millions: the same predictions, to rounding (VW's --normalized)."""
    stream = categorical_stream(3000, seed=4)
    base = learn_stream(SparseFM(seed=1, l2_w=1e-3), stream)
    scaled = learn_stream(SparseFM(seed=1, l2_w=1e-3), _scaled(stream, factor))
    np.testing.assert_allclose(scaled, base, rtol=1e-9, atol=1e-12)
    # while AdaGrad's steps are in the units of x: the same change wrecks it
    adagrad = learn_stream(SparseFM(seed=1, optimizer="adagrad"), stream)
    adagrad_scaled = learn_stream(SparseFM(seed=1, optimizer="adagrad"), _scaled(stream, factor))
    assert np.max(np.abs(adagrad_scaled - adagrad)) > 0.01


def test_a_larger_value_than_any_before_shrinks_what_was_learned_at_the_smaller_scale():
    # the model's own score (the calibration, which sharpens a pattern this clean, aside)
    model = SparseFM(seed=0, calibrate=False)
    for i in range(200):
        model.learn_one({"n": 0.01 * (1 + i % 3), "ad": f"a{i % 4}"}, i % 2 == 0)
    row = model._index.as_dict()["n"]
    learned = abs(model._w[row] * 100.0)  # what the weight would say of x = 100 as it stands
    scale = model.n_factors + COL_SCALE  # the row's scale: the largest |x| so far
    assert model._gV[row, scale] == pytest.approx(0.03)
    model.learn_one({"n": 100.0}, True)
    assert model._gV[row, scale] == 100.0
    assert learned > 50.0 and abs(model._w[row] * 100.0) < 5.0
    p = model.predict_proba_one({"n": 100.0})[True]
    assert 0.01 < p < 0.99


def _moved(fields: int, **settings: object) -> float:
    """The log-odds after 30 clicks on the same sample of ``fields`` features, all in every
    sample. (Without centring: such features would leave all of it to the intercept.)"""
    model = SparseFM(seed=0, center=False, **settings)
    x = {f"f{i}": "x" for i in range(fields)}
    for _ in range(30):
        model.learn_one(x, True)
    p = model.predict_proba_one(x)[True]
    return float(np.log(p / (1 - p)))


def test_the_step_does_not_grow_with_the_number_of_features():
    """Twenty copies of a signal move the prediction about as far as one does (measured: 6.38
    and 6.26 in log-odds; plain AdaGrad would take steps twenty times as long). With
    ``dense_factors`` (the default) the latent vectors of features in every sample learn sooner,
    and twenty such features have 190 pairs where five have 10 (measured: 7.59 against 6.71 for
    five and 6.26 for one)."""
    assert abs(_moved(20, dense_factors=False) - _moved(1, dense_factors=False)) < 0.25
    assert abs(_moved(20) - _moved(5)) < 1.0
    assert abs(_moved(20) - _moved(1)) < 1.5


def test_learn_batch_equals_the_loop_when_scales_grow_mid_batch():
    stream = [
        ({"n": float(i + 1), "m": float((i * 7) % 13) - 6.0, "ad": f"a{i % 5}"}, i % 3 == 0)
        for i in range(400)
    ]
    assert_batch_equals_loop(lambda: SparseFM(seed=3), stream, 64)


def test_a_state_written_before_the_normalized_optimizer_loads_and_continues_exactly():
    """state_format 1 (bias of two entries) is migrated; the model goes on bit for bit."""
    stream = categorical_stream(600, seed=5)
    old = SparseFM(optimizer="adagrad", learning_rate=0.06, seed=2)
    learn_stream(old, stream[:300])
    arrays, meta = old.export_state()
    v1_arrays = {**arrays, "bias": arrays["bias"][:2]}
    v1_meta = {**meta, "state_format": 1, "config": {
        k: v for k, v in meta["config"].items() if k not in ("bias_learning_rate", "initial_accumulator")
    }}  # fmt: skip
    restored = SparseFM.from_state(v1_arrays, v1_meta)
    assert np.array_equal(learn_stream(restored, stream[300:]), learn_stream(old, stream[300:]))
    assert state_equal(restored, old)


def test_an_unknown_state_format_is_refused_naming_both_versions():
    arrays, meta = SparseFM().export_state()
    said = r"state_format=\(.SparseFM., 7\).*one of \(1, 2, 3, 4, 5, 6\)\); this release writes 6"
    with pytest.raises(ConfigError, match=said):
        SparseFM.from_state(arrays, {**meta, "state_format": 7})


def test_each_optimizer_has_its_own_default_rate():
    default = SparseFM()
    assert (default.learning_rate, default.bias_learning_rate, default.factor_learning_rate) == (
        2.0,
        1.5,
        1.0,
    )
    assert SparseFM(optimizer="adagrad").learning_rate == 0.06
    sgd = SparseFM(optimizer="sgd")
    assert sgd.bias_learning_rate == sgd.factor_learning_rate == sgd.learning_rate
    with pytest.raises(ConfigError, match="bias_learning_rate"):
        SparseFM(bias_learning_rate=0)
