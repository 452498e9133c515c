"""Events on the wire: JSON objects, UTF-8, one per message. Decoding and validation.

    {"type": "impression", "id": "i-1", "ts": 1764065700.5, "features": {"ad": "a17", "price": 3.5}}
    {"type": "click", "impression_id": "i-1", "ts": 1764065712.0}
    {"type": "sample", "label": 1, "features": {...}}              (labelled upstream; "ts" optional)

``ts`` is event time, Unix seconds (a JSON number). Feature values follow the model's rules
(:mod:`stream_fm.model.features`). Other top-level fields are ignored (producers may add some).
Anything else is a :class:`BadEvent` with one of :data:`REASONS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from stream_fm.errors import FeatureError, StreamFMError
from stream_fm.model.features import check

__all__ = ["REASONS", "BadEvent", "Click", "Impression", "Sample", "decode", "validate_features"]

# reasons a message is refused: the label values of stream_fm_bad_events_total{reason}
REASONS = ("oversize", "encoding", "json", "schema", "feature")


class BadEvent(StreamFMError):
    """A message that is not a valid event; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(slots=True, frozen=True)
class Impression:
    id: str
    ts: float
    features: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Click:
    impression_id: str
    ts: float


@dataclass(slots=True, frozen=True)
class Sample:
    label: bool
    features: dict[str, Any]
    ts: float | None = None


Event = Impression | Click | Sample


def decode(value: bytes | None, max_bytes: int = 1 << 20) -> Event:
    """One message's bytes -> an event, or :class:`BadEvent` saying why not."""
    if value is None:
        raise BadEvent("schema", "empty message (a tombstone)")
    if len(value) > max_bytes:
        raise BadEvent("oversize", f"{len(value)} bytes > {max_bytes}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        # orjson refuses invalid UTF-8 with its own message: tell the two apart
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as u:
            raise BadEvent("encoding", f"not UTF-8: {u.reason} at byte {u.start}") from None
        raise BadEvent("json", str(e)) from None
    if type(doc) is not dict:
        raise BadEvent("schema", f"an event is a JSON object, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "impression":
        return Impression(_id(doc, "id"), _ts(doc), validate_features(doc.get("features")))
    if kind == "click":
        return Click(_id(doc, "impression_id"), _ts(doc))
    if kind == "sample":
        label = doc.get("label")
        if label not in (0, 1) or type(label) not in (int, bool):
            raise BadEvent("schema", f"label must be 0 or 1, got {label!r}")
        ts = _ts(doc) if "ts" in doc else None
        return Sample(bool(label), validate_features(doc.get("features")), ts)
    raise BadEvent("schema", f'"type" must be "impression", "click" or "sample", got {kind!r}')


def validate_features(features: Any) -> dict[str, Any]:
    """``features`` if the model can encode it, else :class:`BadEvent` naming the field.

    The model's own encoder checks it (:func:`stream_fm.model.features.check`): the rules live in one place.
    """
    if type(features) is not dict:
        raise BadEvent("schema", f'"features" must be an object, got {type(features).__name__}')
    try:
        check(features)
    except FeatureError as e:
        raise BadEvent("feature", str(e)) from None
    return features


def _id(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise BadEvent("schema", f'"{name}" must be a non-empty string, got {value!r}')
    return value


def _ts(doc: dict[str, Any]) -> float:
    ts = doc.get("ts")
    if type(ts) not in (int, float) or not math.isfinite(ts) or ts < 0:
        raise BadEvent("schema", f'"ts" must be Unix seconds (a number >= 0), got {ts!r}')
    return float(ts)
