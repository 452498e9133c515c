"""SparseFM: numerics against independent references, API semantics, bounded memory, robustness."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
from helpers import categorical_stream, state_equal
from river import facto, linear_model, metrics, optim

from stream_fm import ConfigError, FeatureError, LabelError, SparseFM
from stream_fm.model import fastpath
from stream_fm.model._kernels import B_LIN_MEAN, B_PAIR_MEAN, B_W0_REPORT

# ---------------------------------------------------------------- helpers: a plain FM, written out


def naive_parts(model: SparseFM, x: dict[str, float]) -> tuple[float, float]:
    """Eq. 4 of the reference, O(k n^2), straight from the model's parameter rows: (the linear
    sum, the pairwise sum)."""
    index = model._index.as_dict()
    items = [(index[k], v) for k, v in x.items() if k in index]
    lin = sum(model._w[r] * v for r, v in items)
    pair = 0.0
    for (r1, v1), (r2, v2) in itertools.combinations(items, 2):
        pair += float(np.dot(model._V[r1], model._V[r2])) * v1 * v2
    return lin, pair


def naive_raw(model: SparseFM, x: dict[str, float]) -> float:
    """y_hat by eq. 4."""
    lin, pair = naive_parts(model, x)
    return model.w0 + lin + pair


def logloss(y: int, raw: float) -> float:
    s = 1 if y else -1
    return math.log1p(math.exp(-s * raw))


def one_hot(x: dict[str, str]) -> dict[str, float]:
    return {f"{k}={v}": 1.0 for k, v in x.items()}


def numeric_stream(n: int, n_keys: int, nnz: int, seed: int) -> list[tuple[dict[str, float], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        keys = rng.choice(n_keys, size=nnz, replace=False)
        x = {f"k{k}": float(rng.normal()) for k in keys}
        out.append((x, int(rng.random() < 0.4)))
    return out


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("calibrate", [False, True])
def test_predictions_equal_the_quadratic_formula(calibrate):
    stream = numeric_stream(300, n_keys=40, nnz=6, seed=1)
    model = SparseFM(n_factors=5, init_std=0.3, seed=3, calibrate=calibrate)
    for x, y in stream[:200]:
        model.learn_one(x, y)
    c_0, c_lin, c_pair, c_off = model.calibration
    assert (c_0, c_lin, c_pair, c_off) == (1.0, 1.0, 1.0, 0.0) or calibrate
    rng = np.random.default_rng(7)
    for x, _ in stream[200:]:
        x = dict(x, unseen_feature=float(rng.normal()))  # unseen: contributes nothing
        p = model.predict_proba_one(x)[True]
        lin, pair = naive_parts(model, x)
        m_lin, m_pair = model._bias[[B_LIN_MEAN, B_PAIR_MEAN]]  # the parts' means (0 without calibration)
        parts = m_lin + c_lin * (lin - m_lin) + m_pair + c_pair * (pair - m_pair)
        raw = c_0 * model._bias[B_W0_REPORT] + parts + c_off  # w0 or its average
        assert p == pytest.approx(1 / (1 + math.exp(-raw)), abs=1e-12)
        assert math.log(p / (1 - p)) == pytest.approx(raw, abs=1e-9)


def test_sgd_step_follows_the_finite_difference_gradient():
    """With plain SGD and no clipping/L2, theta_new - theta = -lr * dL/dtheta; check dL/dtheta."""
    lr, h = 1e-3, 1e-6
    base = SparseFM(n_factors=4, optimizer="sgd", learning_rate=lr, l2_v=0.0, init_std=0.5, seed=2)
    warm = numeric_stream(50, n_keys=8, nnz=4, seed=5)
    for x, y in warm:
        base.learn_one(x, y)
    x, y = {"k0": 0.7, "k3": -1.3, "k5": 0.4, "k6": 2.0}, 1
    arrays, meta = base.export_state()
    before = SparseFM.from_state(arrays, meta)
    after = SparseFM.from_state(arrays, meta)
    after.learn_one(x, y)

    def finite_difference(name: str, index: tuple[int, ...]) -> float:
        losses = []
        for delta in (h, -h):
            m = SparseFM.from_state(arrays, meta)
            getattr(m, name)[index] += delta
            losses.append(logloss(y, naive_raw(m, x)))
        return (losses[0] - losses[1]) / (2 * h)

    params = [("_bias", (0,))]
    for key in x:
        r = before._index.get(key)
        params += [("_w", (r,))] + [("_V", (r, f)) for f in range(4)]
    for name, index in params:
        step = getattr(after, name)[index] - getattr(before, name)[index]
        assert step / -lr == pytest.approx(finite_difference(name, index), rel=1e-5, abs=1e-8), (name, index)


def test_follows_river_fm_updates_with_sgd():
    """Same initial parameters, plain SGD, no L2: every parameter tracks river's FMClassifier."""
    lr = 0.05
    stream = numeric_stream(400, n_keys=30, nnz=5, seed=11)
    ours = SparseFM(
        n_factors=6,
        optimizer="sgd",
        learning_rate=lr,
        l2_w=0.0,
        l2_v=0.0,
        init_std=0.1,
        clip_gradient=1e12,
        seed=4,
    )
    river_fm = facto.FMClassifier(
        n_factors=6,
        weight_optimizer=optim.SGD(lr),
        latent_optimizer=optim.SGD(lr),
        intercept_lr=lr,
        seed=0,
    )
    keys = {k for x, _ in stream for k in x}
    for k in keys:  # river's latents start where ours do
        river_fm.latents[k] = ours.initial_latent(k).copy()
    worst = 0.0
    for i, (x, y) in enumerate(stream):
        ours.learn_one(x, y)
        river_fm.learn_one(x, y)
        if i % 20 == 0 or i == len(stream) - 1:
            assert ours.w0 == pytest.approx(river_fm.intercept, abs=1e-9)
            for k, r in ours._index.as_dict().items():
                worst = max(worst, abs(ours._w[r] - river_fm.weights[k]))
                worst = max(worst, float(np.max(np.abs(ours._V[r] - river_fm.latents[k]))))
    assert worst < 1e-9
    for x, _ in stream[:50]:
        assert ours.predict_proba_one(x)[True] == pytest.approx(river_fm.predict_proba_one(x)[True], abs=1e-9)


