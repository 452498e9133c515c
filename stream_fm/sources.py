"""Where events come from: Kafka, a JSON-lines file, or the built-in demo stream.

Every source hands the worker batches of :class:`Record` (raw bytes plus where they came from) and
resumes from positions: ``{(topic, partition): next offset}``, the same shape for all three, which
the worker keeps in its snapshots. A file is one partition whose offsets are line numbers; the demo
stream is one partition whose offsets are event numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from stream_fm.demo import DemoStream

__all__ = ["DemoSource", "FileSource", "KafkaSource", "Positions", "Record", "Source"]

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]


@dataclass(slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()


class Source:
    """The interface the worker uses. ``finished`` turns True at the end of a finite source."""

    name = "source"
    finished = False
    rebalanced = False  # set when partitions were revoked: the worker snapshots before going on
    paused = False  # pause(): poll returns nothing (maintenance; the metrics stay up)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def start(self, positions: Positions) -> None:
        """Begin reading; partitions in ``positions`` resume from the offset given."""

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        raise NotImplementedError

    def commit(self, positions: Positions) -> None:
        """Record progress where others can see it (Kafka: the group's committed offsets)."""

    @property
    def ready(self) -> bool:
        return True

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def assigned(self) -> list[tuple[str, int]]:
        return []

    def close(self) -> None:
        pass


class FileSource(Source):
    """A JSON-lines file, one event per line; offsets are line numbers (0-based)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path.name}"
        self.topic = "file"
        self._file: Any = None
        self._line = 0

    def start(self, positions: Positions) -> None:
        self._file = open(self.path, "rb")
        skip = positions.get((self.topic, 0), 0)
        for _ in range(skip):
            if not self._file.readline():
                break
        self._line = skip

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        if self.paused:
            time.sleep(timeout)
            return []
        out = []
        for _ in range(max_records):
            line = self._file.readline()
            if not line:
                self.finished = True
                break
            out.append(Record(self.topic, 0, self._line, line.rstrip(b"\r\n")))
            self._line += 1
        return out

    def assigned(self) -> list[tuple[str, int]]:
        return [(self.topic, 0)]

    def fraction(self) -> float:
        """How much of the file has been read, 0 to 1 (for a progress bar)."""
        size = self.path.stat().st_size
        return self._file.tell() / size if self._file is not None and size else 1.0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class DemoSource(Source):
    """The built-in demo stream (:mod:`stream_fm.demo`), optionally paced to ``rate`` events/s and
    stopped after ``limit`` events."""

    def __init__(self, seed: int = 0, rate: float | None = 2000.0, limit: int | None = None) -> None:
        self.name = f"demo(seed={seed})"
        self.topic = "demo"
        self.rate = rate
        self.limit = limit
        self._stream = DemoStream(seed=seed)
        self._events: Iterator[tuple[str, dict[str, Any]]] = iter(())
        self._next = 0
        self._started = time.monotonic()
        self._base = 0

    def start(self, positions: Positions) -> None:
        self._events = iter(self._stream)
        skip = positions.get((self.topic, 0), 0)
        for _ in range(skip):  # deterministic: regenerate and drop what was already learned
            next(self._events)
        self._next = self._base = skip
        self._started = time.monotonic()

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        if self.paused:
            time.sleep(timeout)
            return []
        n = max_records
        if self.rate:
            # wait for a batch worth 50 ms of the rate (or a full one), not for every event
            want = min(max_records, max(1, int(self.rate * 0.05)))
            due = self._base + int((time.monotonic() - self._started) * self.rate) - self._next
            if due < want:
                time.sleep(min(timeout, (want - due) / self.rate))
                due = self._base + int((time.monotonic() - self._started) * self.rate) - self._next
            n = max(0, min(n, due))
        if self.limit is not None:
            n = min(n, self.limit - self._next)
            self.finished = n <= 0
        out = []
        for key, event in (next(self._events) for _ in range(n)):
            out.append(Record(self.topic, 0, self._next, orjson.dumps(event), key.encode()))
            self._next += 1
        return out

    def assigned(self) -> list[tuple[str, int]]:
        return [(self.topic, 0)]

    def lag(self) -> dict[tuple[str, int], int]:
        """Events the pacing clock has made due but the worker has not taken (0 when unpaced)."""
        if not self.rate:
            return {(self.topic, 0): 0}
        due = self._base + int((time.monotonic() - self._started) * self.rate)
        if self.limit is not None:
            due = min(due, self.limit)
        return {(self.topic, 0): max(0, due - self._next)}


class KafkaSource(Source):
    """A kafka-python consumer in a group, offsets managed by the worker (no auto-commit).

    ``client_config`` passes straight to ``KafkaConsumer`` (security: ``security_protocol``,
    ``sasl_mechanism``, ``sasl_plain_username``, ``ssl_cafile``, ...). If the broker cannot be
    reached, the consumer is retried with exponential backoff (up to 30 s) and ``ready`` is False
    meanwhile; the source never gives up by itself.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topics: Sequence[str],
        group_id: str,
        *,
        auto_offset_reset: str = "earliest",
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = f"kafka:{','.join(topics)}"
        self.bootstrap_servers = bootstrap_servers
        self.topics = list(topics)
        self.group_id = group_id
        self.auto_offset_reset = auto_offset_reset
        self.client_config = dict(client_config or {})
        self._consumer: Any = None
        self._positions: Positions = {}
        self._backoff = 0.5
        self._retry_at = 0.0
        self._connected = False

    def start(self, positions: Positions) -> None:
        self._positions = dict(positions)
        self._connect()

    def _connect(self) -> bool:
        if self._consumer is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset=self.auto_offset_reset,
                **self.client_config,
            )
        except KafkaError as e:
            log.warning(
                "cannot reach Kafka at %s (%s); retrying in %.1f s", self.bootstrap_servers, e, self._backoff
            )
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(30.0, self._backoff * 2)
            return False
        self._backoff = 0.5
        self._consumer.subscribe(self.topics, listener=_Listener(self))
        return True

    def seek_to(self, positions: Positions) -> None:
        """Positions the worker's state has reached (it seeks there when partitions arrive)."""
        self._positions = dict(positions)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        if not self._connect():
            time.sleep(min(timeout, 0.2))
            return []
        if self.paused:
            self._consumer.pause(*self._consumer.assignment())  # keeps the group membership alive
        elif self._consumer.paused():
            self._consumer.resume(*self._consumer.paused())
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as e:
            self._connected = False
            log.warning("poll failed: %s", e)
            time.sleep(min(timeout, 0.5))
            return []
        self._connected = bool(self._consumer.assignment())
        # kafka-python's ConsumerRecords have the fields of a Record: handed on as they are
        out = []
        for messages in batches.values():
            out.extend(messages)
        return out

    def commit(self, positions: Positions) -> None:
        if self._consumer is None or not positions:
            return
        mine = set(self._consumer.assignment())
        offsets = {
            TopicPartition(t, p): OffsetAndMetadata(off, "", -1)
            for (t, p), off in positions.items()
            if TopicPartition(t, p) in mine
        }
        try:
            self._consumer.commit(offsets)
        except KafkaError as e:  # committed offsets are for lag tools; the snapshot is the truth
            log.warning("could not commit offsets (will retry after the next snapshot): %s", e)

    @property
    def ready(self) -> bool:
        return self._consumer is not None and self._connected

    def assigned(self) -> list[tuple[str, int]]:
        if self._consumer is None:
            return []
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: the broker's end offset (as last fetched) minus our position."""
        if self._consumer is None:
            return {}
        out = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            pos = self._positions.get((tp.topic, tp.partition))
            if end is not None and pos is not None:
                out[(tp.topic, tp.partition)] = max(0, end - pos)
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


class _Listener(ConsumerRebalanceListener):
    """Rebalance callbacks. In kafka-python 3.x they run on the client's I/O thread: they only
    set positions and flags, never block (a synchronous commit here could deadlock)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            self.source.rebalanced = True
            log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        consumer = self.source._consumer
        for tp in assigned:
            position = self.source._positions.get((tp.topic, tp.partition))
            if position is not None:
                consumer.seek(tp, position)  # resume where the model's state is, not the group's commit
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))
