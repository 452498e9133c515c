"""The Kafka consumer, in a child process of the worker.

kafka-python parses record batches in pure Python: reading a message costs about as much as
everything the worker then does with it (decode, join, learn). In a process of its own the
consumer runs on another core, a batch ahead of the worker, and hands over plain lists (offsets,
keys, values) through a pipe.

The worker stays the owner of positions and offsets: the child seeks where the worker's state
is, commits only what the worker asks it to commit (after a durable snapshot), and exits when the
worker goes away (the pipe closes) or tells it to stop.

It also watches the consumer group. One worker per group is the rule (each worker learns its own
model from the partitions it holds), so a second member that takes partitions from this one is a
mistake that would otherwise go unseen: after every rebalance and every 30 s the child describes
the group, and while other members hold partitions it logs an ERROR naming them (client id, host,
partitions) and reports the member count (the ``stream_fm_consumer_group_members`` metric).

In cluster mode (``settings["cluster"]``) several members per group is the point, not a mistake:
the check still counts members but logs nothing. A cluster member also moves partitions itself
(``seek``): each seek carries an epoch, and every batch the epoch of its partition's last seek, so
that the worker can drop batches fetched before the seek took effect. A member that has read a
partition far enough ahead asks the child to ``hold`` it (stop fetching it, while the consumer
goes on polling and so keeps its place in the group) and to ``release`` it when it needs more.

Messages, worker -> child: ``("ack",)`` (a batch was taken: fetch the next), ``("commit",
positions)``, ``("seek", topic, partition, offset, epoch)``, ``("pause",)``, ``("resume",)``,
``("hold", topic, partition)``, ``("release", topic, partition)``, ``("stop",)``. Child ->
worker: ``("batch", batches, meta)``, ``("meta", meta)``, where a batch is ``(topic, partition,
offsets, keys, values, epoch)``, ``meta = (ready, assigned, lag, rebalanced,
broker_up, group, epochs)`` (``lag`` counts from the position of each partition's last seek, whose
epoch ``epochs`` gives) and ``group = (members, others)``, ``others`` a tuple of (client id, host,
partitions).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from stream_fm.ops import logs

__all__ = ["PREFETCH", "main"]

log = logging.getLogger(__name__)

PREFETCH = 1  # batches fetched ahead of the one the worker is processing
GROUP_CHECK_SECONDS = 30.0  # how often the group's members are described (and after each rebalance)
GROUP_REPEAT_SECONDS = 300.0  # how often the ERROR about other members is repeated while it lasts
Positions = dict[tuple[str, int], int]
Member = tuple[str, str, tuple[tuple[str, int], ...]]  # client id, host, partitions


def main(
    conn: Connection, settings: dict[str, Any], positions: Positions, log_setup: tuple[str, str]
) -> None:
    """The child's entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker handles Ctrl-C and tells us to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(*log_setup)
    _Fetcher(conn, settings, positions).loop()


