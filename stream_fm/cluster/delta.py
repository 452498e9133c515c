"""A partition's delta for one round, and its wire format on the sync topic (cluster mode).

A :class:`Delta` is what one partition adds to one round: named numeric arrays (the samples it
made, packed: :mod:`stream_fm.cluster.rounds`) plus a JSON-able ``meta`` (offsets, counters).
Members exchange deltas as Kafka messages, so the format is a contract between processes, and
between releases (format 2: samples; format 1 carried changes of the model, and is refused):

- **payload**: ``b"SFMD"``, a little-endian u32 header length, the header (JSON, UTF-8:
  ``format``, ``partition``, ``round``, ``meta``, and ``arrays`` as ``[name, dtype, shape]``), then
  each array's bytes, little-endian, C order, back to back. Numbers only: the dtypes allowed are
  ``ALLOWED_DTYPES``; nothing is ever unpickled.
- **on the wire** the payload is compressed, LZ4 (frame format): samples repeat keys, and a
  round's payload shrinks about 4 times (94 to 22 B an event on the demo stream) for 0.1 µs a
  sample to compress and 0.07 to expand, where zlib at level 1 (what the chunk header names when
  it names no codec: the first release of this format) shrank it 7 times for 0.4 and 0.2 µs, which
  every member pays for every round (``benchmarks/bench_cluster.py``). It expands to at most
  ``MAX_PAYLOAD`` bytes.
- **messages**: the compressed payload cut into chunks so that every message stays under the
  broker's size limit. A message is ``b"SFMC"``, a u32 header length, the chunk header (JSON:
  ``partition``, ``round``, ``index``, ``count``, ``codec``, ``payload_sha256``, ``chunk_sha256``),
  then the chunk's bytes.

:class:`Assembler` takes messages in any order, interleaved between deltas, and hands back each
delta once all its chunks are in. Every chunk is checked against its own sha256 (of its bytes and
its header's other fields) and the whole (compressed) payload against ``payload_sha256``;
anything that does not match — a flipped bit, a truncated message, chunks of one delta that
disagree — raises :class:`DeltaError` and is never applied. A chunk that arrives twice (a re-read
after a restart) is taken once if it is the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import lz4.frame
import numpy as np

from stream_fm.errors import ConfigError, DeltaError

__all__ = ["ALLOWED_DTYPES", "CODECS", "FORMAT", "Assembler", "Delta", "chunk_key", "encode"]

FORMAT = 2
PAYLOAD_MAGIC = b"SFMD"
CHUNK_MAGIC = b"SFMC"
# numeric types only, little-endian (or byte-sized): a delta never carries an object array
ALLOWED_DTYPES = ("<f8", "<f4", "<f2", "<i8", "<i4", "|u1", "|i1")
_U32 = struct.Struct("<I")
MAX_PAYLOAD = 1 << 30  # bytes a round's payload may expand to
CODECS = ("lz4", "zlib")  # what a payload may be compressed with (the first publishes)
_CHUNK_HEADER_ROOM = 400  # bytes a chunk's magic, length and JSON header take at most


@dataclass
class Delta:
    """Round ``round`` of partition ``partition``: named arrays and a JSON-able ``meta``."""

    partition: int
    round: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def same_as(self, other: Delta) -> bool:
        """Equal in every field, arrays bit for bit (dtype and shape included)."""
        return (
            (self.partition, self.round, self.meta) == (other.partition, other.round, other.meta)
            and self.arrays.keys() == other.arrays.keys()
            and all(_identical(a, other.arrays[name]) for name, a in self.arrays.items())
        )


def encode(delta: Delta, max_bytes: int, codec: str = "lz4") -> list[bytes]:
    """The delta as messages of at most ``max_bytes`` each (the broker's ``max.message.bytes``
    less what Kafka adds to a record), in chunk order; ``codec``: one of ``CODECS``."""
    if not isinstance(max_bytes, int) or max_bytes < 2 * _CHUNK_HEADER_ROOM:
        raise ConfigError("max_bytes", max_bytes, f"an integer >= {2 * _CHUNK_HEADER_ROOM}")
    if codec not in CODECS:
        raise ConfigError("codec", codec, " or ".join(CODECS))
    payload = _compress(_payload(delta), codec)
    room = max_bytes - _CHUNK_HEADER_ROOM
    pieces = [payload[i : i + room] for i in range(0, len(payload), room)]
    digest = hashlib.sha256(payload).hexdigest()
    messages = []
    for index, piece in enumerate(pieces):
        fields = {"partition": delta.partition, "round": delta.round, "index": index, "count": len(pieces),
                  "codec": codec, "payload_sha256": digest}  # fmt: skip
        header = {**fields, "chunk_sha256": _chunk_digest(fields, piece)}
        body = json.dumps(header, separators=(",", ":")).encode()
        messages.append(CHUNK_MAGIC + _U32.pack(len(body)) + body + piece)
    return messages


def _chunk_digest(fields: dict[str, Any], piece: bytes) -> str:
    """A chunk's sha256: of its header's other fields (canonical JSON) and its bytes, so that a
    damaged header is caught as a damaged chunk is. (The first release of this format, whose
    headers name no codec, hashed the bytes alone.)"""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    digest.update(piece)
    return digest.hexdigest()


def _payload(delta: Delta) -> bytes:
    arrays = []
    blobs = []
    for name, a in delta.arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.str not in ALLOWED_DTYPES:
            raise DeltaError(f"array {name!r} is {a.dtype.str}: expected one of {ALLOWED_DTYPES}")
        arrays.append([name, a.dtype.str, list(a.shape)])
        blobs.append(a.tobytes())
    header = {
        "format": FORMAT,
        "partition": delta.partition,
        "round": delta.round,
        "meta": delta.meta,
        "arrays": arrays,
    }
    try:
        body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise DeltaError(f"meta is not plain JSON (numbers finite): {e}") from e
    return b"".join([PAYLOAD_MAGIC, _U32.pack(len(body)), body, *blobs])


def decode_payload(payload: bytes) -> Delta:
    """A delta from its payload (checksums are the caller's: :class:`Assembler` checks them)."""
    header, offset = _split(payload, PAYLOAD_MAGIC, "payload")
    if header.get("format") != FORMAT:
        raise DeltaError(f"format {header.get('format')!r} is not supported (expected {FORMAT})")
    arrays = {}
    try:
        for name, dtype, shape in header["arrays"]:
            if dtype not in ALLOWED_DTYPES or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise DeltaError(f"array {name!r}: dtype {dtype!r} and shape {shape!r} are not allowed")
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if offset + size > len(payload):
                raise DeltaError(f"array {name!r} runs past the end of the payload (truncated)")
            arrays[name] = np.frombuffer(payload, dtype, int(np.prod(shape)), offset).reshape(shape)
            offset += size
        partition, rnd, meta = int(header["partition"]), int(header["round"]), dict(header["meta"])
    except (KeyError, TypeError, ValueError) as e:
        raise DeltaError(f"the payload's header is malformed: {e!r}") from e
    if offset != len(payload):
        raise DeltaError(f"{len(payload) - offset} bytes after the last array")
    return Delta(partition, rnd, arrays, meta)


def _split(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], int]:
    """(the JSON header, where the data after it starts) of a payload or a message."""
    if len(data) < 8 or data[:4] != magic:
        raise DeltaError(f"not a stream-fm {what} (magic {bytes(data[:4])!r}, expected {magic!r})")
    (length,) = _U32.unpack_from(data, 4)
    if 8 + length > len(data):
        raise DeltaError(f"the {what}'s header runs past its end (truncated)")
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except ValueError as e:
        raise DeltaError(f"the {what}'s header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise DeltaError(f"the {what}'s header is not a JSON object")
    return header, 8 + length


class Assembler:
    """Reassembles deltas from their messages, checking every checksum on the way."""

    def __init__(self) -> None:
        # (partition, round, payload sha256) -> (count, chunks by index); two different deltas of
        # one partition and round (two members published it) assemble side by side, and which
        # one counts is the reader's choice (cluster members take the first complete in the log)
        self._partial: dict[tuple[int, int, str], tuple[int, str, dict[int, bytes]]] = {}

    @property
    def pending(self) -> list[tuple[int, int]]:
        """(partition, round) of the deltas whose chunks are not all in yet."""
        return sorted({key[:2] for key in self._partial})

    def discard(self, below: int) -> None:
        """Forget the chunks of rounds before ``below`` (folded already: never needed)."""
        for key in [key for key in self._partial if key[1] < below]:
            del self._partial[key]

    def add(self, message: bytes) -> Delta | None:
        """Take one message; return its delta when this was the last chunk missing, else None."""
        header, start = _split(message, CHUNK_MAGIC, "sync message")
        try:
            key = (int(header["partition"]), int(header["round"]))
            index, count = int(header["index"]), int(header["count"])
            digest, chunk_digest = str(header["payload_sha256"]), str(header["chunk_sha256"])
            codec = str(header.get("codec", "zlib"))  # (none named: the format's first release)
        except (KeyError, TypeError, ValueError) as e:
            raise DeltaError(f"a sync message's header is malformed: {e!r}") from e
        where = f"partition {key[0]} round {key[1]} chunk {index}"
        piece = bytes(message[start:])
        first_release = "codec" not in header
        if first_release:
            computed = hashlib.sha256(piece).hexdigest()
        else:
            computed = _chunk_digest({k: v for k, v in header.items() if k != "chunk_sha256"}, piece)
        if computed != chunk_digest:
            raise DeltaError(f"{where}: its bytes do not match its sha256 (corrupt or truncated)")
        if not 0 <= index < count:
            raise DeltaError(f"{where}: index out of range (count {count})")
        if codec not in CODECS:
            raise DeltaError(f"{where}: codec {codec!r}: this release reads {' and '.join(CODECS)}")
        count_known, codec_known, chunks = self._partial.setdefault((*key, digest), (count, codec, {}))
        if (count_known, codec_known) != (count, codec):
            raise DeltaError(f"{where}: disagrees with earlier chunks of the same delta (count, codec)")
        if index in chunks:
            if chunks[index] != piece:
                raise DeltaError(f"{where}: arrived twice with different bytes")
            return None  # the same chunk again (a re-read): taken once
        chunks[index] = piece
        if len(chunks) < count:
            return None
        del self._partial[(*key, digest)]
        payload = b"".join(chunks[i] for i in range(count))
        # one chunk: the payload is the chunk, checked already (with its header, or, in the first
        # release, against the same digest)
        whole = count == 1 and (not first_release or chunk_digest == digest)
        if not whole and hashlib.sha256(payload).hexdigest() != digest:
            raise DeltaError(f"partition {key[0]} round {key[1]}: the payload does not match its sha256")
        delta = decode_payload(_expand(payload, codec, f"partition {key[0]} round {key[1]}"))
        if (delta.partition, delta.round) != key:
            raise DeltaError(f"{where}: the payload is of partition {delta.partition} round {delta.round}")
        return delta


def _compress(payload: bytes, codec: str) -> bytes:
    return lz4.frame.compress(payload) if codec == "lz4" else zlib.compress(payload, 1)


def _expand(data: bytes, codec: str, where: str) -> bytes:
    """The payload compressed in ``data`` (checked already: a bad one was sent so), at most
    ``MAX_PAYLOAD`` bytes."""
    inflater: Any = lz4.frame.LZ4FrameDecompressor() if codec == "lz4" else zlib.decompressobj()
    try:
        if codec == "lz4":
            payload = inflater.decompress(data, max_length=MAX_PAYLOAD)
            too_long, whole = inflater.needs_input is False and not inflater.eof, inflater.eof
        else:
            payload = inflater.decompress(data, MAX_PAYLOAD)
            too_long, whole = bool(inflater.unconsumed_tail), inflater.eof
    except (zlib.error, RuntimeError) as e:
        raise DeltaError(f"{where}: the payload does not expand: {e}") from e
    if too_long:
        raise DeltaError(f"{where}: the payload expands past {MAX_PAYLOAD} bytes")
    if not whole or inflater.unused_data:
        raise DeltaError(f"{where}: the payload is not one whole {codec} stream")
    return payload


def chunk_key(message: bytes) -> tuple[int, int]:
    """(partition, round) of a sync message, from its header alone (checksums unchecked)."""
    header, _ = _split(message, CHUNK_MAGIC, "sync message")
    try:
        return int(header["partition"]), int(header["round"])
    except (KeyError, TypeError, ValueError) as e:
        raise DeltaError(f"a sync message's header is malformed: {e!r}") from e


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
