"""Feature encoding: one sample dict -> the parameter rows and x values of its features.

The rules (the same for learning, serving and every source):

- ``"ad": "a17"``           -> key ``ad=a17``, x = 1 (one-hot)
- ``"price": 3.5``          -> key ``price``, x = 3.5 (must be finite)
- ``"mobile": True``        -> key ``mobile``, x = 1 (``False`` is x = 0, i.e. absent)
- ``"genres": ["a", "b"]``  -> keys ``genres=a``, ``genres=b``, x = 1 each (multi-hot)

Field names are strings (a non-string name is refused for a numeric field; for a categorical one it
is formatted into the key, since checking every name would cost the hot loop a tenth of its time).

Zero values are dropped: a feature with x = 0 contributes nothing to an FM, and storing it would
only spend memory. Anything else (None, NaN, +-inf, nested dicts, lists of non-strings, non-string
numeric field names) raises :class:`~stream_fm.errors.FeatureError` naming the field, which the worker
counts and dead-letters as a bad event.

This loop runs for every feature of every sample, so it is written for CPython's speed: exact
``type(...) is`` checks for the common types first, ``isinstance`` only on the rare slow path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from stream_fm.errors import FeatureError

__all__ = ["ALLOWED", "encode_batch", "encode_into", "keys_of"]

ALLOWED = "a str, a finite int/float, a bool, or a list/tuple of str"

Lookup = Callable[[str], "int | None"]


def encode_into(
    x: Mapping[str, Any],
    lookup: Lookup | None,
    rows: list[Any],
    vals: list[float],
    misses: list[tuple[int, str]],
) -> list[list[Any]]:
    """Append sample ``x``'s features to ``rows``/``vals``; unknown keys also go to ``misses``.

    ``lookup(key)`` gives a key's parameter row (the hash in hashing mode, a dict's ``get``); a
    key it does not know (None) gets row -1 and ``(position, key)`` is added to ``misses``, so
    that the learner can admit it. With ``lookup=None``, ``rows`` receives the keys themselves,
    for a caller that looks them all up at once (:class:`~stream_fm.keyindex.KeyIndex`).

    Returns the values of ``x`` that are lists: mutable values, which a caller that caches the
    encoding of ``x`` must copy too (a shallow copy of ``x`` would not see them change).

    Raises :class:`FeatureError` (a ``ValueError``) naming the offending field. On error the lists
    may hold a partial sample: callers that must stay atomic truncate them.
    """
    if type(x) is not dict and not isinstance(x, Mapping):
        raise FeatureError("<sample>", f"a sample must be a dict of features, got {type(x).__name__}")
    add_row, add_val = rows.append, vals.append
    lists: list[list[Any]] = []
    for field, value in x.items():
        t = type(value)
        if t is str:
            key = f"{field}={value}"
            x_val = 1.0
        elif t is float:
            if value - value != 0.0:  # NaN and +-inf in one comparison
                raise FeatureError(field, f"value {value!r} is not finite")
            if not value:
                continue
            key, x_val = _numeric_key(field), value
        elif t is bool:
            if not value:
                continue
            key, x_val = _numeric_key(field), 1.0
        elif t is int:
            if not value:
                continue
            key, x_val = _numeric_key(field), _int_to_float(field, value)
        elif t is list or t is tuple:
            if t is list:
                lists.append(value)
            for item in value:
                if type(item) is not str:
                    raise FeatureError(field, f"a list must hold only strings, found {type(item).__name__}")
                key = f"{field}={item}"
                if lookup is None:
                    add_row(key)
                else:
                    row = lookup(key)
                    if row is None:
                        misses.append((len(rows), key))
                        row = -1
                    add_row(row)
                add_val(1.0)
            continue
        else:
            key, x_val = _parse_other(field, value)
            if key is None:
                continue
        if lookup is None:
            add_row(key)
        else:
            row = lookup(key)
            if row is None:
                misses.append((len(rows), key))
                row = -1
            add_row(row)
        add_val(x_val)
    return lists


def encode_batch(
    xs: Iterable[Mapping[str, Any]], lookup: Lookup | None
) -> tuple[list[Any], list[float], list[int], list[tuple[int, str]]]:
    """Many samples in CSR form: (rows, x values, offsets, misses); see :func:`encode_into`
    (with ``lookup=None``, keys instead of rows).

    A bad sample raises :class:`FeatureError` with ``index`` set to its position.
    """
    rows: list[int] = []
    vals: list[float] = []
    offsets = [0]
    misses: list[tuple[int, str]] = []
    for i, x in enumerate(xs):
        try:
            encode_into(x, lookup, rows, vals, misses)
        except FeatureError as e:
            raise FeatureError(e.field, e.reason, index=i) from None
        offsets.append(len(rows))
    return rows, vals, offsets, misses


def keys_of(x: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The (key, x) pairs a sample encodes to, in order: the encoding rules, for people.

    >>> keys_of({"ad": "a17", "price": 3.5, "genres": ["Drama", "War"], "mobile": False})
    [('ad=a17', 1.0), ('price', 3.5), ('genres=Drama', 1.0), ('genres=War', 1.0)]
    """
    keys: list[str] = []
    vals: list[float] = []
    encode_into(x, None, keys, vals, [])
    return list(zip(keys, vals, strict=True))


def _numeric_key(field: Any) -> str:
    if type(field) is not str:
        raise FeatureError(field, f"field names must be strings, got {type(field).__name__}")
    return field


def _int_to_float(field: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise FeatureError(field, f"integer {value} is too large for a float") from None


def _parse_other(field: str, value: Any) -> tuple[str | None, float]:
    """The slow path: str/number subclasses and numpy scalars, or a clear error."""
    if isinstance(value, str):
        return field + "=" + str(value), 1.0
    if isinstance(value, (numbers.Real, np.bool_)):
        try:
            v = float(value)
        except (OverflowError, TypeError, ValueError):
            raise FeatureError(field, f"value {value!r} is not a finite number") from None
        if not math.isfinite(v):
            raise FeatureError(field, f"value {value!r} is not finite")
        return (_numeric_key(field), v) if v else (None, 0.0)
    kind = "None" if value is None else type(value).__name__
    raise FeatureError(field, f"unsupported value of type {kind}: expected {ALLOWED}")
