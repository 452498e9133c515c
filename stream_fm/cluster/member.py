"""A cluster member: one of several workers learning one model, with Kafka as the engine.

The consumer group decides which member owns which partition of the events; the sync topic
(:mod:`stream_fm.cluster.sync`) carries every partition's rounds to every member. Per loop::

    sync topic -> rounds' samples -> fold each round once every partition's samples are in:
                  learn them, in partition order (rounds.fold_round)
    events     -> owned partitions' records -> a round's records joined into samples,
                  published as the partition's delta for the round (rounds.pack_round)

Round r of a partition is its next ``round_records`` records after round r - 1 (the first begins
at the offset the cluster's genesis recorded, which also records ``round_records``), so
boundaries depend on the log only. Every member learns the same samples in the same order, so
all hold the same numbers, and the model does not depend on how many members there are or who
owned what. An owner publishes up to ``PUBLISH_AHEAD`` rounds past the one the cluster folds
next, so that waiting for the slowest partition overlaps with reading. A round closes early only
when its partition stalls (no records for ``round_timeout`` seconds, nothing left to read) and
it is the round every member waits for: the end it reached is in the delta, so replay stays
exact, but the model then depends on timing (docs/operations.md).

Each partition's click join is its own: each delta records the lowest offset whose impression
the join still holds (pending, or remembered as closed), and the event time reached; whoever owns
the partition next re-reads from there, rebuilding the join without publishing anything, and goes
on from the round boundary. The first delta of a round in the sync topic counts; a member that
finds another's delta for a partition it owns rebuilds that partition from it.

Snapshots hold the folded model, the sync topic's offset to replay from, and every partition's
boundary; no join state (it is rebuilt from the log).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_fm.cluster import rounds
from stream_fm.cluster.delta import Delta
from stream_fm.cluster.ledger import Ledger, cluster_state
from stream_fm.cluster.status import ClusterCounters
from stream_fm.cluster.sync import SyncLog
from stream_fm.snapshots import snapshot
from stream_fm.stream.deadletters import DeadLetters
from stream_fm.stream.join import Joiner, JoinView
from stream_fm.stream.samples import Arrivals, join_values
from stream_fm.stream.sources import KafkaSource, Record
from stream_fm.stream.worker import Worker, WorkerConfig

__all__ = ["PUBLISH_AHEAD", "READ_AHEAD", "ROUND_RECORDS", "ClusterConfig", "Member"]

log = logging.getLogger(__name__)

ROUND_RECORDS = 16_000  # a new cluster's round length, unless set (README, "Cluster")
# records of a partition read unpublished before its fetching is held (two rounds if more)
READ_AHEAD = 8000
PUBLISH_AHEAD = 2  # rounds an owner publishes past the one the cluster folds next
IDLE_WAIT = 0.05  # seconds a loop waits for records when none are there (then reads the sync topic)


@dataclass
class ClusterConfig:
    sync_topic: str
    round_records: int | None = None  # None: the cluster's (its genesis), ROUND_RECORDS if new
    round_timeout: float = 2.0


@dataclass
class _Held:
    """A partition this member owns: its join and the records read past its round's start."""

    index: int
    sync_target: int  # the sync topic's end when it was assigned: read that far first
    reading: bool = False
    epoch: int = 0
    joiner: Joiner | None = None
    arrivals: Arrivals = field(default_factory=Arrivals)
    round: int = 0
    start: int = 0
    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    last_arrival: float = 0.0
    holding: bool = False  # read ahead far enough: the fetch process holds the partition
    refetch: int | None = None  # read too far ahead all the same: records from here on are read again


