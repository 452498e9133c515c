"""The sync topic's wire format (stream_fm/cluster/delta.py): round trips, chunking under a size
limit, and every kind of damage detected before anything is applied."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from stream_fm import ConfigError, DeltaError
from stream_fm.cluster import delta as wire
from stream_fm.cluster.delta import ALLOWED_DTYPES, Assembler, Delta, _payload, decode_payload, encode
from stream_fm.model.keyindex import decode_keys, encode_keys

KEYS = ["ad=a17", "user=ü42", "tags=☃", "lone=\udcff", "", "x" * 300]


def a_delta(partition: int = 3, rnd: int = 41, rows: int = 500, k: int = 8, seed: int = 0) -> Delta:
    rng = np.random.default_rng(seed)
    keys = [f"f{i % 7}=v{i}" for i in range(rows - len(KEYS))] + KEYS
    key_bytes, key_offsets = encode_keys(keys)
    arrays = {
        "key_bytes": key_bytes,
        "key_offsets": key_offsets,
        "dw": rng.normal(size=rows),
        "dV": rng.normal(size=(rows, k)),
        "dgw": rng.random(rows).astype(np.float32),
        "scale": np.abs(rng.normal(size=rows)).astype(np.float16),
        "last": rng.integers(-1, 10**12, rows),
        "empty": np.zeros((0, k)),
    }
    arrays["dV"][0, 0] = -0.0  # signed zeros and subnormals survive
    arrays["dV"][0, 1] = 5e-324
    meta = {"end_offset": 123_456, "pending_low": 120_001, "samples": 998, "ts": [1.5, 2.25]}
    return Delta(partition, rnd, arrays, meta)


def assemble(messages: list[bytes]) -> list[Delta]:
    assembler = Assembler()
    out = [d for d in map(assembler.add, messages) if d is not None]
    assert assembler.pending == []
    return out


def test_a_delta_round_trips_bit_for_bit_through_one_message():
    delta = a_delta()
    messages = encode(delta, max_bytes=1 << 20)
    assert len(messages) == 1
    (back,) = assemble(messages)
    assert back.same_as(delta)
    assert decode_keys(back.arrays["key_bytes"], back.arrays["key_offsets"])[-len(KEYS) :] == KEYS
    assert back.arrays["dV"].shape == (500, 8) and np.signbit(back.arrays["dV"][0, 0])


@pytest.mark.parametrize("max_bytes", [800, 4096, 50_000])
def test_chunks_stay_under_the_size_limit_and_reassemble_in_any_order(max_bytes):
    delta = a_delta(rows=3000)  # (random numbers: the compressed payload is still ~200 kB)
    messages = encode(delta, max_bytes)
    assert all(len(m) <= max_bytes for m in messages)
    assert len(messages) > 1
    shuffled = messages[:]
    random.Random(max_bytes).shuffle(shuffled)
    (back,) = assemble(shuffled)
    assert back.same_as(delta)


def test_deltas_interleaved_on_the_topic_are_told_apart():
    one, two = a_delta(partition=0, rnd=5, seed=1), a_delta(partition=1, rnd=5, seed=2)
    m1, m2 = encode(one, 2000), encode(two, 2000)
    mixed = [m for pair in zip(m1, m2, strict=False) for m in pair] + m1[len(m2) :] + m2[len(m1) :]
    backs = assemble(mixed)
    assert sorted((d.partition, d.round) for d in backs) == [(0, 5), (1, 5)]
    for d in backs:
        assert d.same_as(one if d.partition == 0 else two)


def test_a_chunk_read_twice_is_taken_once():
    messages = encode(a_delta(), 3000)
    assembler = Assembler()
    assert assembler.add(messages[0]) is None
    assert assembler.add(messages[0]) is None  # a re-read after a restart
    results = [assembler.add(m) for m in messages[1:]]
    assert results[-1] is not None and results[-1].same_as(a_delta())


def test_a_flipped_bit_anywhere_is_detected():
    messages = encode(a_delta(), 3000)
    rng = random.Random(7)
    for _ in range(40):
        i = rng.randrange(len(messages))
        damaged = bytearray(messages[i])
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        with pytest.raises(DeltaError):
            assemble([*messages[:i], bytes(damaged), *messages[i + 1 :]])


def test_a_truncated_message_is_detected():
    messages = encode(a_delta(), 3000)
    for cut in (3, 7, 40, len(messages[1]) - 1):
        with pytest.raises(DeltaError, match=r"truncated|corrupt|magic|JSON"):
            assemble([messages[0], messages[1][:cut], *messages[2:]])


def test_two_deltas_of_one_round_assemble_side_by_side():
    # two members published the same partition's round (a move): both come out, whole, in the
    # order their last chunks arrive; which one counts is the reader's rule
    one, two = a_delta(seed=1), a_delta(seed=2)  # same partition and round, other numbers
    a, b = encode(one, 3000), encode(two, 3000)
    assert len(a) == len(b) > 2
    interleaved = [m for pair in zip(a, b, strict=True) for m in pair]
    first, second = assemble(interleaved)
    assert first.same_as(one) and second.same_as(two)


def resigned(message: bytes, **changes) -> bytes:
    """``message`` with its header changed and checksummed anew (a sender that says otherwise)."""
    header, start = wire._split(message, wire.CHUNK_MAGIC, "sync message")
    header.update(changes)
    fields = {k: v for k, v in header.items() if k != "chunk_sha256"}
    header["chunk_sha256"] = wire._chunk_digest(fields, message[start:])
    body = json.dumps(header, separators=(",", ":")).encode()
    return wire.CHUNK_MAGIC + wire._U32.pack(len(body)) + body + message[start:]


@pytest.mark.parametrize("field", ["count", "codec"])
def test_chunks_that_disagree_are_refused(field):
    a = encode(a_delta(seed=1), 3000)
    lying = resigned(a[1], **{"count": len(a) + 1} if field == "count" else {"codec": "zlib"})
    assert lying != a[1]
    assembler = Assembler()
    assembler.add(a[0])
    with pytest.raises(DeltaError, match="disagrees"):
        assembler.add(lying)


def test_a_payload_never_unpickles_and_checks_its_header():
    payload = _payload(a_delta(rows=20))
    bad = payload.replace(b'"<f8"', b'"|O8"', 1)  # same length: the header still parses
    with pytest.raises(DeltaError, match="not allowed"):
        decode_payload(bad)
    with pytest.raises(DeltaError, match="after the last array"):
        decode_payload(payload + b"\0")
    with pytest.raises(DeltaError, match="runs past"):
        decode_payload(payload[:-1])
    with pytest.raises(DeltaError, match=r"is \|O"):
        encode(Delta(0, 0, {"x": np.array([object()])}), 4096)
    with pytest.raises(DeltaError, match="plain JSON"):
        encode(Delta(0, 0, meta={"x": float("nan")}), 4096)
    assert "<f8" in ALLOWED_DTYPES and "|O" not in ALLOWED_DTYPES


def test_a_big_endian_array_is_sent_little_endian():
    delta = Delta(0, 1, {"w": np.arange(5, dtype=">f8")})
    (back,) = assemble(encode(delta, 4096))
    assert back.arrays["w"].dtype.str == "<f8" and back.arrays["w"].tolist() == [0, 1, 2, 3, 4]


def test_a_size_limit_too_small_for_a_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="max_bytes"):
        encode(a_delta(), 100)


def test_the_payload_travels_compressed_and_expands_within_bounds(monkeypatch):
    samples = Delta(0, 3, {"key_bytes": np.frombuffer(b"ad=a17" * 5000, np.uint8)})
    messages = encode(samples, 1 << 20)
    assert sum(map(len, messages)) < len(_payload(samples)) / 20  # (keys repeat)
    (back,) = assemble(messages)
    assert back.same_as(samples)
    monkeypatch.setattr(wire, "MAX_PAYLOAD", 1000)
    with pytest.raises(DeltaError, match="partition 0 round 3: the payload expands past 1000 bytes"):
        assemble(messages)
    monkeypatch.setattr(wire, "MAX_PAYLOAD", 1 << 30)
    for codec in wire.CODECS:  # sent uncompressed, said to be compressed
        monkeypatch.setattr(wire, "_compress", lambda data, codec: data)
        with pytest.raises(DeltaError, match="partition 0 round 3: the payload does not expand"):
            assemble(encode(samples, 1 << 20, codec))


def test_rounds_compressed_with_zlib_by_the_first_release_still_read():
    """The first release of this format compressed with zlib and named no codec in the header."""
    delta = a_delta()
    (message,) = encode(delta, 1 << 20, "zlib")
    header, start = wire._split(message, wire.CHUNK_MAGIC, "sync message")
    assert header.pop("codec") == "zlib"
    header["chunk_sha256"] = header["payload_sha256"]  # (of the bytes alone then: one chunk, the payload)
    body = json.dumps(header, separators=(",", ":")).encode()
    first_release = wire.CHUNK_MAGIC + wire._U32.pack(len(body)) + body + message[start:]
    (back,) = assemble([first_release])
    assert back.same_as(delta)
    assert len(encode(delta, 1 << 20)[0]) != len(message)  # (lz4 now)


def test_a_codec_this_release_does_not_know_is_refused_naming_what_it_reads():
    (message,) = encode(a_delta(), 1 << 20)
    with pytest.raises(DeltaError, match="codec 'zst': this release reads lz4 and zlib"):
        assemble([resigned(message, codec="zst")])
    renamed = message.replace(b'"codec":"lz4"', b'"codec":"zst"')  # (without a new checksum)
    with pytest.raises(DeltaError, match="do not match its sha256"):
        assemble([renamed])
    with pytest.raises(ConfigError, match="codec"):
        encode(a_delta(), 1 << 20, "zstd")
