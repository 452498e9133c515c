"""stream-fm: an online factorization machine for click-through rate, fed by Kafka."""

from __future__ import annotations

from stream_fm.errors import (
    ConfigError,
    FeatureError,
    LabelError,
    RootLockedError,
    SnapshotError,
    StreamFMError,
)
from stream_fm.model import SparseFM

__all__ = [
    "ConfigError",
    "FeatureError",
    "LabelError",
    "RootLockedError",
    "SnapshotError",
    "SparseFM",
    "StreamFMError",
    "__version__",
]

__version__ = "0.1.0"
