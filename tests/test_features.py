"""The feature encoder (C fast path, Python slow path): the rules, its buffers, its errors."""

from __future__ import annotations

import random
import zlib
from collections import OrderedDict
from types import MappingProxyType

import numpy as np
import pytest
from helpers import categorical_stream

from stream_fm import FeatureError, SparseFM
from stream_fm.model import fastpath
from stream_fm.model.features import check, encode_batch, keys_of


class Label(str):
    """A str subclass: not the C encoder's case, the slow path's."""


def reference_keys(x: dict) -> list[tuple[str, float]]:
    """The documented rules, written out plainly (valid samples only)."""
    out = []
    for field, value in x.items():
        if isinstance(value, str):
            out.append((f"{field}={value}", 1.0))
        elif isinstance(value, (list, tuple)):
            out += [(f"{field}={item}", 1.0) for item in value]
        elif float(value) != 0.0:
            out.append((field, float(value)))
    return out


@pytest.mark.parametrize(
    "x",
    [
        {"ad": "a17", "price": 3.5, "genres": ["Drama", "War"], "mobile": False, "new": True},
        {"n": 0, "f": 0.0, "b": False, "empty": [], "t": ("x", "y"), "i": -7},
        {"big": 2**53 + 1, "huge": 10**300, "neg": -(2**63)},  # ints rounded exactly as float() does
        {"sub": Label("x"), "np_f": np.float32(0.25), "np_i": np.int64(-3), "np_b": np.bool_(True)},
        {"é": "ü", "emoji": "🙂", "lone": "\udc80", "sur\ud800": 1.5, "nul": "a\x00b"},
        {3: "x", ("t",): "y"},  # non-string names: formatted into categorical keys
        {"": "", "=": "="},
    ],
    ids=["basic", "zeros-and-tuples", "big-ints", "subclasses-numpy", "unicode", "non-str-names", "empty"],
)
def test_keys_follow_the_rules(x):
    assert keys_of(x) == reference_keys(x)


def test_any_number_and_length_of_keys_fits():
    """Past the encoder's inline buffers (256 keys, 4 KiB of key bytes) it grows; per-sample and
    batch paths agree there too."""
    wide = {f"f{i}": f"v{i}" for i in range(1000)}
    long = {"k": "x" * 10_000, "l": ["y" * 5000, "z" * 5000]}
    for x in (wide, long):
        assert keys_of(x) == reference_keys(x)
    model = SparseFM(seed=1)
    for x in (wide, long, wide):
        model.learn_one(x, True)
    assert model.n_features == 1003
    probe = [wide, long, {"f3": "v3", "k": "x" * 10_000}]
    assert [model.predict_proba_one(x)[True] for x in probe] == model.predict_proba_batch(probe).tolist()


def test_random_samples_round_trip_through_the_encoder():
    rng = random.Random(5)
    alphabet = "ab=é🙂\x00 "
    xs = []
    for _ in range(300):
        x: dict = {}
        for _ in range(rng.randrange(6)):
            field = "".join(rng.choices(alphabet, k=rng.randrange(4)))
            kind = rng.randrange(4)
            if kind == 0:
                x[field] = "".join(rng.choices(alphabet, k=rng.randrange(5)))
            elif kind == 1:
                x[field] = rng.choice([0.0, 1.5, -2.0, 1e-300, 1e300])
            elif kind == 2:
                x[field] = [rng.choice("xyz") for _ in range(rng.randrange(3))]
            else:
                x[field] = rng.choice([True, False, 0, 5])
        xs.append(x)
    data, lengths, vals, offsets = encode_batch(xs)
    keys = [
        bytes(data[a - n : a]).decode("utf-8", "surrogatepass")
        for a, n in zip(np.cumsum(lengths), lengths, strict=True)
    ]
    for s, x in enumerate(xs):
        got = list(
            zip(keys[offsets[s] : offsets[s + 1]], vals[offsets[s] : offsets[s + 1]].tolist(), strict=True)
        )
        assert got == reference_keys(x) == keys_of(x)


@pytest.mark.parametrize(
    ("x", "field", "words"),
    [
        ({"a": "1", "p": None}, "p", "None"),
        ({"p": float("nan")}, "p", "not finite"),
        ({"p": -float("inf")}, "p", "not finite"),
        ({"p": np.float64("inf")}, "p", "not finite"),
        ({"big": 10**400}, "big", "too large"),
        ({"tags": ["ok", 3]}, "tags", "only strings"),
        ({"tags": ("ok", Label("x"))}, "tags", "only strings"),
        ({"d": {"a": 1}}, "d", "dict"),
        ({3: 1.5}, 3, "field names must be strings"),
        ({"o": object()}, "o", "object"),
    ],
)
def test_bad_values_name_the_field(x, field, words):
    with pytest.raises(FeatureError) as info:
        keys_of(x)
    assert info.value.field == field and info.value.index is None
    assert words in str(info.value)
    with pytest.raises(FeatureError) as info:
        encode_batch([{"fine": "x"}, {"fine": "y"}, x])
    assert info.value.field == field and info.value.index == 2
    assert str(info.value).startswith("sample 2: ")


def test_samples_are_mappings():
    x = {"a": "1", "n": 2.0}
    for mapping in (OrderedDict(x), MappingProxyType(x)):
        assert keys_of(mapping) == keys_of(x)
    for bad in ([("a", "1")], "a=1", None):
        with pytest.raises(FeatureError, match="must be a dict"):
            check(bad)
    with pytest.raises(FeatureError) as info:
        encode_batch([x, None])
    assert info.value.index == 1


def test_hashing_buckets_are_crc32_of_the_key_as_before():
    """Hashing mode's bucket of a key is zlib.crc32(key, crc32(seed)) & mask, in the compiled
    per-sample path and the batch path alike: a hashed snapshot keeps its meaning."""
    seed, bits = 7, 12
    salt = zlib.crc32(seed.to_bytes(8, "little"))
    sample = {"ad": "a17", "é": "🙂", "price": 2.0, "": [""], "x" * 299: "x"}
    keys = ["ad=a17", "é=🙂", "price", "=", "x" * 299 + "=x"]
    expected = [zlib.crc32(k.encode("utf-8"), salt) & ((1 << bits) - 1) for k in keys]
    data, lengths, _, _ = encode_batch([sample])
    rows = np.empty(len(lengths), np.int64)
    fastpath.bucket_rows(data, lengths, *fastpath.hashing(seed, bits), rows)
    assert rows.tolist() == expected
    one, batch = SparseFM(hash_bits=bits, seed=seed), SparseFM(hash_bits=bits, seed=seed)
    x = {"ad": "a17", "é": "🙂"}
    one.learn_one(x, True)
    batch.learn_batch([x], [True])
    for m in (one, batch):
        assert sorted(np.flatnonzero(m._last >= 0).tolist()) == sorted(expected[:2])


def test_check_accepts_what_the_model_learns():
    for x, _ in categorical_stream(50, seed=1):
        check(x)
    with pytest.raises(FeatureError):
        check({"a": [1]})