class _Fetcher:
    def __init__(self, conn: Connection, settings: dict[str, Any], positions: Positions) -> None:
        self.conn = conn
        self.s = settings
        self.sent: Positions = dict(positions)  # next offset after what was handed over
        self.epochs: dict[tuple[str, int], int] = {}  # the epoch of each partition's last seek
        self.parent = os.getppid()
        self.consumer: KafkaConsumer | None = None
        self.in_flight = 0
        self.paused = False
        self.held: set[tuple[str, int]] = set()  # partitions the worker asked not to fetch for now
        self.rebalanced = False
        self.backoff, self.retry_at = 0.5, 0.0
        self.last_meta: Any = None
        self.meta_at = 0.0
        self.up, self.probed_at = False, -10.0
        self.client_id = settings["client_config"].get("client_id") or (
            f"stream-fm-{socket.gethostname()}-{self.parent}"  # tells members apart in group tools
        )
        self.admin: KafkaAdminClient | None = None
        self.group: tuple[int, tuple[Member, ...]] = (1, ())
        self.group_due = 0.0  # monotonic time of the next description of the group
        self.group_said: tuple[tuple[Member, ...], float] = ((), 0.0)  # what was logged, when

    def loop(self) -> None:
        try:
            while True:
                if not self._commands(0.0 if self.in_flight < PREFETCH else 0.05):
                    return
                if os.getppid() != self.parent:
                    return  # the worker died: nobody will take what we fetch
                if not self._connect():
                    time.sleep(0.1)
                    self._send_meta()
                    continue
                if time.monotonic() >= self.group_due:
                    self._check_group()
                if self.in_flight >= PREFETCH:
                    continue
                self._fetch()
        except (BrokenPipeError, ConnectionResetError):
            return  # the worker went away mid-send: nobody will take what we fetch
        finally:
            if self.consumer is not None:
                self.consumer.close(autocommit=False)
            if self.admin is not None:
                self.admin.close()

    def _commands(self, wait: float) -> bool:
        """Handle what the worker sent; False once it said stop or went away."""
        try:
            while self.conn.poll(wait):
                wait = 0.0
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "ack":
                    self.in_flight -= 1
                elif kind == "commit":
                    self._commit(msg[1])
                elif kind == "seek":
                    self._seek(*msg[1:])
                elif kind == "pause":
                    self.paused = True
                elif kind == "resume":
                    self.paused = False
                elif kind == "hold":
                    self.held.add((msg[1], msg[2]))
                elif kind == "release":
                    self.held.discard((msg[1], msg[2]))
                elif kind == "stop":
                    return False
        except (EOFError, OSError):
            return False
        return True

    def _connect(self) -> bool:
        if self.consumer is not None:
            return True
        if time.monotonic() < self.retry_at:
            return False
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=self.s["bootstrap_servers"],
                group_id=self.s["group_id"],
                enable_auto_commit=False,
                auto_offset_reset=self.s["auto_offset_reset"],
                **{**self.s["client_config"], "client_id": self.client_id},
            )
        except KafkaError as e:
            log.warning(
                "cannot reach Kafka at %s (%s); retrying in %.1f s",
                self.s["bootstrap_servers"],
                e,
                self.backoff,
            )
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(30.0, self.backoff * 2)
            return False
        self.backoff = 0.5
        self.consumer.subscribe(self.s["topics"], listener=_Listener(self))
        return True

    def _fetch(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        self._pause_as_asked(consumer)
        try:
            fetched = consumer.poll(timeout_ms=200, max_records=self.s["max_records"])
        except KafkaError as e:
            log.warning("poll failed: %s", e)
            time.sleep(0.2)
            return
        batches = []
        for tp, messages in fetched.items():
            if not messages:
                continue
            batches.append(
                (
                    tp.topic,
                    tp.partition,
                    [m.offset for m in messages],
                    [m.key for m in messages],
                    [m.value for m in messages],
                    self.epochs.get((tp.topic, tp.partition), 0),
                )
            )
            self.sent[(tp.topic, tp.partition)] = messages[-1].offset + 1
        if batches:
            self.conn.send(("batch", batches, self._meta()))
            self.in_flight += 1
        else:
            self._send_meta()

    def _pause_as_asked(self, consumer: KafkaConsumer) -> None:
        """Pause what the worker asked to pause (everything, or the partitions it holds) and resume
        the rest. A paused partition is still polled: the consumer keeps its place in the group."""
        assigned = consumer.assignment()
        paused = consumer.paused()
        held = {tp for tp in assigned if (tp.topic, tp.partition) in self.held}
        wanted = set(assigned) if self.paused else held
        if wanted - paused:
            consumer.pause(*(wanted - paused))
        for tp in paused - wanted:
            consumer.resume(tp)
            position = self.sent.get((tp.topic, tp.partition))
            if position is not None and tp in assigned:
                _drop_parked(consumer, tp)
                consumer.seek(tp, position)  # after the last record handed over

    def _seek(self, topic: str, partition: int, offset: int, epoch: int) -> None:
        """Read ``topic``/``partition`` from ``offset`` on (now if assigned, else when it is)."""
        self.sent[(topic, partition)] = offset
        self.epochs[(topic, partition)] = epoch
        self.held.discard((topic, partition))  # (held: resumed before the next fetch, from here)
        tp = TopicPartition(topic, partition)
        if self.consumer is not None and tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)

    def _check_group(self) -> None:
        """Describe the consumer group; log loudly while other members hold partitions."""
        self.group_due = time.monotonic() + GROUP_CHECK_SECONDS
        group_id = self.s["group_id"]
        try:
            if self.admin is None:
                config = {
                    k: v for k, v in self.s["client_config"].items() if k in KafkaAdminClient.DEFAULT_CONFIG
                }
                self.admin = KafkaAdminClient(
                    **{**config, "client_id": f"{self.client_id}-admin", "request_timeout_ms": 10_000},
                    bootstrap_servers=self.s["bootstrap_servers"],
                )
            described = self.admin.describe_groups([group_id])[group_id]
        except Exception as e:  # an outage, a missing ACL: the check is advisory, consuming goes on
            log.debug("could not describe consumer group %r: %s", group_id, e)
            return
        if described.get("group_state") != "Stable":  # mid-rebalance: assignments not settled yet
            self.group_due = time.monotonic() + 1.0
            return
        members = described["members"]
        mine = self._member_id()
        others = tuple(
            sorted(
                (
                    str(m["client_id"]),
                    str(m["client_host"]).lstrip("/"),
                    tuple(
                        sorted(
                            (a["topic"], p)
                            for a in (m.get("member_assignment") or {}).get("assigned_partitions", [])
                            for p in a["partitions"]
                        )
                    ),
                )
                for m in members
                if m["member_id"] != mine and (mine is not None or m["client_id"] != self.client_id)
            )
        )
        self.group = (len(members), others)
        said, when = self.group_said
        now = time.monotonic()
        if self.s.get("cluster"):
            return  # members of one cluster share the group by design
        if others and (others != said or now - when >= GROUP_REPEAT_SECONDS):
            mine_parts = sorted((tp.topic, tp.partition) for tp in self.consumer.assignment())
            listing = "; ".join(f"client id {c!r} on {h} holds {list(p)}" for c, h, p in others)
            log.error(
                "consumer group %r has %d members: this worker (client id %r) holds only %s; %s. "
                "Each worker learns its own model from the partitions it holds, so every one of them "
                "learns part of the stream: run one worker per group (or give each its own --group-id)",
                group_id, len(members), self.client_id, mine_parts, listing,
            )  # fmt: skip
            self.group_said = (others, now)
        elif not others and said:
            log.warning("consumer group %r: this worker is its only member again", group_id)
            self.group_said = ((), now)

    def _member_id(self) -> str | None:
        """This consumer's member id in the group (kafka-python keeps it on its coordinator)."""
        try:
            generation = self.consumer._coordinator.generation()  # type: ignore[union-attr]
            return generation.member_id if generation is not None else None
        except AttributeError:
            return None

    def _reachable(self) -> bool:
        """A broker accepts TCP connections (checked every 2 s): kafka-python keeps its assignment
        through an outage and says nothing, so readiness asks the network itself."""
        now = time.monotonic()
        if now - self.probed_at < 2.0:
            return self.up
        self.probed_at = now
        servers = self.s["bootstrap_servers"]
        for server in [servers] if isinstance(servers, str) else servers:
            for address in str(server).split(","):
                host, _, port = address.strip().rpartition(":")
                try:
                    socket.create_connection(
                        (host.strip("[]") or "localhost", int(port or 9092)), timeout=1.0
                    ).close()
                except (OSError, ValueError):
                    continue
                self.up = True
                return True
        self.up = False
        return False

    def _meta(self) -> tuple[Any, ...]:
        consumer = self.consumer
        assigned = sorted((tp.topic, tp.partition) for tp in consumer.assignment()) if consumer else []
        lag = {}
        for topic, partition in assigned:
            end = consumer.highwater(TopicPartition(topic, partition))
            pos = self.sent.get((topic, partition))
            if end is not None and pos is not None:
                lag[(topic, partition)] = max(0, end - pos)
        rebalanced, self.rebalanced = self.rebalanced, False
        up = self._reachable()
        return (up and bool(assigned), assigned, lag, rebalanced, up, self.group, dict(self.epochs))

    def _send_meta(self) -> None:
        """Tell the worker about readiness and lag when they change, or every second."""
        meta = self._meta()
        now = time.monotonic()
        if meta != self.last_meta or now - self.meta_at >= 1.0:
            self.conn.send(("meta", meta))
            self.last_meta, self.meta_at = meta, now

    def _commit(self, positions: Positions) -> None:
        if self.consumer is None:
            return
        mine = set(self.consumer.assignment())
        offsets = {
            TopicPartition(t, p): OffsetAndMetadata(off, "", -1)
            for (t, p), off in positions.items()
            if TopicPartition(t, p) in mine
        }
        if not offsets:
            return
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.consumer.commit(offsets)
                return
            except KafkaError as e:
                # e.g. the group coordinator is still loading after a broker restart: worth a retry
                if getattr(e, "retriable", False) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                # committed offsets are for lag tools; the snapshot is the truth
                log.warning("could not commit offsets (will retry after the next snapshot): %s", e)
                return


