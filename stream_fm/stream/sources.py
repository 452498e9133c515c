"""Where events come from: Kafka, a JSON-lines file, or the built-in demo stream.

Every source hands the worker batches of :class:`Record` (raw bytes plus where they came from) and
resumes from positions: ``{(topic, partition): next offset}``, the same shape for all three, which
the worker keeps in its snapshots. A file is one partition whose offsets are line numbers; the demo
stream is one partition whose offsets are event numbers.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from stream_fm.ops import logs
from stream_fm.stream.demo import DemoStream

__all__ = ["Batch", "DemoSource", "FileSource", "KafkaSource", "Positions", "Record", "Source"]

log = logging.getLogger(__name__)

Positions = dict[tuple[str, int], int]


class Batch(NamedTuple):
    """Consecutive records of one partition, as parallel lists (cheaper than an object each)."""

    topic: str
    partition: int
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    epoch: int = 0  # Kafka: the epoch of the partition's last seek (KafkaSource.seek)


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

    def poll(self, timeout: float, max_records: int) -> list[Batch]:
        """The next records, grouped by partition; [] if none came within ``timeout`` seconds."""
        raise NotImplementedError

    def commit(self, positions: Positions) -> None:
        """Record progress where others can see it (Kafka: the group's committed offsets)."""

    @property
    def ready(self) -> bool:
        return True

    @property
    def broker_up(self) -> bool:
        """The source's server is reachable (always, for a file or the demo)."""
        return True

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def assigned(self) -> list[tuple[str, int]]:
        return []

    def group_members(self) -> int:
        """Members of the consumer group this source reads in (1: this worker alone)."""
        return 1

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

    def poll(self, timeout: float, max_records: int) -> list[Batch]:
        if self.paused:
            time.sleep(timeout)
            return []
        values = []
        for _ in range(max_records):
            line = self._file.readline()
            if not line:
                self.finished = True
                break
            values.append(line.rstrip(b"\r\n"))
        if not values:
            return []
        first, self._line = self._line, self._line + len(values)
        return [Batch(self.topic, 0, list(range(first, self._line)), [None] * len(values), values)]

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
    """The built-in demo stream (:mod:`stream_fm.stream.demo`), optionally paced to ``rate`` events/s and
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

    def poll(self, timeout: float, max_records: int) -> list[Batch]:
        if self.paused:
            time.sleep(timeout)
            return []
        n = max_records
        if self.rate:
            # wait for a batch worth 50 ms of the rate (or a full one), not for every event
            want = min(max_records, max(1, int(self.rate * 0.05)))
            due = self._due() - self._next
            if due < want:
                time.sleep(min(timeout, (want - due) / self.rate))
                due = self._due() - self._next
            n = max(0, min(n, due))
        if self.limit is not None:
            n = min(n, self.limit - self._next)
            self.finished = n <= 0
        if n <= 0:
            return []
        keys, values = [], []
        for key, event in (next(self._events) for _ in range(n)):
            keys.append(key.encode())
            values.append(orjson.dumps(event))
        first, self._next = self._next, self._next + n
        return [Batch(self.topic, 0, list(range(first, self._next)), keys, values)]

    def assigned(self) -> list[tuple[str, int]]:
        return [(self.topic, 0)]

    def lag(self) -> dict[tuple[str, int], int]:
        """Events the pacing clock has made due but the worker has not taken (0 when unpaced)."""
        if not self.rate:
            return {(self.topic, 0): 0}
        due = self._due()
        if self.limit is not None:
            due = min(due, self.limit)
        return {(self.topic, 0): max(0, due - self._next)}

    def _due(self) -> int:
        """Events the pacing clock has made due since the stream began (offset counted)."""
        assert self.rate
        return self._base + int((time.monotonic() - self._started) * self.rate)


class KafkaSource(Source):
    """A Kafka consumer group member, offsets managed by the worker (no auto-commit).

    The kafka-python consumer runs in a child process (:mod:`stream_fm.stream.kafka_fetch`), a batch
    ahead, so that its record parsing uses another core. ``client_config`` passes straight to
    ``KafkaConsumer`` (security: ``security_protocol``, ``sasl_mechanism``, ``ssl_cafile``, ...;
    ``group_instance_id``). If the broker cannot be reached, the consumer is retried with
    exponential backoff (up to 30 s) and ``ready`` is False meanwhile; it never gives up by itself.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topics: Sequence[str],
        group_id: str,
        *,
        auto_offset_reset: str = "earliest",
        client_config: Mapping[str, Any] | None = None,
        max_records: int = 5000,
        cluster: bool = False,
    ) -> None:
        self.name = f"kafka:{','.join(topics)}"
        self.settings = {
            "bootstrap_servers": bootstrap_servers,
            "topics": list(topics),
            "group_id": group_id,
            "auto_offset_reset": auto_offset_reset,
            "client_config": dict(client_config or {}),
            "max_records": max_records,
            "cluster": cluster,
        }
        self._positions: Positions = {}
        self._child: Any = None
        self._conn: Any = None
        # (ready, assigned, lag, rebalanced, broker up, (group members, others), seek epochs), as
        # the child last reported
        self._meta: tuple[Any, ...] = (False, [], {}, False, False, (1, ()), {})

    def start(self, positions: Positions) -> None:
        # the worker's own dict, updated as it learns: a restarted child resumes from it
        self._positions = positions
        self._spawn()

    def _spawn(self) -> None:
        from stream_fm.stream import kafka_fetch

        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._conn, child_end = context.Pipe()
        root = logging.getLogger()
        level = logging.getLevelName(root.level)
        fmt = "json" if any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers) else "text"
        self._child = context.Process(
            target=kafka_fetch.main,
            args=(child_end, self.settings, dict(self._positions), (level, fmt)),
            name="stream-fm-kafka",
            daemon=True,
        )
        self._child.start()
        child_end.close()

    def poll(self, timeout: float, max_records: int) -> list[Batch]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if not self._conn.poll(max(0.0, remaining)):
                    return []
                message = self._conn.recv()
            except (EOFError, OSError):
                log.error(
                    "the Kafka consumer process exited (code %s): starting a new one", self._child.exitcode
                )
                self._child.join(5)
                self._spawn()
                return []
            if message[0] == "batch":
                self._conn.send(("ack",))  # the child fetches the next batch while we process this one
                self._update(message[2])
                return [Batch(*b) for b in message[1]]
            self._update(message[1])

    def _update(self, meta: Any) -> None:
        self._meta = meta
        if meta[3]:
            self.rebalanced = True

    def commit(self, positions: Positions) -> None:
        if positions:
            self._send(("commit", dict(positions)))

    def seek(self, topic: str, partition: int, offset: int, epoch: int) -> None:
        """Read the partition from ``offset`` on; its batches carry ``epoch`` from then on (a
        batch with an older epoch was fetched before the seek: the caller drops it)."""
        self._send(("seek", topic, partition, offset, epoch))

    def hold(self, topic: str, partition: int) -> None:
        """Stop fetching the partition for now (what is in flight still comes)."""
        self._send(("hold", topic, partition))

    def release(self, topic: str, partition: int) -> None:
        """Fetch the partition again, after the last record handed over (a seek releases it too)."""
        self._send(("release", topic, partition))

    def pause(self) -> None:
        super().pause()
        self._send(("pause",))

    def resume(self) -> None:
        super().resume()
        self._send(("resume",))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, AttributeError):  # not started, or the child is gone (poll restarts it)
            pass

    @property
    def ready(self) -> bool:
        return self._meta[0]

    @property
    def broker_up(self) -> bool:
        return self._meta[4]

    def assigned(self) -> list[tuple[str, int]]:
        return list(self._meta[1])

    def group_members(self) -> int:
        return int(self._meta[5][0])

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self._meta[2])

    def epochs(self) -> dict[tuple[str, int], int]:
        """The epoch of each partition's last seek as the consumer last reported: its ``lag``
        counts from that seek's position on."""
        return dict(self._meta[6])

    def close(self) -> None:
        if self._child is None:
            return
        self._send(("stop",))
        self._child.join(15)
        if self._child.is_alive():
            self._child.terminate()
            self._child.join(5)
        self._conn.close()
        self._child = None