def test_learns_a_pairwise_interaction_that_a_linear_model_cannot():
    rng = np.random.default_rng(0)
    stream = []
    for _ in range(6000):
        a, b = int(rng.integers(10)), int(rng.integers(10))
        stream.append(({"a": f"a{a}", "b": f"b{b}"}, bool((a % 2) ^ (b % 2))))
    fm = SparseFM(seed=0)
    lr = linear_model.LogisticRegression()
    auc_fm, auc_lr = metrics.ROCAUC(n_thresholds=50), metrics.ROCAUC(n_thresholds=50)
    for i, (x, y) in enumerate(stream):
        if i >= 3000:
            auc_fm.update(y, fm.predict_proba_one(x)[True])
            auc_lr.update(y, lr.predict_proba_one(one_hot(x))[True])
        fm.learn_one(x, y)
        lr.learn_one(one_hot(x), y)
    assert auc_fm.get() > 0.9
    assert abs(auc_lr.get() - 0.5) < 0.1


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"optimizer": "sgd", "learning_rate": 0.1},
        {"max_features": 60},
        {"min_count": 3, "admission_capacity": 40},
        {"hash_bits": 6},
    ],
    ids=["adagrad", "sgd", "max_features", "min_count", "hash_bits"],
)
def test_learn_batch_equals_the_per_sample_loop(params):
    stream = categorical_stream(1500, seed=2)
    xs, ys = [x for x, _ in stream], [y for _, y in stream]
    loop = SparseFM(seed=9, **params)
    expected = []
    for x, y in stream:
        expected.append(loop.predict_proba_one(x)[True])
        loop.learn_one(x, y)
    batch = SparseFM(seed=9, **params)
    got = np.concatenate([batch.learn_batch(xs[i : i + 256], ys[i : i + 256]) for i in range(0, 1500, 256)])
    assert np.array_equal(got, np.array(expected))  # bit for bit
    assert state_equal(loop, batch)
    if "max_features" in params:
        assert loop.n_evicted > 0
    if "min_count" in params:
        assert loop.n_rejected > 0