def _drop_parked(consumer: KafkaConsumer, tp: TopicPartition) -> None:
    """Forget the records kafka-python fetched for ``tp`` before it was paused (the caller seeks).

    kafka-python 3.0 parks them when the partition is paused and restores them after it is
    resumed only while its in-line slot is empty, which it is only until the first fetch: until
    then the partition counts as having records waiting and is never fetched again (measured:
    partitions stuck for good after a pause and a resume). Dropped, they are fetched again from
    the position the caller seeks to. (Private attributes: absent in a version without them.)"""
    fetcher = getattr(consumer, "_fetcher", None)
    for name in ("_paused_partition_records", "_paused_completed_fetches"):
        parked = getattr(fetcher, name, None)
        if isinstance(parked, dict):
            parked.pop(tp, None)


class _Listener(ConsumerRebalanceListener):
    """Rebalance callbacks. In kafka-python 3.x they run on the client's I/O thread: they only
    set positions and flags, never block (a synchronous commit here could deadlock)."""

    def __init__(self, fetcher: _Fetcher) -> None:
        self.fetcher = fetcher

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.fetcher.group_due = 0.0  # who took them? the loop describes the group next
        if revoked:
            self.fetcher.rebalanced = True
            log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.fetcher.group_due = 0.0
        consumer = self.fetcher.consumer
        for tp in assigned:
            position = self.fetcher.sent.get((tp.topic, tp.partition))
            if position is not None:
                consumer.seek(tp, position)  # where the worker's state is, not the group's commit
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))
