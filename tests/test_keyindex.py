"""The feature-key index against a plain dict: same answers under any mix of inserts and removals."""

from __future__ import annotations

import random

import numpy as np
import pytest

from stream_fm.model.keyindex import KeyIndex, add_keys, decode_keys, encode_keys, pack_keys


def lookup(index: KeyIndex, keys: list[str]) -> list[int]:
    rows, absent = index.lookup(keys)
    assert absent == [i for i, r in enumerate(rows.tolist()) if r < 0]
    return rows.tolist()


def insert(index: KeyIndex, pairs: dict[str, int]) -> None:
    index.insert(list(pairs), np.fromiter(pairs.values(), np.int64, len(pairs)))


@pytest.mark.parametrize("key_length", [3, 40, 700])  # 700: removals make the arena compact itself
def test_follows_a_dict_through_random_inserts_and_removals(key_length):
    rng = random.Random(key_length)
    index, expected = KeyIndex(rows=4), {}
    free: list[int] = []
    next_row = 0
    universe = [f"f{rng.randrange(50)}=" + "x" * rng.randrange(key_length) + str(i) for i in range(6000)]
    for _ in range(60):
        new = {}
        for key in rng.sample(universe, 200):
            if key not in expected and key not in new:
                if free:
                    new[key] = free.pop()
                else:
                    new[key], next_row = next_row, next_row + 1
        insert(index, new)
        expected.update(new)
        gone = rng.sample(sorted(expected.values()), len(expected) // 3)
        removed = index.remove(gone)
        by_row = {row: key for key, row in expected.items()}
        assert removed == [by_row[r] for r in gone]
        for key in removed:
            del expected[key]
        free.extend(gone)
        assert len(index) == len(expected)
        probe = rng.sample(universe, 500) + list(expected)[:100]
        assert lookup(index, probe) == [expected.get(k, -1) for k in probe]
    assert index.as_dict() == expected


def test_any_string_is_a_key_and_survives_export():
    keys = ["", "a=b", "a=b\n", "é=ü", "k=\"'", "\ud800lone", "x" * 5000, "日本=語", "a\x00b"]
    index = KeyIndex()
    insert(index, {k: i for i, k in enumerate(keys)})
    assert lookup(index, keys) == list(range(len(keys)))
    assert lookup(index, ["a=b ", "a", "é=u"]) == [-1, -1, -1]
    data, offsets = index.key_bytes(np.arange(len(keys) + 2))
    assert decode_keys(data, offsets) == [*keys, "", ""]
    reloaded = KeyIndex.from_keys(data, offsets, keyless=[len(keys), len(keys) + 1])
    assert reloaded.as_dict() == index.as_dict()
    assert [index.key_of(i) for i in range(len(keys))] == keys


def test_add_keys_gives_new_keys_the_next_rows_in_order_of_first_appearance():
    """``add_keys`` as a dict would do it, also when it runs out of rows mid-batch and resumes."""
    rng = random.Random(7)
    index, expected, next_row = KeyIndex(rows=2), {}, 0
    for limit_step in (1, 3, 1000):
        keys = [f"k{rng.randrange(400)}" + "é" * rng.randrange(2) for _ in range(700)]
        data, lengths = pack_keys(keys)
        rows = np.empty(len(keys), np.int64)
        done, calls = 0, 0
        while done < len(keys):
            stop = next_row + limit_step
            done, next_row = add_keys(data, lengths, done, next_row, stop, rows, *index.add_args)
            if done < len(keys) and next_row < stop:  # the index is full
                index.make_room(len(keys) - done, len(data), stop)
            calls += 1
        for key in keys:
            expected.setdefault(key, len(expected))
        assert rows.tolist() == [expected[k] for k in keys]
        assert next_row == len(expected) == len(index)
        assert calls > 1 or limit_step == 1000
    assert index.as_dict() == expected
    assert encode_keys(list(expected))[1].tolist() == index.key_bytes(np.arange(len(expected)))[1].tolist()


def test_a_key_already_present_is_refused_by_name():
    index = KeyIndex()
    insert(index, {"ad=a1": 0})
    with pytest.raises(KeyError, match="ad=a1"):
        insert(index, {"ad=a2": 1, "ad=a1": 2})


def test_the_salt_changes_the_layout_never_the_answers():
    keys = [f"user=u{i}" for i in range(3000)]
    a, b = KeyIndex(salt=1), KeyIndex(salt=2)
    for index in (a, b):
        insert(index, {k: i for i, k in enumerate(keys)})
    assert not np.array_equal(a._table, b._table)
    assert lookup(a, keys) == lookup(b, keys) == list(range(len(keys)))


def test_a_stored_key_costs_tens_of_bytes_not_a_python_object():
    n = 200_000
    index = KeyIndex(rows=n)
    insert(index, {f"f3=id{i}": i for i in range(n)})
    # table (4 B a slot, at most half full), start 8 B, length 4 B, tag 4 B, arena 2x the key bytes
    assert index.nbytes / n < 64
