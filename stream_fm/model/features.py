"""Feature encoding: sample dicts -> the keys and x values of their features.

The rules (the same for learning, serving and every source):

- ``"ad": "a17"``           -> key ``ad=a17``, x = 1 (one-hot)
- ``"price": 3.5``          -> key ``price``, x = 3.5 (must be finite)
- ``"mobile": True``        -> key ``mobile``, x = 1 (``False`` is x = 0, i.e. absent)
- ``"genres": ["a", "b"]``  -> keys ``genres=a``, ``genres=b``, x = 1 each (multi-hot)

Field names are strings (a non-string name is refused for a numeric field; for a categorical one it
is formatted into the key).

Zero values are dropped: a feature with x = 0 contributes nothing to an FM, and storing it would
only spend memory. Anything else (None, NaN, +-inf, nested dicts, lists of non-strings, non-string
numeric field names) raises :class:`~stream_fm.errors.FeatureError` naming the field, which the worker
counts and dead-letters as a bad event.

The common cases (exact ``str`` field names with exact ``str``, ``float``, ``int``, ``bool`` values
and lists/tuples of exact ``str``) are encoded in C (``_encode.c``), which writes the keys' UTF-8
bytes straight into a buffer: building a Python string per key cost more than the whole model
update. Everything else comes to :func:`_slow` here, one field at a time: subclasses, numpy
scalars, non-string field names, and every error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stream_fm import _encode
from stream_fm.errors import FeatureError
from stream_fm.model.keyindex import keys_at

__all__ = ["ALLOWED", "Packed", "check", "encode_batch", "keys_of"]

ALLOWED = "a str, a finite int/float, a bool, or a list/tuple of str"

# (key bytes: uint8, key lengths: int64, x values: float64, CSR offsets: int64); sample s has the
# keys offsets[s] .. offsets[s + 1] - 1, key i the bytes sum(lengths[:i]) .. sum(lengths[:i + 1]) - 1
Packed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def encode_batch(xs: Iterable[Mapping[str, Any]]) -> Packed:
    """Samples -> their features, packed (:data:`Packed`).

    A bad sample raises :class:`FeatureError` (a ``ValueError``) naming the field, with ``index``
    set to the sample's position.
    """
    data, lengths, vals, offsets = _encode.encode_batch(xs if isinstance(xs, (list, tuple)) else list(xs))
    return (
        np.frombuffer(data, np.uint8),
        np.frombuffer(lengths, np.int64),
        np.frombuffer(vals, np.float64),
        np.frombuffer(offsets, np.int64),
    )


def check(x: Mapping[str, Any]) -> None:
    """Raise :class:`FeatureError` naming the field if sample ``x`` cannot be encoded. (Every
    impression is checked as it is decoded: the C encoder's bytes are dropped as they come, as
    wrapping them in four numpy arrays cost more than encoding them, 1 µs an event.)"""
    _encode_one(x)


def keys_of(x: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The (key, x) pairs a sample encodes to, in order: the encoding rules, for people.

    >>> keys_of({"ad": "a17", "price": 3.5, "genres": ["Drama", "War"], "mobile": False})
    [('ad=a17', 1.0), ('price', 3.5), ('genres=Drama', 1.0), ('genres=War', 1.0)]
    """
    raw, sizes, vals, _ = _encode_one(x)
    data, lengths = np.frombuffer(raw, np.uint8), np.frombuffer(sizes, np.int64)
    return list(zip(keys_at(data, lengths, range(len(lengths))), np.frombuffer(vals).tolist(), strict=True))


def _encode_one(x: Mapping[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """The C encoder's bytes of one sample (:data:`Packed`'s, unwrapped), whose errors carry no
    batch position."""
    try:
        return _encode.encode_batch([x])
    except FeatureError as e:
        raise FeatureError(e.field, e.reason) from None


def _as_dict(x: Any) -> dict[str, Any]:
    """A sample that is not a dict: a Mapping is read as one, anything else refused."""
    if not isinstance(x, Mapping):
        raise FeatureError("<sample>", f"a sample must be a dict of features, got {type(x).__name__}")
    return dict(x)


def _slow(field: Any, value: Any) -> list[tuple[str, float]]:
    """The (key, x) pairs of one field the C encoder did not take, or :class:`FeatureError`."""
    if isinstance(value, str):
        return [(f"{field}={value}", 1.0)]
    if isinstance(value, (list, tuple)):
        for item in value:
            if type(item) is not str:
                raise FeatureError(field, f"a list must hold only strings, found {type(item).__name__}")
        return [(f"{field}={item}", 1.0) for item in value]
    if isinstance(value, (numbers.Real, np.bool_)):
        try:
            v = float(value)
        except OverflowError:
            raise FeatureError(field, f"integer {value} is too large for a float") from None
        except (TypeError, ValueError):
            raise FeatureError(field, f"value {value!r} is not a finite number") from None
        if not math.isfinite(v):
            raise FeatureError(field, f"value {value!r} is not finite")
        return [(_numeric_key(field), v)] if v else []
    kind = "None" if value is None else type(value).__name__
    raise FeatureError(field, f"unsupported value of type {kind}: expected {ALLOWED}")


def _numeric_key(field: Any) -> str:
    if type(field) is not str:
        raise FeatureError(field, f"field names must be strings, got {type(field).__name__}")
    return field
