"""What a cluster member reports of its rounds, as plain values set on the member's thread and read
by the metrics layer's (:mod:`stream_fm.ops.metrics`); its joins' are a
:class:`~stream_fm.stream.join.JoinView`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ClusterCounters"]


@dataclass
class ClusterCounters:
    """What the metrics layer reads (set on the member's thread, read on the HTTP thread)."""

    rounds: dict[tuple[str, int], int] = field(default_factory=dict)  # owned partition -> round
    merged: int = 0  # rounds folded
    records_waiting: int = 0  # read, not learned yet
    records_reread: int = 0  # fetched too far ahead or before a seek: dropped, to be read again
    wait_seconds: float = 0.0  # every owned partition's round learned, the others' not in yet
    fold_seconds: float = 0.0
    rounds_published: int = 0
    delta_bytes: int = 0
    delta_keys: int = 0