def test_the_compiled_per_sample_path_equals_the_python_path():
    """An unbounded model's learn_one adds new keys in compiled code, and hands a sample it
    cannot finish (the arrays out of room) to the Python path. A model made to take the Python
    path for every new key learns the same model, bit for bit, predicting the same all along."""
    stream = [
        (dict(x, id=f"i{i}", tags=[f"t{i}", f"t{i // 7}"]), y)
        for i, (x, y) in enumerate(categorical_stream(3000, seed=2))
    ]
    fast, slow = SparseFM(seed=9), SparseFM(seed=9)
    for x, y in stream:
        slow._pointers[fastpath.M_MODE] = fastpath.MODE_LOOKUP  # (growing the arrays resets it)
        assert fast.predict_proba_one(x) == slow.predict_proba_one(x)
        fast.learn_one(x, y)
        slow.learn_one(x, y)
    assert fast.n_features > 1024  # past the first allocation: growth happened mid-stream
    assert state_equal(fast, slow)


def test_predicting_changes_nothing():
    model = SparseFM(seed=1)
    for x, y in categorical_stream(300, seed=3):
        model.learn_one(x, y)
    arrays, meta = model.export_state()
    before = {k: v.copy() for k, v in arrays.items()}
    for x, _ in categorical_stream(300, seed=4):
        model.predict_proba_one(dict(x, brand_new=f"z{x['user']}"))
        model.predict_one(x)
    model.predict_proba_batch([x for x, _ in categorical_stream(50, seed=5)])
    after, meta_after = model.export_state()
    assert meta == meta_after
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_unseen_features_contribute_nothing():
    model = SparseFM(seed=1)
    for x, y in categorical_stream(200, seed=3):
        model.learn_one(x, y)
    x = {"user": "u1", "ad": "a2"}
    assert model.predict_proba_one(dict(x, never="seen", count=3.0)) == model.predict_proba_one(x)


def test_learn_batch_reports_the_prediction_before_each_update():
    model = SparseFM(seed=1)
    x = {"user": "u1", "ad": "a2"}
    p = model.learn_batch([x, x], [True, True])
    assert p[0] == 0.5  # nothing known yet: w0 = 0 and new features are not counted
    assert p[1] > p[0]


def test_seeded_runs_are_bit_identical_and_seeds_matter():
    stream = categorical_stream(500, seed=6)
    runs = []
    for seed in (5, 5, 6):
        m = SparseFM(seed=seed)
        m.learn_batch([x for x, _ in stream], [y for _, y in stream])
        runs.append(m)
    assert state_equal(runs[0], runs[1])
    assert not state_equal(runs[0], runs[2])


def test_initialisation_does_not_depend_on_arrival_order():
    a, b = SparseFM(seed=3), SparseFM(seed=3)
    a.learn_one({"x": "1", "y": "2"}, True)
    b.learn_one({"z": "9"}, False)
    b.learn_one({"y": "2", "x": "1"}, True)
    np.testing.assert_array_equal(a.initial_latent("y=2"), b.initial_latent("y=2"))
    # the first step from the same initial vector, under the same gradient sign
    assert a._V[a._index.get("x=1")].shape == (8,)
    np.testing.assert_array_equal(SparseFM(seed=3).initial_latent("x=1"), a.initial_latent("x=1"))


@pytest.mark.parametrize(
    "params", [{}, {"optimizer": "sgd"}, {"hash_bits": 8}, {"max_features": 50, "min_count": 2}]
)
def test_export_import_gives_identical_predictions_and_continued_learning(params):
    stream = categorical_stream(1200, seed=8)
    whole = SparseFM(seed=2, **params)
    first = SparseFM(seed=2, **params)
    for x, y in stream[:600]:
        whole.learn_one(x, y)
        first.learn_one(x, y)
    arrays, meta = first.export_state()
    restored = SparseFM.from_state(arrays, meta)
    probe = [x for x, _ in stream[600:700]]
    assert np.array_equal(first.predict_proba_batch(probe), restored.predict_proba_batch(probe))
    for x, y in stream[600:]:
        whole.learn_one(x, y)
        restored.learn_one(x, y)
    assert state_equal(whole, restored)


