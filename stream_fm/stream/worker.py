"""The worker: events in, labelled samples learned, snapshots out, exactly-once model state.

The data path, per polled batch::

    source.poll -> events.decode (bad -> dead letters) -> join -> model.learn_batch -> positions

Positions (the next offset per topic-partition), the model and the join state change together,
once per batch, on this thread; a snapshot copies all three at one instant. After a restart the
worker loads the newest valid snapshot and resumes every partition at the snapshot's position, so
every event is applied to the model exactly once however the process died. After each durable
snapshot the positions are committed to Kafka as well (for lag tools; the snapshot is the truth).
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_fm.errors import ConfigError, FeatureError, SnapshotError
from stream_fm.model import SparseFM
from stream_fm.ops.progress import Bar
from stream_fm.ops.quality import RollingQuality
from stream_fm.snapshots import snapshot
from stream_fm.snapshots.snapshot_writer import SnapshotWriter
from stream_fm.stream.deadletters import DeadLetters
from stream_fm.stream.join import Joins, JoinView
from stream_fm.stream.samples import join_values
from stream_fm.stream.sources import Batch, Positions, Record, Source

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    snapshot_dir: Path
    snapshot_every_seconds: float | None = 60.0
    snapshot_every_samples: int | None = None
    snapshot_keep: int = 5
    attribution_window: float = 1800.0
    allowed_lateness: float = 60.0
    max_pending: int = 1_000_000
    max_message_bytes: int = 1 << 20
    batch_size: int = 5000
    poll_timeout: float = 0.5
    quality_window: int = 10_000
    progress_interval: float = 10.0
    shutdown_timeout: float = 60.0
    progress_bar: bool = True  # on a terminal, for finite sources (replay)
    model: dict[str, Any] = field(default_factory=dict)  # SparseFM arguments


@dataclass
class Stats:
    """Counters since the model began (restored from snapshots). The metrics layer reads them."""

    events: Counter = field(default_factory=Counter)  # impression / click / sample
    bad_events: Counter = field(default_factory=Counter)  # by reason
    trained: Counter = field(default_factory=Counter)  # "0" / "1"
    newest_event_ts: float | None = None  # event time of the newest trained sample

    def to_json(self) -> dict[str, Any]:
        return {
            "events": dict(self.events),
            "bad_events": dict(self.bad_events),
            "trained": dict(self.trained),
            "newest_event_ts": self.newest_event_ts,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stats:
        return cls(
            Counter(d["events"]), Counter(d["bad_events"]), Counter(d["trained"]), d["newest_event_ts"]
        )


class Worker:
    def __init__(self, source: Source, config: WorkerConfig, dead_letters: DeadLetters | None = None) -> None:
        self.source = source
        self.config = config
        self.dead_letters = dead_letters or DeadLetters()
        # first, before anything is read from it: the root's writer lock (RootLockedError if
        # another process writes there)
        self.writer = SnapshotWriter(
            config.snapshot_dir,
            every_seconds=config.snapshot_every_seconds,
            every_samples=config.snapshot_every_samples,
            keep=config.snapshot_keep,
        )
        self.model = SparseFM(**config.model)
        self.joins = Joins(config.attribution_window, config.allowed_lateness, config.max_pending)
        self.joiner = JoinView()  # the joins summed, as of the last batch (metrics, log)
        self.positions: Positions = {}
        self.stats = Stats()
        self.quality = RollingQuality(config.quality_window)
        self.restored_from: str | None = None
        self.batches = 0
        self.last_batch_seconds = 0.0
        # the source's state as of the last batch (read by the metrics thread, which must not
        # touch the Kafka client: kafka-python's consumer is not thread-safe)
        self.ready = False
        self.broker_up = False
        self.lag: dict[tuple[str, int], int] = {}
        self.assigned: list[tuple[str, int]] = []
        self.group_members = 1  # of the consumer group (Kafka); more than 1 is a mistake today
        # hooks: called on this thread after each batch (seconds) and each durable snapshot
        self.on_batch: list[Callable[[float], None]] = []
        self.on_snapshot: list[Callable[[SnapshotWriter], None]] = []
        self.baseline = Stats()  # counters as restored: metrics count from process start
        self._commit: Positions | None = None  # positions of the write in flight
        self._written = 0
        self._bad_logged = 0.0
        self._bad_unlogged = 0

    # ------------------------------------------------------------------ lifecycle

    def restore(self) -> None:
        """Continue from the newest valid snapshot, if there is one."""
        newest = self._newest_snapshot("starting a new model")
        if newest is None:
            return
        model, snap = newest
        if "cluster" in snap.extra:  # its join state is in the event log, its offsets are rounds'
            raise ConfigError(
                "cluster.sync_topic",
                "",
                f"{snap.extra['cluster']['sync_topic']!r}: {snap.path} is a cluster member's snapshot; "
                "run this worker as a member of that cluster (one member is a cluster too)",
            )
        self._check_settings(model, snap)
        self.model = model
        state = snap.extra_arrays.get("join_state")
        if state is not None:
            try:
                self.joins = Joins.from_state(
                    orjson.loads(np.asarray(state).tobytes()),
                    self.config.attribution_window, self.config.allowed_lateness, self.config.max_pending,
                )  # fmt: skip
            except ValueError as e:
                raise SnapshotError(snap.path, str(e)) from e
            self.joiner = self.joins.view()
        self.positions = {
            (topic, int(partition)): int(offset)
            for topic, parts in snap.offsets.items()
            for partition, offset in parts.items()
        }
        self._restore_stats(snap)
        log.info(
            "restored %s: %d samples, %d features, %d pending impressions, positions %s",
            snap.name, model.samples_seen, model.n_features, self.joiner.pending, self._offsets_json(),
        )  # fmt: skip

    def _newest_snapshot(self, otherwise: str) -> tuple[SparseFM, snapshot.Snapshot] | None:
        """The newest valid snapshot in the snapshot directory; None if there is none at all
        (``otherwise``: what the worker does then, for the log)."""
        newest = snapshot.restore_newest(self.config.snapshot_dir)
        if newest is None:
            log.info("no snapshot in %s: %s", self.config.snapshot_dir, otherwise)
        return newest

    def _restore_stats(self, snap: snapshot.Snapshot) -> None:
        """The counters as the snapshot left them (metrics count from here: the baseline)."""
        if "stats" in snap.extra:
            self.stats = Stats.from_json(snap.extra["stats"])
            self.baseline = Stats.from_json(snap.extra["stats"])
        self.restored_from = snap.name

    def _check_settings(self, model: SparseFM, snap: snapshot.Snapshot) -> None:
        """Refuse a snapshot whose model settings differ from the configured ones."""
        wanted = SparseFM(**self.config.model).get_config()
        differs = {k: (v, wanted[k]) for k, v in model.get_config().items() if wanted[k] != v}
        if differs:
            detail = ", ".join(f"{k}: snapshot {a!r}, configured {b!r}" for k, (a, b) in differs.items())
            raise ConfigError(
                "model", detail, f"the settings of the snapshot in {snap.path} (or a new --snapshot-dir)"
            )

    def run(self, stop: threading.Event | None = None) -> None:
        """Process until ``stop`` is set or a finite source ends; then a final snapshot."""
        stop = stop or threading.Event()
        self.restore()
        self._tune_gc()
        self.source.start(self.positions)
        last_progress = time.monotonic()
        fraction = getattr(self.source, "fraction", None)  # finite sources (a replayed file)
        bar = Bar(None, "replay") if fraction is not None and self.config.progress_bar else None
        try:
            while not stop.is_set():
                records = self.source.poll(self.config.poll_timeout, self.config.batch_size)
                if records:
                    self.process(records)
                self._read_source()
                if self.source.rebalanced:
                    self.source.rebalanced = False
                    self.snapshot_now("partitions revoked")
                else:
                    self._maybe_snapshot()
                self._commit_if_durable()
                if time.monotonic() - last_progress >= self.config.progress_interval:
                    last_progress = time.monotonic()
                    self.log_progress()
                if bar is not None and bar.due():
                    events = sum(self.stats.events.values()) - sum(self.baseline.events.values())
                    bar.update(events, f"events  logloss {self.quality.logloss():.4f}", fraction=fraction())
                if self.source.finished and not records:
                    break
        finally:
            if bar is not None:
                bar.close()
            self.snapshot_now("shutdown")
            self.log_progress()
            self.source.close()
            self.dead_letters.close()
            self.writer.close(self.config.shutdown_timeout)  # the snapshot root is free from here

    def _read_source(self) -> None:
        """The source's state as of now, kept for the metrics thread (which must not touch the
        Kafka client: kafka-python's consumer is not thread-safe)."""
        src = self.source
        self.ready, self.broker_up, self.lag, self.assigned, self.group_members = (
            src.ready, src.broker_up, src.lag(), src.assigned(), src.group_members(),
        )  # fmt: skip

    # ------------------------------------------------------------------ the data path

    def process(self, batches: Sequence[Batch]) -> None:
        """One poll's batches: decode, join, learn; positions advance past every record."""
        t = time.perf_counter()
        xs: list[dict[str, Any]] = []
        ys: list[bool] = []
        counts: Counter = Counter()
        newest = None
        for batch in batches:
            bad = functools.partial(self._bad_in, batch)
            joiner = self.joins.of(batch.topic, batch.partition)
            found = join_values(batch.values, joiner, self.config.max_message_bytes, bad, xs, ys, counts)
            for label, features, _ in self.joins.trim():  # (max_pending, all partitions together)
                xs.append(features)
                ys.append(label)
            if found is not None and (newest is None or found > newest):
                newest = found
            if batch.offsets:
                self.positions[batch.topic, batch.partition] = batch.offsets[-1] + 1
        self.stats.events.update(counts)
        self.joiner = self.joins.view()
        if xs:
            self._learn(xs, ys)
            if newest is not None:
                self.stats.newest_event_ts = max(newest, self.stats.newest_event_ts or newest)
        self.batches += 1
        self.last_batch_seconds = time.perf_counter() - t
        for hook in self.on_batch:
            hook(self.last_batch_seconds)

    def _learn(self, xs: list[dict[str, Any]], ys: list[bool]) -> None:
        while True:
            try:
                probs = self.model.learn_batch(xs, ys)
                break
            except FeatureError as e:  # events are validated on arrival: this is a safety net
                assert e.index is not None
                log.error("dropping a sample the model refused (not dead-lettered: joined state): %s", e)
                self.stats.bad_events["feature"] += 1
                del xs[e.index], ys[e.index]
        labels = np.array(ys, np.float64)
        self.quality.update(probs, labels)
        positives = int(labels.sum())
        self.stats.trained["1"] += positives
        self.stats.trained["0"] += len(ys) - positives

    def _bad_in(self, batch: Batch, i: int, reason: str, detail: str) -> None:
        """The ``i``-th record of ``batch`` is bad."""
        record = Record(batch.topic, batch.partition, batch.offsets[i], batch.values[i], batch.keys[i])
        self._bad(record, reason, detail)

    def _bad(self, record: Record, reason: str, detail: str) -> None:
        self.stats.bad_events[reason] += 1
        self._dead_letter(record, reason, detail)

    def _dead_letter(self, record: Record, reason: str, detail: str) -> None:
        """Send a bad record to the dead letters and say so (rate-limited)."""
        self.dead_letters.send(record, reason, detail)
        now = time.monotonic()
        if now - self._bad_logged >= 5.0:  # rate-limited: a flood of bad input must not flood the log
            more = f" (and {self._bad_unlogged} more since the last report)" if self._bad_unlogged else ""
            log.warning(
                "bad event at %s/%d/%d: %s: %s%s",
                record.topic,
                record.partition,
                record.offset,
                reason,
                detail,
                more,
            )
            self._bad_logged, self._bad_unlogged = now, 0
        else:
            self._bad_unlogged += 1

    # ------------------------------------------------------------------ snapshots and commits

    def _extra(self) -> snapshot.Extra:
        state = self.joins.capture()  # shallow copies now; built and serialised by the writer
        return snapshot.Extra(
            meta={"stats": self.stats.to_json(), "source": self.source.name},
            offsets=self._offsets_json(),
            deferred=lambda: {"join_state": np.frombuffer(orjson.dumps(state()), np.uint8)},
        )

    def _offsets_json(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self.positions.items()):
            out.setdefault(topic, {})[str(partition)] = offset
        return out

    def _maybe_snapshot(self) -> None:
        writer = self.writer
        if writer.busy or not writer.due(self.model.samples_seen):
            writer.maybe_write(self.model)  # (not due: lets the writer reserve its buffers)
            return
        # a snapshot must not cover a bad message that has not reached the dead-letter topic
        if not self.dead_letters.flush():
            return
        positions = dict(self.positions)
        if writer.maybe_write(self.model, self._extra):
            self._commit = positions

    def snapshot_now(self, why: str) -> bool:
        """A synchronous snapshot (shutdown, rebalance), then commit its positions."""
        if not self.dead_letters.flush():
            log.error(
                "dead letters undelivered: no %s snapshot (the next start replays from the last one)", why
            )
            return False
        positions = dict(self.positions)
        ok = self.writer.write_now(self.model, self._extra(), timeout=self.config.shutdown_timeout)
        if ok:
            self._durable()
            self.source.commit(positions)
            log.info("%s snapshot %s written and its offsets committed", why, self.writer.last_path.name)
        return ok

    @staticmethod
    def _tune_gc() -> None:
        """The model's key index and the pending impressions are millions of long-lived objects:
        moved out of the cyclic collector's sight (and re-frozen after each snapshot), full
        collections stop walking them; a larger first threshold makes young collections rarer
        (a worker makes a few dicts per event, nearly none of them cyclic)."""
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

    def _durable(self) -> None:
        self._written = self.writer.written
        for hook in self.on_snapshot:
            hook(self.writer)
        gc.freeze()

    def _commit_if_durable(self) -> None:
        if self._commit is not None and not self.writer.busy:
            if self.writer.written > self._written:
                self._durable()
                self.source.commit(self._commit)
            self._commit = None

    # ------------------------------------------------------------------ reporting

    def log_progress(self) -> None:
        lag = sum(self.source.lag().values())
        last = self.writer.last_success
        age = f"{time.time() - last:.0f}s ago" if last else "none yet"
        log.info(
            "progress: %d events, %d samples (%d clicks), %d bad | logloss %.4f AUC %.4f CTR %.4f | "
            "%d features, %d pending | lag %d | last snapshot %s",
            sum(self.stats.events.values()), self.model.samples_seen, self.stats.trained["1"],
            sum(self.stats.bad_events.values()),
            self.quality.logloss(), self.quality.auc(), self.quality.ctr(),
            self.model.n_features, self.joiner.pending, lag, age,
        )  # fmt: skip
