"""Checks of the model's constructor arguments and of labels: a bad one raises an error that
names it, the value, and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from stream_fm.errors import ConfigError, LabelError

__all__ = ["check_float", "check_int", "check_switch", "label", "labels"]


def label(y: Any) -> float:
    if y is True or y == 1:
        return 1.0
    if y is False or y == 0:
        return 0.0
    raise LabelError(y)


def labels(ys: Iterable[Any], n: int) -> np.ndarray:
    out = np.array([label(y) for y in ys], np.float64)
    if out.shape[0] != n:
        raise LabelError(f"{out.shape[0]} labels for {n} samples")
    return out


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(name, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(name, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    return int(value)


def check_switch(name: str, value: Any, default: bool, when: str) -> bool:
    """A bool setting whose None means ``default`` (``when`` says when that is on)."""
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(name, value, f"true, false or None ({when})")
    return bool(value)


def check_float(name: str, value: Any, positive: bool = False) -> float:
    allowed = "a finite number " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(name, value, allowed)
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(name, value, allowed)
    return v
