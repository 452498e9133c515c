"""Rounds of cluster mode (stream_fm/cluster/rounds.py): a partition's round packed as samples,
a round folded by learning every partition's samples in partition order — the single learner on
the stream in round order, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import categorical_stream, state_equal

from stream_fm import ConfigError, SparseFM
from stream_fm.cluster.delta import Assembler, Delta, encode
from stream_fm.cluster.rounds import SAMPLE_ARRAYS, fold_round, pack_round
from stream_fm.errors import DeltaError
from stream_fm.model.features import keys_of


def _split(stream, parts: int):
    """Round-robin partitions of ``stream``, as producers keyed by impression id spread them."""
    return [stream[p::parts] for p in range(parts)]


def _xs_ys(chunk):
    return [x for x, _ in chunk], [y for _, y in chunk]


@pytest.mark.parametrize("optimizer", ["normalized", "adagrad", "sgd"])
def test_folding_rounds_is_the_single_learner_on_the_stream_in_round_order(optimizer):
    stream = categorical_stream(1500, seed=3)
    parts = _split(stream, 3)
    single, cluster = SparseFM(seed=2, optimizer=optimizer), SparseFM(seed=2, optimizer=optimizer)
    for r, start in enumerate(range(0, len(parts[0]), 200)):
        chunks = [part[start : start + 200] for part in parts]
        want = single.learn_batch(*_xs_ys([s for chunk in chunks for s in chunk]))
        deltas = [pack_round(*_xs_ys(chunk), partition=p, round_=r) for p, chunk in enumerate(chunks)]
        got = fold_round(cluster, deltas[::-1])  # in partition order, whatever order they came in
        assert np.array_equal(got, want)  # each sample's probability before it was learned
        assert state_equal(cluster, single), f"round {r}"
    assert cluster.samples_seen == len(stream)


def test_a_round_survives_the_sync_topics_wire_format():
    xs, ys = _xs_ys(categorical_stream(300, seed=6))
    delta = pack_round(xs, ys, partition=2, round_=11)
    assert delta.meta == {"samples": 300, "keys": sum(len(keys_of(x)) for x in xs)}
    assert set(delta.arrays) == set(SAMPLE_ARRAYS) and delta.arrays["key_lengths"].dtype == np.uint8
    assembler, got = Assembler(), None
    messages = encode(delta, max_bytes=4096)
    assert len(messages) > 1  # chunked
    for message in messages:
        got = assembler.add(message) or got
    assert got is not None and got.same_as(delta)
    a, b = SparseFM(seed=0), SparseFM(seed=0)
    assert np.array_equal(fold_round(a, [got]), b.learn_batch(xs, ys))
    assert state_equal(a, b)


def test_long_keys_and_empty_rounds():
    xs = [{"url": "x" * 300, "n": 2.5}, {"url": "y"}]
    delta = pack_round(xs, [True, False], partition=0, round_=0)
    assert delta.arrays["key_lengths"].dtype == np.dtype("<i4")
    empty = pack_round([], [], partition=1, round_=0)
    a, b = SparseFM(seed=0), SparseFM(seed=0)
    assert np.array_equal(fold_round(a, [delta, empty]), b.learn_batch(xs, [True, False]))
    assert state_equal(a, b)
    assert len(fold_round(a, [empty])) == 0 and a.samples_seen == 2


def test_sample_arrays_that_disagree_are_never_learned():
    delta = pack_round(*_xs_ys(categorical_stream(20, seed=1)), partition=0, round_=0)
    broken = {
        "labels": lambda a: a["labels"][:-1],
        "offsets": lambda a: a["offsets"][::-1].copy(),
        "key_lengths": lambda a: a["key_lengths"] + 1,
        "values": lambda a: np.where(np.arange(len(a["values"])) == 0, np.nan, a["values"]),
    }
    for name, damage in broken.items():
        arrays = dict(delta.arrays, **{name: damage(delta.arrays)})
        model = SparseFM(seed=0)
        with pytest.raises(DeltaError, match="partition 0 round 0"):
            fold_round(model, [Delta(0, 0, arrays, dict(delta.meta))])
        assert model.samples_seen == 0 and model.n_features == 0, name
    with pytest.raises(ValueError, match="one delta per partition"):
        fold_round(SparseFM(), [delta, delta])


@pytest.mark.parametrize(("setting", "value"), [("max_features", 100), ("min_count", 2), ("hash_bits", 10)])
def test_settings_that_depend_on_arrival_order_are_refused(setting, value):
    with pytest.raises(ConfigError, match=f"{setting}.*cluster mode"):
        fold_round(SparseFM(**{setting: value}), [])
