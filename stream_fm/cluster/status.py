"""What a cluster member reports: its rounds' counters and its partitions' joins, as plain values
set on the member's thread and read by the metrics layer's (:mod:`stream_fm.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stream_fm.join import Joiner

__all__ = ["ClusterCounters", "JoinView"]


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


@dataclass
class JoinView:
    """The joins of the partitions a member owns, summed (the metrics' and the log's ``joiner``)."""

    pending: int = 0
    watermark: float = float("-inf")
    late_clicks: int = 0
    orphan_clicks: int = 0
    duplicates: int = 0
    overflow: int = 0
    late_impressions: int = 0

    @classmethod
    def of(cls, joiners: list[Joiner]) -> JoinView:
        view = cls(pending=sum(j.pending for j in joiners))
        if joiners:
            view.watermark = min(j.watermark for j in joiners)
        for name in ("late_clicks", "orphan_clicks", "duplicates", "overflow", "late_impressions"):
            setattr(view, name, sum(getattr(j, name) for j in joiners))
        return view