class Member(Worker):
    """A worker that learns one model together with the other members of its consumer group."""

    def __init__(
        self,
        source: KafkaSource,
        config: WorkerConfig,
        cluster: ClusterConfig,
        sync: SyncLog,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        super().__init__(source, config, dead_letters)
        rounds.check_model(self.model)
        self.source: KafkaSource = source
        self.cluster = cluster
        self.sync = sync
        self.id = uuid.uuid4().hex  # this process, in the deltas it publishes
        self._ledger: Ledger | None = None  # the sync topic as read (from its genesis on)
        self.sync_offset = 0  # where reading the sync topic begins (restored from a snapshot)
        self.held: dict[int, _Held] = {}
        self.counters = ClusterCounters()
        self._unknown: list[tuple[str, int]] = []  # assigned partitions the genesis does not know
        self._epoch = 0

    @property
    def ledger(self) -> Ledger:
        """What the member has read of the sync topic (from the start of :meth:`run`)."""
        assert self._ledger is not None, "the member has not joined its cluster yet"
        return self._ledger

    # ------------------------------------------------------------------ lifecycle

    def restore(self) -> None:
        newest = self._newest_snapshot("replaying the sync topic from its start")
        if newest is None:
            return
        model, snap = newest
        state = cluster_state(
            snap, self.cluster.sync_topic, "cluster.sync_topic",
            "this member's cluster: give it a snapshot directory of its own cluster, or an empty one",
        )  # fmt: skip
        self._check_settings(model, snap)
        self.model = model
        self._ledger = Ledger.from_state(state)
        self.ledger.check(self.cluster.sync_topic, self.cluster.round_records, model.get_config())
        self.sync_offset = state["sync_offset"]
        self._restore_stats(snap)
        log.info(
            "restored %s: round %d folded, %d samples, sync topic from offset %d",
            snap.name,
            self.ledger.merged - 1,
            model.samples_seen,
            self.sync_offset,
        )

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.restore()
        self.sync.start(self.sync_offset)
        if self._ledger is None:
            self._begin()
        self._tune_gc()
        self.source.start({})
        last_progress = time.monotonic()
        last = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if self.held and all(self._blocked(h) for h in self.held.values()):
                    self.counters.wait_seconds += now - last  # (idle on the others' rounds)
                last = now
                self._read_sync(0.0)
                self.sync.check_sent()
                self._follow_assignment()
                self._poll()  # (waits up to IDLE_WAIT for records; never on the sync topic)
                self._close_rounds()
                self._status()
                self._maybe_snapshot()
                self._commit_if_durable()
                if time.monotonic() - last_progress >= self.config.progress_interval:
                    last_progress = time.monotonic()
                    self.log_progress()
            self._catch_up()
        finally:
            self.snapshot_now("shutdown")
            self.log_progress()
            self.source.close()
            self.sync.close()
            self.dead_letters.close()
            self.writer.close(self.config.shutdown_timeout)

    def _begin(self) -> None:
        """Join the cluster the sync topic's genesis describes (written now if there is none)."""
        proposal = {
            "partitions": self.sync.partitions(self.source.settings["topics"]),
            "round_records": self.cluster.round_records or ROUND_RECORDS,
            "model": self.model.get_config(),
        }
        genesis, offset = self.sync.genesis(proposal)
        self._ledger = Ledger(genesis)
        self.ledger.check(self.cluster.sync_topic, self.cluster.round_records, self.model.get_config())
        self.sync_offset = offset + 1

    def _catch_up(self, timeout: float = 30.0) -> None:
        """Read the sync topic to its end and fold what is complete (shutdown: the final
        snapshot then holds every round the cluster has finished)."""
        self.sync.flush()  # this member's own rounds too
        end, deadline = self.sync.end(), time.monotonic() + timeout
        while self.sync.position < end and time.monotonic() < deadline:
            self._read_sync(0.2)

    # ------------------------------------------------------------------ the sync topic

    def _read_sync(self, timeout: float) -> None:
        ledger = self.ledger
        for offset, message in self.sync.poll(timeout):
            delta = ledger.read(offset, message)
            held = self.held.get(delta.partition) if delta is not None else None
            if held is not None and held.reading and delta.meta["by"] != self.id:
                log.warning(
                    "partition %s: round %d came from another member; rebuilding from it",
                    ledger.partitions[delta.partition], delta.round,
                )  # fmt: skip
                held.reading, held.sync_target = False, self.sync.position
        while (deltas := ledger.complete()) is not None:
            self._fold(deltas)

    def _fold(self, deltas: list[Delta]) -> None:
        """Fold a round (one delta per partition) into the model; the counters follow."""
        t = time.perf_counter()
        probs = rounds.fold_round(self.model, deltas)
        self.counters.fold_seconds += time.perf_counter() - t
        if len(probs):
            labels = [d.arrays["labels"] for d in deltas if d.meta["samples"]]
            self.quality.update(probs, np.concatenate(labels).astype(np.float64))
        for d in deltas:
            m = d.meta
            self.stats.events.update(m["events"])
            self.stats.bad_events.update(m["bad"])
            self.stats.trained.update(m["trained"])
            if m["newest_ts"] is not None:
                self.stats.newest_event_ts = max(m["newest_ts"], self.stats.newest_event_ts or m["newest_ts"])
        self.positions = {self.ledger.partitions[p]: b.start for p, b in self.ledger.folded.items()}

    # ------------------------------------------------------------------ owned partitions

    def _follow_assignment(self) -> None:
        tps = self.source.assigned()
        assigned = {self.ledger.index[tp] for tp in tps if tp in self.ledger.index}
        unknown = sorted(set(tps) - self.ledger.index.keys())
        if unknown and unknown != self._unknown:
            log.error(
                "partitions %s were added after the cluster began: they are not learned (a cluster "
                "numbers its partitions at its genesis; start a new sync topic to take them in)", unknown
            )  # fmt: skip
        self._unknown = unknown
        for p in [p for p in self.held if p not in assigned]:
            del self.held[p]
        new = assigned - self.held.keys()
        if new:  # read the sync topic as far as it goes now before taking them
            end = self.sync.end()
            self.held.update((p, _Held(p, end)) for p in new)
        for held in self.held.values():
            if not held.reading and self.sync.position >= held.sync_target:
                self._rebuild(held)

    def _rebuild(self, held: _Held) -> None:
        """Start reading a partition where the sync topic says it stands: re-read its join from
        the boundary's low offset (nothing trained) and its next round from the boundary."""
        b = self.ledger.seen[held.index]
        joiner = Joiner(self.config.attribution_window, self.config.allowed_lateness, self.config.max_pending)
        if b.max_ts is not None:
            joiner.max_ts = b.max_ts  # nothing re-read moves event time: the join is as it was
        held = self.held[held.index] = _Held(
            held.index, held.sync_target, True, 0, joiner, round=b.round, start=b.start,
            last_arrival=time.monotonic(),
        )  # fmt: skip
        self._seek(held, b.low)
        log.info(
            "partition %s: round %d from offset %d (join re-read from %d)",
            self.ledger.partitions[held.index],
            b.round,
            b.start,
            b.low,
        )

    def _poll(self) -> bool:
        """Take the next records of owned partitions; False if none came.

        A partition read ``READ_AHEAD`` records ahead (two rounds if more) is held (the fetch
        process stops fetching it) until half of that is left, which bounds memory. It polls on
        every loop, needed or not: the consumer takes part in rebalances only while it is polled,
        and a member that stopped polling while it waited for a partition moving to another member
        held the group's rebalance for max.poll.interval.ms (5 minutes: measured). Should records
        still come far past a hold, they are dropped and read again later (a seek; counted as read
        twice)."""
        full = self.ledger.round_records
        ahead = max(READ_AHEAD, 2 * full)
        for held in self.held.values():
            if held.refetch is not None and len(held.offsets) < full:
                self._seek(held, held.refetch)
            elif held.holding and len(held.offsets) < ahead // 2:
                held.holding = False
                self.source.release(*self.ledger.partitions[held.index])
        batches = self.source.poll(IDLE_WAIT, self.config.batch_size)
        now = time.monotonic()
        for batch in batches:
            held = self.held.get(self.ledger.index.get((batch.topic, batch.partition), -1))
            if held is None or not held.reading:
                continue  # a partition no longer ours, or being rebuilt (a seek follows)
            if batch.epoch != held.epoch or held.refetch is not None:
                self.counters.records_reread += len(batch.offsets)  # fetched before a seek, or too far ahead
                continue
            held.last_arrival = now
            cut = bisect.bisect_left(batch.offsets, held.start)
            if cut:  # the join's re-read: before the round boundary, trained already
                assert held.joiner is not None
                join_values(batch.values[:cut], held.joiner, self.config.max_message_bytes, lambda *_: None,
                            [], [], Counter(), batch.offsets, held.arrivals)  # fmt: skip
            if cut < len(batch.offsets) and len(held.offsets) >= 2 * ahead:
                held.refetch = batch.offsets[cut]
                self.counters.records_reread += len(batch.offsets) - cut
                continue
            held.offsets += batch.offsets[cut:]
            held.keys += batch.keys[cut:]
            held.values += batch.values[cut:]
            if len(held.offsets) >= ahead and not held.holding:
                held.holding = True
                self.source.hold(batch.topic, batch.partition)
        return bool(batches)

    def _seek(self, held: _Held, offset: int) -> None:
        """Read the partition from ``offset`` on; batches fetched before are dropped (epochs)."""
        self._epoch += 1
        held.epoch, held.refetch, held.holding, held.last_arrival = self._epoch, None, False, time.monotonic()
        self.source.seek(*self.ledger.partitions[held.index], offset, held.epoch)

    def _close_rounds(self) -> None:
        full = self.ledger.round_records
        for held in self.held.values():
            while held.reading and not self._blocked(held) and len(held.offsets) >= full:
                self._publish(held, full)
            n = len(held.offsets)
            if held.reading and held.round == self.ledger.merged and n < full:
                if self._stalled(held) and (n or self._others_moved(held)):
                    self._publish(held, n)  # the round everyone waits for, and no records come

    def _blocked(self, held: _Held) -> bool:
        """Published as far ahead of the folded rounds as an owner may (or rebuilding)."""
        return held.reading and held.round >= self.ledger.merged + PUBLISH_AHEAD

    def _stalled(self, held: _Held) -> bool:
        """Nothing left to read (as the consumer reported after the partition's last seek: records
        dropped for reading ahead do not count as read) and nothing came for round_timeout."""
        tp = self.ledger.partitions[held.index]
        if held.refetch is not None or self.source.epochs().get(tp) != held.epoch:
            return False
        if self.source.lag().get(tp) != 0:  # records left, or not known yet
            return False
        return time.monotonic() - held.last_arrival >= self.cluster.round_timeout

    def _others_moved(self, held: _Held) -> bool:
        """Another partition's round had records (else an idle cluster would churn empty rounds)."""
        return any(d.meta["records"] for d in self.ledger.waiting.get(held.round, {}).values())

    def _publish(self, held: _Held, n: int) -> None:
        """Join the partition's next ``n`` records and publish their samples as its round."""
        topic, partition = self.ledger.partitions[held.index]
        offsets, keys, values = held.offsets[:n], held.keys[:n], held.values[:n]
        xs: list[dict[str, Any]] = []
        ys: list[bool] = []
        counts: Counter = Counter()
        bad: Counter = Counter()

        def dead(i: int, reason: str, detail: str) -> None:
            bad[reason] += 1
            self._dead_letter(Record(topic, partition, offsets[i], values[i], keys[i]), reason, detail)

        assert held.joiner is not None
        newest = join_values(
            values, held.joiner, self.config.max_message_bytes, dead, xs, ys, counts, offsets, held.arrivals
        )
        if not self.dead_letters.flush():  # a published round is never re-read: its bad records first
            log.error("dead letters undelivered: partition %s/%d rebuilt to retry", topic, partition)
            held.reading, held.sync_target = False, self.sync.position
            return
        end = offsets[-1] + 1 if n else held.start
        low = held.arrivals.oldest_held(held.joiner, end)
        delta = rounds.pack_round(xs, ys, held.index, held.round)
        positives = sum(ys)
        max_ts = held.joiner.max_ts if held.joiner.max_ts != float("-inf") else None
        delta.meta.update(
            start=held.start, end=end, low=low, max_ts=max_ts, records=n, events=dict(counts),
            bad=dict(bad), trained={"1": positives, "0": len(ys) - positives}, newest_ts=newest, by=self.id,
        )  # fmt: skip
        c = self.counters
        c.delta_bytes += self.sync.publish(delta)
        c.delta_keys += delta.meta["keys"]
        c.rounds_published += 1
        held.round += 1
        held.start = end
        del held.offsets[:n], held.keys[:n], held.values[:n]

    # ------------------------------------------------------------------ snapshots and status

    def _extra(self) -> snapshot.Extra:
        state = {"sync_topic": self.cluster.sync_topic, **self.ledger.state(self.sync.position)}
        return snapshot.Extra(
            meta={"stats": self.stats.to_json(), "source": self.source.name, "cluster": state},
            offsets=self._offsets_json(),
        )

    def _status(self) -> None:
        self.source.rebalanced = False  # partitions move between members: no snapshot for it
        self._read_source()
        c, ledger = self.counters, self.ledger
        c.rounds = {ledger.partitions[p]: h.round for p, h in self.held.items()}
        c.merged = ledger.merged
        c.records_waiting = sum(len(h.offsets) for h in self.held.values())
        self.joiner = JoinView.of([h.joiner for h in self.held.values() if h.joiner is not None])
