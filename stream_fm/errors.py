"""The exception hierarchy: everything stream-fm raises on purpose derives from StreamFMError."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeltaError",
    "FeatureError",
    "LabelError",
    "RootLockedError",
    "SnapshotError",
    "StreamFMError",
]


class StreamFMError(Exception):
    """Root of every error stream-fm raises deliberately."""


class ConfigError(StreamFMError, ValueError):
    """A setting is missing, of the wrong type or out of range.

    ``key`` names the setting, ``value`` is what was given and ``allowed`` says what would be accepted.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")


class FeatureError(StreamFMError, ValueError):
    """A sample's feature cannot be encoded; ``field`` names it.

    ``index`` is the sample's position when it came from a batch, else None.
    """

    def __init__(self, field: object, reason: str, index: int | None = None) -> None:
        self.field, self.reason, self.index = field, reason, index
        where = "" if index is None else f"sample {index}: "
        super().__init__(f"{where}feature {field!r}: {reason}")


class LabelError(StreamFMError, ValueError):
    """A label is not one of False/True/0/1."""

    def __init__(self, label: object) -> None:
        self.label = label
        super().__init__(f"label {label!r} is not allowed: expected a bool or 0/1")


class SnapshotError(StreamFMError):
    """A snapshot cannot be written, or is missing, incomplete or corrupt; ``path`` names it."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"snapshot {str(path)!r}: {reason}")


class RootLockedError(StreamFMError):
    """Another process writes to this snapshot root; ``holder`` says who (pid, host, command,
    since), as far as its lock file tells."""

    def __init__(self, root: object, holder: dict[str, object]) -> None:
        self.root, self.holder = root, holder
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')!s} ({holder.get('command')}, "
            f"since {holder.get('since')})"
            if holder
            else "a process that did not say who it is"
        )
        super().__init__(
            f"snapshot directory {str(root)!r} is locked by another writer: {who}. One writer per "
            "snapshot directory: stop that one, or give this one another --snapshot-dir"
        )


class DeltaError(StreamFMError):
    """A sync message or a delta is malformed, corrupt or inconsistent; never applied."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"sync delta: {reason}")
