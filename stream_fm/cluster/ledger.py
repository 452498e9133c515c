"""What a member has read of the sync topic: the cluster's partitions, the deltas waiting for
their round to be complete, the rounds folded, and where every partition stands.

Every member reads the same messages in the same order, so every member's ledger says the same:
the first complete copy of a partition's round in the log counts (a second copy, from a member
that took the partition over meanwhile, is ignored), and a round is folded once every partition's
delta for it is in, in partition order (:func:`stream_fm.cluster.rounds.fold_round` learns their samples).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from stream_fm.cluster.delta import Assembler, Delta, chunk_key
from stream_fm.cluster.sync import GENESIS_FORMAT, GENESIS_MAGIC
from stream_fm.errors import ConfigError
from stream_fm.model.state import as_made

__all__ = ["Boundary", "Ledger", "cluster_state"]


@dataclass
class Boundary:
    """Where a partition stands: its next round, where that round begins, and where a new owner
    re-reads its join from (with the event time the join had reached)."""

    round: int
    start: int
    low: int
    max_ts: float | None = None

    @classmethod
    def after(cls, delta: Delta) -> Boundary:
        m = delta.meta
        return cls(delta.round + 1, m["end"], m["low"], m["max_ts"])


class Ledger:
    """The sync topic as read so far (``genesis``: the cluster's, see :mod:`.sync`)."""

    def __init__(self, genesis: dict[str, Any]) -> None:
        # a genesis written before a setting existed: the setting as that release learned
        self.genesis = genesis = {**genesis, "model": as_made(genesis["model"])}
        self.partitions: list[tuple[str, int]] = [(t, p) for t, p, _ in genesis["partitions"]]
        self.index = {tp: i for i, tp in enumerate(self.partitions)}
        self.merged = 0  # rounds folded into the model (the next one to fold)
        first = [Boundary(0, start, start) for _, _, start in genesis["partitions"]]
        self.folded: dict[int, Boundary] = dict(enumerate(first))  # after the rounds folded
        self.seen: dict[int, Boundary] = dict(self.folded)  # after every delta read
        self.waiting: dict[int, dict[int, Delta]] = {}  # round -> partition -> delta
        self.first_at: dict[int, int] = {}  # round -> sync offset of its first message read
        self.assembler = Assembler()

    @property
    def round_records(self) -> int:
        """Records of a partition per round, as the cluster began."""
        return int(self.genesis["round_records"])

    def check(self, sync_topic: str, round_records: int | None, model_config: dict[str, Any]) -> None:
        """Refuse to follow a cluster begun with other settings, or by another release's format
        (``round_records`` None: the cluster's, whatever it is)."""
        if self.genesis.get("format") != GENESIS_FORMAT:
            raise ConfigError(
                "cluster.sync_topic",
                sync_topic,
                f"a cluster of this release: {sync_topic!r} began as format {self.genesis.get('format')!r}, "
                f"this release reads format {GENESIS_FORMAT} (rounds of samples): start a new sync topic "
                "and give the members empty snapshot directories",
            )
        began = f"the cluster's, as its sync topic {sync_topic!r} began"
        if round_records is not None and self.genesis["round_records"] != round_records:
            raise ConfigError(
                "cluster.round_records",
                json.dumps(round_records),
                f"{began}: {self.genesis['round_records']} (every member runs with the same settings)",
            )
        ours, theirs = json.loads(json.dumps(model_config)), self.genesis["model"]
        differ = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
        if differ:  # named one by one: a whole config, dumped, hides which setting it is
            cluster = ", ".join(json.dumps(theirs.get(name)) for name in differ)
            raise ConfigError(
                ", ".join(f"model.{name}" for name in differ),
                ", ".join(json.dumps(ours.get(name)) for name in differ),
                f"{began}: {cluster} (every member runs with the same settings)",
            )

    def read(self, offset: int, message: bytes) -> Delta | None:
        """Take one sync message; the delta it completes, if that delta counts."""
        if message[:4] == GENESIS_MAGIC:
            return None
        partition, round_ = chunk_key(message)
        if round_ < self.merged or partition in self.waiting.get(round_, {}):
            return None  # folded already, or a second copy of a delta that counts
        self.first_at.setdefault(round_, offset)
        delta = self.assembler.add(message)  # DeltaError: the member stops, nothing applied
        if delta is None or delta.partition in self.waiting.get(delta.round, {}):
            return None
        self.waiting.setdefault(delta.round, {})[delta.partition] = delta
        if delta.round >= self.seen[delta.partition].round:
            self.seen[delta.partition] = Boundary.after(delta)
        return delta

    def complete(self) -> list[Delta] | None:
        """The next round's deltas in partition order once all are in (then it counts as folded:
        the caller folds them), else None."""
        got = self.waiting.get(self.merged, {})
        if len(got) < len(self.partitions):
            return None
        deltas = [got[p] for p in range(len(self.partitions))]
        for d in deltas:
            self.folded[d.partition] = Boundary.after(d)
        del self.waiting[self.merged]
        self.first_at.pop(self.merged, None)
        self.merged += 1
        self.assembler.discard(self.merged)
        return deltas

    def replay_from(self, position: int) -> int:
        """The sync offset to read again from after a restart (the first message of a round not
        folded yet; ``position`` if there is none)."""
        return min(self.first_at.values(), default=position)

    def state(self, position: int) -> dict[str, Any]:
        """JSON-able, for a snapshot of the model as folded."""
        return {
            "genesis": self.genesis,
            "merged": self.merged,
            "sync_offset": self.replay_from(position),
            "parts": {str(p): asdict(b) for p, b in self.folded.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Ledger:
        ledger = cls(state["genesis"])
        ledger.merged = state["merged"]
        ledger.folded = {int(p): Boundary(**b) for p, b in state["parts"].items()}
        ledger.seen = dict(ledger.folded)
        return ledger


def cluster_state(snap: Any, sync_topic: str, key: str, whose: str) -> dict[str, Any]:
    """The cluster state a member's snapshot records (its ledger, the sync offset to replay
    from), refused naming ``key`` unless the snapshot is of ``sync_topic``'s cluster."""
    state = snap.extra.get("cluster")
    if state is None or state["sync_topic"] != sync_topic:
        was = "a single worker's" if state is None else f"of sync topic {state['sync_topic']!r}"
        raise ConfigError(key, sync_topic, f"the sync topic of {whose} ({snap.path} is {was})")
    return state
