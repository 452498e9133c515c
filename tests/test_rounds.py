"""Rounds of cluster mode (stream_fm/cluster/rounds.py): a round learned on the base and undone,
its delta folded back; one partition reproduces the single learner bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import categorical_stream, state_equal

from stream_fm import ConfigError, SparseFM
from stream_fm.cluster.delta import Assembler, encode
from stream_fm.cluster.rounds import RULES, fold_round, learn_round


def _split(stream, parts: int):
    """Round-robin partitions of ``stream``, as producers keyed by impression id spread them."""
    return [stream[p::parts] for p in range(parts)]


def _xs_ys(chunk):
    return [x for x, _ in chunk], [y for _, y in chunk]


@pytest.mark.parametrize("optimizer", ["normalized", "adagrad", "sgd"])
def test_one_partition_reproduces_the_single_learner(optimizer):
    stream = categorical_stream(1500, seed=3)
    single, base = SparseFM(seed=2, optimizer=optimizer), SparseFM(seed=2, optimizer=optimizer)
    for r, start in enumerate(range(0, len(stream), 200)):
        xs, ys = _xs_ys(stream[start : start + 200])
        want = single.learn_batch(xs, ys)
        delta, got = learn_round(base, xs, ys, partition=0, round_=r)
        assert np.array_equal(got, want)  # the same reports, before each sample is learned
        fold_round(base, [delta])
        assert state_equal(base, single), f"round {r}"


def test_learning_a_round_leaves_the_base_as_it_was():
    stream = categorical_stream(900, seed=4)
    base = SparseFM(seed=1)
    base.learn_batch(*_xs_ys(stream[:600]))
    before, _ = base.export_state()
    probe = [x for x, _ in stream[600:]]
    p_before = base.predict_proba_batch(probe)
    delta, _ = learn_round(base, *_xs_ys(stream[600:]), partition=3, round_=7)
    assert np.array_equal(base.predict_proba_batch(probe), p_before)
    after, _ = base.export_state()
    n = len(before["w"])
    for name in ("w", "V", "gw", "gV", "last", "bias"):
        assert np.array_equal(after[name][:n] if name != "bias" else after[name], before[name]), name
    assert (after["last"][n:] == -1).all()  # rows given to new keys: untouched, invisible
    assert delta.meta["samples"] == 300 and len(delta.arrays["w"]) > 0


@pytest.mark.parametrize("optimizer", ["normalized", "sgd"])  # sgd: no accumulators to merge
def test_several_partitions_fold_the_same_whatever_order_the_deltas_arrive_in(optimizer):
    stream = categorical_stream(1200, seed=5)
    a, b = SparseFM(seed=0, optimizer=optimizer), SparseFM(seed=0, optimizer=optimizer)
    for r in range(4):
        chunk = stream[r * 300 : (r + 1) * 300]
        deltas = [
            learn_round(a, *_xs_ys(part), partition=p, round_=r)[0] for p, part in enumerate(_split(chunk, 3))
        ]
        fold_round(a, deltas)
        fold_round(b, deltas[::-1])
    assert a.samples_seen == b.samples_seen == 1200
    a_state, _ = a.export_state()
    b_state, _ = b.export_state()
    assert np.array_equal(a_state["bias"], b_state["bias"])
    names = [name for name in ("w", "V", "gw", "gV", "last") if name in a_state]
    assert ("gw" in names) == (optimizer != "sgd")
    for name in names:  # rows may be numbered apart: by key
        assert np.array_equal(_by_key(a, a_state[name]), _by_key(b, b_state[name])), name


def _by_key(model: SparseFM, values: np.ndarray) -> np.ndarray:
    index = model._index.as_dict()
    return values[[index[key] for key in sorted(index)]]


def test_a_row_several_partitions_trained_takes_their_mean_and_every_growth():
    base = SparseFM(seed=0, center=False)  # (centred, a feature in every sample would not move)
    base.learn_batch([{"ad": "a1", "user": "u0"}] * 20, [True, False] * 10)
    row = base._index.as_dict()["ad=a1"]
    w0, gw0 = base._w[row], base._gw[row]
    d1, _ = learn_round(base, [{"ad": "a1", "user": "u1"}] * 5, [True] * 5, partition=0, round_=0)
    d2, _ = learn_round(base, [{"ad": "a1", "user": "u2"}] * 5, [False] * 5, partition=1, round_=0)
    i1, i2 = (_position(d, "ad=a1") for d in (d1, d2))
    fold_round(base, [d1, d2])
    assert base._w[row] == pytest.approx((d1.arrays["w"][i1] + d2.arrays["w"][i2]) / 2, rel=1e-12)
    assert base._gw[row] == pytest.approx(gw0 + (d1.arrays["gw"][i1] - gw0) + (d2.arrays["gw"][i2] - gw0))
    assert base._w[row] != w0 and base.samples_seen == 30
    u1 = base._index.as_dict()["user=u1"]  # trained by partition 0 alone: its values as they are
    assert base._w[u1] == d1.arrays["w"][_position(d1, "user=u1")]


def _position(delta, key: str) -> int:
    from stream_fm.keyindex import decode_keys

    return decode_keys(delta.arrays["key_bytes"], delta.arrays["key_offsets"]).index(key)


def test_a_delta_survives_the_sync_topics_wire_format():
    base = SparseFM(seed=0)
    delta, _ = learn_round(base, *_xs_ys(categorical_stream(300, seed=6)), partition=2, round_=11)
    assembler, got = Assembler(), None
    for message in encode(delta, max_bytes=4096):
        got = assembler.add(message) or got
    assert got is not None and got.same_as(delta)
    again = SparseFM(seed=0)
    fold_round(again, [got])
    fold_round(base, [delta])
    assert state_equal(again, base)


@pytest.mark.parametrize(("setting", "value"), [("max_features", 100), ("min_count", 2), ("hash_bits", 10)])
def test_settings_that_depend_on_arrival_order_are_refused(setting, value):
    model = SparseFM(**{setting: value})
    with pytest.raises(ConfigError, match=f"{setting}.*cluster mode"):
        learn_round(model, [{"ad": "a"}], [True], partition=0, round_=0)
    with pytest.raises(ConfigError, match=setting):
        fold_round(model, [])


def test_the_merge_rules_differ_only_on_rows_several_partitions_trained():
    """mean, sqrt, sum: a shared row's weight is the base plus the sum of the partitions' changes
    over m, sqrt(m) or 1; the accumulators are the base plus every growth whatever the rule."""
    stream = categorical_stream(600, seed=8)
    models = {rule: SparseFM(seed=0) for rule in RULES}
    for rule, model in models.items():
        model.learn_batch(*_xs_ys(stream[:300]))
        parts = enumerate(_split(stream[300:], 2))
        deltas = [learn_round(model, *_xs_ys(part), partition=p, round_=0)[0] for p, part in parts]
        if rule == "mean":
            shared = _shared_keys(deltas)
            base_w = {key: model._w[model._index.as_dict()[key]] for key in shared}
            changes = {
                key: sum(d.arrays["w"][_position(d, key)] - base_w[key] for d in deltas) for key in shared
            }
        fold_round(model, deltas, rule=rule)
    assert shared  # the two partitions share the frequent ids
    for key in shared:
        rows = {rule: model._index.as_dict()[key] for rule, model in models.items()}
        for rule, divide in (("mean", 2), ("sqrt", np.sqrt(2)), ("sum", 1)):
            want = base_w[key] + changes[key] / divide
            assert models[rule]._w[rows[rule]] == pytest.approx(want, rel=1e-9, abs=1e-12), (rule, key)
        assert models["mean"]._gw[rows["mean"]] == models["adagrad"]._gw[rows["adagrad"]]
    with pytest.raises(ConfigError, match="rule"):
        fold_round(SparseFM(), [], rule="median")


def _shared_keys(deltas) -> list[str]:
    from stream_fm.keyindex import decode_keys

    sets = [set(decode_keys(d.arrays["key_bytes"], d.arrays["key_offsets"])) for d in deltas]
    return sorted(set.intersection(*sets))