def test_state_is_plain_arrays_and_json():
    import json

    model = SparseFM(min_count=2, seed=1)
    model.learn_batch([{"k": "é=\n\"'", "n": 2.5}] * 3 + [{"other": "x"}], [1, 0, 1, 0])
    arrays, meta = model.export_state()
    json.dumps(meta)
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    assert "k=é=\n\"'" in SparseFM.from_state(arrays, meta)._index.as_dict()


def test_river_tools_accept_it():
    from river import evaluate

    data = categorical_stream(400, seed=1)
    metric = evaluate.progressive_val_score(dataset=data, model=SparseFM(seed=0), metric=metrics.LogLoss())
    assert 0 < metric.get() < 1
    assert isinstance(SparseFM(seed=0).clone(), SparseFM)


# ---------------------------------------------------------------- bounded memory


N_IDS = 1_000_000


def distinct_ids(chunk: int = 50_000):
    for start in range(0, N_IDS, chunk):
        xs = [{"id": f"u{i}"} for i in range(start, start + chunk)]
        yield xs, [i % 7 == 0 for i in range(start, start + chunk)]


@pytest.mark.slow
def test_max_features_bounds_memory():
    model = SparseFM(max_features=10_000)
    peak = 0
    for xs, ys in distinct_ids():
        model.learn_batch(xs, ys)
        peak = max(peak, model.memory_bytes)
        assert model.n_features <= 10_000
    assert model.n_evicted >= N_IDS - 10_000
    assert peak < 10_000 * 1_000  # well under what a million rows would take


@pytest.mark.slow
def test_min_count_bounds_memory():
    model = SparseFM(min_count=2, admission_capacity=20_000)
    for xs, ys in distinct_ids():
        model.learn_batch(xs, ys)
        assert len(model._pending) <= 20_000
    assert model.n_features == 0  # every id was seen once: none admitted
    assert model.n_rejected == N_IDS
    model.learn_batch([{"id": "u999999"}], [True])  # the most recent one is still being counted
    assert model.n_features == 1


@pytest.mark.slow
def test_hash_bits_fixes_memory():
    model = SparseFM(hash_bits=12)
    start = model.memory_bytes
    for xs, ys in distinct_ids():
        model.learn_batch(xs, ys)
    assert model.memory_bytes == start
    assert model.n_features == 4096


# ---------------------------------------------------------------- bad input, extreme input


