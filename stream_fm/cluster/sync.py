"""The sync topic (cluster mode): one Kafka partition that every member writes its deltas to and
reads everyone's deltas from, in one order that all members see alike.

The topic's first message is the cluster's **genesis**: ``b"SFMG"``, a u32 length and JSON
(``format``, ``partitions`` as ``[topic, partition, first offset]`` in the order deltas number
them, ``round_records``, ``model``: the model's settings). Whoever finds the topic empty writes
one; if two members race, the first in the log is the cluster's and the other's is ignored. Every
later message is a chunk of a delta (:mod:`stream_fm.cluster.delta`).

The topic is created with one partition if it does not exist (a member never writes to a topic of
several partitions: their order would differ between readers).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from stream_fm.cluster import delta as wire
from stream_fm.errors import ConfigError, DeltaError

__all__ = ["GENESIS_MAGIC", "SyncLog", "decode_genesis", "encode_genesis"]

log = logging.getLogger(__name__)

GENESIS_MAGIC = b"SFMG"
# 2: rounds carry samples, learned by every member (1: they carried changes of the model, merged)
GENESIS_FORMAT = 2
_U32 = struct.Struct("<I")


def encode_genesis(genesis: Mapping[str, Any]) -> bytes:
    body = json.dumps({"format": GENESIS_FORMAT, **genesis}, separators=(",", ":")).encode()
    return GENESIS_MAGIC + _U32.pack(len(body)) + body


def decode_genesis(message: bytes) -> dict[str, Any] | None:
    """The genesis a message holds, or None if it is not one."""
    if message[:4] != GENESIS_MAGIC:
        return None
    (length,) = _U32.unpack_from(message, 4)
    try:
        genesis = json.loads(bytes(message[8 : 8 + length]))
    except ValueError as e:
        raise DeltaError(f"the sync topic's genesis is not JSON: {e}") from e
    if not isinstance(genesis, dict):
        raise DeltaError(f"the sync topic's genesis is not a JSON object: {str(genesis)[:200]}")
    if genesis.get("format") != GENESIS_FORMAT:
        raise DeltaError(
            f"the sync topic's genesis is format {genesis.get('format')!r}; this release reads format "
            f"{GENESIS_FORMAT} (its rounds carry samples, not changes of the model): start a new sync "
            "topic and give the members empty snapshot directories"
        )
    return genesis


class SyncLog:
    """A reader and a writer of the sync topic (kafka-python, in this process).

    ``client_config`` passes to the consumer, the producer and the admin client (security)."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        client_config: Mapping[str, Any] | None = None,
        max_message_bytes: int = 900_000,
    ) -> None:
        self.topic = topic
        self.servers = bootstrap_servers
        self.client = dict(client_config or {})
        self.max_message_bytes = max_message_bytes
        self.position = 0  # the offset of the next message to read
        self._consumer: Any = None
        self._producer: Any = None
        self._tp: Any = None
        self._sent: deque[Any] = deque()  # the producer's futures not known to be delivered yet

    def start(self, offset: int) -> None:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        self._ensure_topic()
        self._tp = TopicPartition(self.topic, 0)
        self._consumer = KafkaConsumer(
            bootstrap_servers=self.servers,
            enable_auto_commit=False,
            group_id=None,
            # a long poll: the broker answers as soon as a message arrives (measured: 9 ms from
            # publishing to reading back, as with 20 ms), and an idle member asks 2 times a second
            # instead of 50 (the consumer's I/O thread took 5% of a core doing that)
            fetch_max_wait_ms=500,
            max_partition_fetch_bytes=max(1 << 20, 2 * self.max_message_bytes),
            fetch_max_bytes=max(50 << 20, 4 * self.max_message_bytes),
            **self.client,
        )
        self._consumer.assign([self._tp])
        self._consumer.seek(self._tp, offset)
        self.position = offset
        # acks=all and one request in flight: a member's chunks land in the order it sent them
        self._producer = KafkaProducer(
            bootstrap_servers=self.servers,
            acks="all",
            linger_ms=5,
            max_in_flight_requests_per_connection=1,
            max_request_size=self.max_message_bytes + 1024,
            # a member's rounds of several partitions, published together, in one batch and one
            # request: kafka-python's network thread spends about a millisecond a request whatever
            # its size (measured: 600 messages of 30 kB, 0.49 s alone, 0.18 s six to a batch)
            batch_size=self.max_message_bytes,
            **self.client,
        )

    def _ensure_topic(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.servers, **self.client)
        try:
            topics = admin.describe_topics([self.topic]) if self.topic in admin.list_topics() else []
            if topics:
                partitions = len(topics[0]["partitions"])
                if partitions != 1:
                    raise ConfigError(
                        "cluster.sync_topic", self.topic, f"a topic of one partition (it has {partitions})"
                    )
                return
            try:
                admin.create_topics([NewTopic(self.topic, 1, 1)])
                log.info("created the sync topic %r (one partition)", self.topic)
            except TopicAlreadyExistsError:
                pass
        finally:
            admin.close()

    def partitions(self, topics: Sequence[str], timeout: float = 30.0) -> list[list[Any]]:
        """``[topic, partition, first offset]`` of every partition of ``topics``, in order: the
        partitions a new cluster numbers its deltas by, and where their first rounds begin."""
        from kafka import TopicPartition

        out: list[list[Any]] = []
        deadline = time.monotonic() + timeout
        for topic in topics:
            while not (found := self._consumer.partitions_for_topic(topic)):
                if time.monotonic() > deadline:
                    raise ConfigError(
                        "kafka.topics",
                        topic,
                        "an existing topic (a cluster numbers its partitions as it begins)",
                    )
                time.sleep(0.5)
            tps = [TopicPartition(topic, p) for p in sorted(found)]
            first = self._consumer.beginning_offsets(tps)
            out += [[topic, tp.partition, int(first[tp])] for tp in tps]
        return out

    def end(self) -> int:
        """The topic's end offset now (what a reader has to reach to have seen everything)."""
        return int(self._consumer.end_offsets([self._tp])[self._tp])

    def poll(self, timeout: float) -> list[tuple[int, bytes]]:
        """The next messages as (offset, bytes); [] if none came within ``timeout`` seconds."""
        fetched = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=5000)
        out = [(m.offset, m.value) for m in fetched.get(self._tp, [])]
        if out:
            self.position = out[-1][0] + 1
        return out

    def genesis(
        self, proposal: Mapping[str, Any] | None, timeout: float = 60.0
    ) -> tuple[dict[str, Any], int]:
        """The cluster's genesis and its offset: the topic's first message, written from
        ``proposal`` if the topic is empty (None: wait for a member to write it)."""
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, 0)
        first = int(self._consumer.beginning_offsets([tp])[tp])
        if self.end() == first and proposal is not None:
            self._producer.send(self.topic, encode_genesis(proposal)).get(timeout=30)
        reader = self._consumer
        keep = self.position
        reader.seek(tp, first)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for m in reader.poll(timeout_ms=500, max_records=1).get(tp, []):
                    genesis = decode_genesis(m.value)
                    if genesis is None:
                        raise DeltaError(
                            f"the sync topic {self.topic!r} does not begin with a genesis (offset "
                            f"{m.offset}): its beginning was deleted by retention, or it is not a "
                            "sync topic; start the cluster on a new topic (or from a snapshot)"
                        )
                    return genesis, m.offset
            raise DeltaError(f"no genesis read from the sync topic {self.topic!r} in {timeout:.0f} s")
        finally:
            reader.seek(tp, keep)

    def publish(self, delta: wire.Delta) -> int:
        """Send a delta's messages (without waiting for them: :meth:`check_sent`); the bytes sent."""
        messages = wire.encode(delta, self.max_message_bytes)
        self._sent.extend(self._producer.send(self.topic, m) for m in messages)
        self.check_sent()
        return sum(len(m) for m in messages)

    def check_sent(self) -> None:
        """Raise if a message sent earlier failed for good (the producer retries first): its round
        would never be folded, so the member stops. Sending does not wait for the broker: a
        member folds its own rounds only once it has read them back from the topic."""
        while self._sent and self._sent[0].is_done:
            future = self._sent.popleft()
            if future.failed():
                raise DeltaError(
                    f"a message to the sync topic {self.topic!r} was not delivered: {future.exception!r}"
                )

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every message sent is delivered (or raise as :meth:`check_sent`)."""
        self._producer.flush(timeout=timeout)
        self.check_sent()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
        if self._consumer is not None:
            self._consumer.close()