@pytest.mark.parametrize(
    ("x", "field"),
    [
        ({"price": None}, "price"),
        ({"price": float("nan")}, "price"),
        ({"price": float("inf")}, "price"),
        ({"price": -float("inf")}, "price"),
        ({"nested": {"a": 1}}, "nested"),
        ({"tags": ["ok", 3]}, "tags"),
        ({"big": 10**400}, "big"),
        ({3: 1.5}, 3),
        ({"obj": object()}, "obj"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(x, field):
    model = SparseFM()
    for call in (lambda: model.learn_one(x, True), lambda: model.predict_proba_one(x)):
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, FeatureError)
        assert info.value.field == field
        assert repr(field) in str(info.value)
    assert model.samples_seen == 0 and model.n_features == 0


def test_a_bad_sample_in_a_batch_learns_nothing():
    model = SparseFM()
    with pytest.raises(FeatureError) as info:
        model.learn_batch([{"a": "1"}, {"a": None}], [True, False])
    assert info.value.index == 1
    assert model.samples_seen == 0 and model.n_features == 0
    # and the failed batch left no trace: the same good batch then gives the same model
    fresh = SparseFM()
    good = [{"a": "1", "b": "2"}, {"a": "3"}]
    for m in (model, fresh):
        m.learn_batch(good, [True, False])
    assert model.n_features == fresh.n_features == 3
    assert model.predict_proba_batch(good).tolist() == fresh.predict_proba_batch(good).tolist()


@pytest.mark.parametrize(
    ("before", "change"),
    [
        ({"a": "1", "n": 2.0}, lambda x: x.update(a="2")),
        ({"a": "1", "n": 2.0}, lambda x: x.pop("n")),
        ({"a": "1", "g": ["x"]}, lambda x: x["g"].append("y")),  # a change a shallow copy cannot see
        ({"a": "1", "g": ["x"]}, lambda x: x["g"].__setitem__(0, "y")),
    ],
)
def test_learn_one_sees_a_sample_changed_after_it_was_predicted(before, change):
    """learn_one learns the sample as it is then, not as it was when predicted."""
    model, reference = SparseFM(), SparseFM()
    warm = {"a": "1", "g": ["x"], "n": 2.0}
    for m in (model, reference):
        m.learn_one(warm, True)
    x = dict(before, g=list(before["g"])) if "g" in before else dict(before)
    model.predict_proba_one(x)
    change(x)
    model.learn_one(x, True)
    reference.learn_one(copy.deepcopy(x), True)
    probe = {"a": "1", "g": ["x", "y"], "n": 2.0}
    assert model.n_features == reference.n_features
    assert model.predict_proba_one(probe) == reference.predict_proba_one(probe)
    assert model.predict_proba_one({"a": "2"}) == reference.predict_proba_one({"a": "2"})


@pytest.mark.parametrize("label", [2, -1, "yes", None, 0.5])
def test_bad_labels_are_refused(label):
    with pytest.raises(LabelError):
        SparseFM().learn_one({"a": "b"}, label)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n_factors", 0),
        ("n_factors", 2.5),
        ("optimizer", "adam"),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("l2_w", -1.0),
        ("init_std", "big"),
        ("max_features", 0),
        ("min_count", 0),
        ("hash_bits", 31),
        ("seed", -1),
    ],
)
def test_constructor_errors_name_the_argument_and_the_range(name, value):
    with pytest.raises(ConfigError) as info:
        SparseFM(**{name: value})
    assert info.value.key == name
    assert name in str(info.value) and "expected" in str(info.value)


def test_extreme_values_never_leave_nan_or_inf():
    rng = np.random.default_rng(0)
    for params in ({"optimizer": "sgd"}, {"optimizer": "adagrad"}):
        model = SparseFM(learning_rate=10.0, **params)
        for _ in range(3000):
            x = {
                "big": float(rng.choice([1e12, -1e12, 1e-12, 3.0])),
                "huge": float(rng.choice([1e300, -1e300])) if rng.random() < 0.05 else 1.0,
                "id": f"i{rng.integers(20)}",
            }
            model.learn_one(x, bool(rng.random() < 0.5))
            p = model.predict_proba_one(x)[True]
            assert 0.0 <= p <= 1.0
        arrays, _ = model.export_state()
        for name, a in arrays.items():
            if a.dtype.kind == "f":
                assert np.isfinite(a).all(), name
        assert model.n_skipped > 0  # the 1e300 samples overflow: skipped, counted


def test_a_copy_learns_on_its_own_arrays():
    """copy.deepcopy and river's clone(include_attributes=True) give a model whose per-sample path
    reads and writes its own arrays: learning on the copy leaves the original as it was."""
    original = SparseFM(seed=3)
    stream = categorical_stream(400, seed=1)
    for x, y in stream[:200]:
        original.learn_one(x, y)
    before = original.export_state()[0]
    for twin in (copy.deepcopy(original), original.clone(include_attributes=True)):
        reference = copy.deepcopy(original)
        for x, y in stream[200:]:
            twin.learn_one(x, y)
            reference.learn_batch([x], [y])
        assert state_equal(twin, reference)
        del twin  # its arrays are freed: the original must not point at them
        after = original.export_state()[0]
        assert all(np.array_equal(before[k], after[k]) for k in before)
        x = stream[0][0]
        assert original.predict_proba_one(x) == {
            False: 1 - original.predict_proba_batch([x])[0],
            True: original.predict_proba_batch([x])[0],
        }
