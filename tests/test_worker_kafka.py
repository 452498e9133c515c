"""The worker against a real Kafka broker: exactly-once state across kill -9, broker outages, SIGTERM.

Every test here runs `stream-fm run` as a child process against the broker of
deploy/kafka/kafka-local.sh, on topics of its own. No mock stands in for Kafka.
"""

from __future__ import annotations

import ast
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pytest
from helpers import stream_fm_process
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from stream_fm.snapshots import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW, LATENESS = 60.0, 10.0


@dataclass
class Produced:
    """What a test wrote into its topic, and what a correct worker must make of it."""

    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value)
    impressions: set[str] = field(default_factory=set)  # distinct impression ids (trained once each)
    positives: set[str] = field(default_factory=set)  # clicked inside the window
    counts: dict[str, int] = field(default_factory=lambda: {"impression": 0, "click": 0})
    bad: list[int] = field(default_factory=list)  # offsets of malformed messages (one partition)

    def add(self, event: dict | bytes, key: str | None = None) -> None:
        value = event if isinstance(event, bytes) else orjson.dumps(event)
        self.messages.append((key.encode() if key else None, value))


BAD_MESSAGES = [
    b"{not json",
    b'{"type": "impression", "id": "\xff\xfe", "ts": 1, "features": {}}',  # invalid UTF-8
    b'{"type": "view", "id": "x"}',
    b'{"type": "impression", "id": "bad-f", "ts": 5, "features": {"price": null}}',
    b'{"type": "click", "impression_id": "i1", "ts": "noon"}',
    b"x" * 1_500_000,  # over the worker's 1 MiB message limit (the broker takes up to 2 MB)
]


def make_stream(n: int, seed: int) -> Produced:
    """Impressions one second apart; clicks inside the window, after it, repeated, orphan;
    duplicate impressions; malformed messages; a final impression far in the future that
    closes every window (it stays pending itself)."""
    rng = random.Random(seed)
    p = Produced()
    later: list[tuple[float, dict]] = []  # clicks waiting for their place in the stream
    for i in range(n):
        ts = 1000.0 + i
        while later and later[0][0] <= ts:
            _, click = later.pop(0)
            p.add(click, click["impression_id"])
            p.counts["click"] += 1
        imp_id = f"imp-{i}"
        features = {
            "user": f"u{rng.randrange(300)}",
            "ad": f"a{rng.randrange(40)}",
            "pos": float(rng.randrange(1, 4)),
        }
        p.add({"type": "impression", "id": imp_id, "ts": ts, "features": features}, imp_id)
        p.counts["impression"] += 1
        p.impressions.add(imp_id)
        r = rng.random()
        if r < 0.25:  # clicked inside the window, sometimes twice
            p.positives.add(imp_id)
            for _ in range(2 if rng.random() < 0.1 else 1):
                later.append(
                    (ts + rng.uniform(1, 20), {"type": "click", "impression_id": imp_id, "ts": ts + 5})
                )
        elif r < 0.30:  # clicked long after the window closed: a late click, the impression a negative
            later.append((ts + 200, {"type": "click", "impression_id": imp_id, "ts": ts + 200}))
        later.sort(key=lambda c: c[0])
        if rng.random() < 0.03:  # the producer retried: a duplicate impression
            p.add({"type": "impression", "id": imp_id, "ts": ts, "features": features}, imp_id)
            p.counts["impression"] += 1
        if rng.random() < 0.02:
            p.add({"type": "click", "impression_id": f"nobody-{i}", "ts": ts}, f"nobody-{i}")
            p.counts["click"] += 1
        if rng.random() < 0.01 or i == n // 2:
            p.bad.append(len(p.messages))
            p.add(BAD_MESSAGES[len(p.bad) % len(BAD_MESSAGES)])
    for _, click in later:
        p.add(click, click["impression_id"])
        p.counts["click"] += 1
    p.add({"type": "impression", "id": "the-end", "ts": 1e9, "features": {"ad": "a0"}}, "the-end")
    p.counts["impression"] += 1
    return p


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=4_000_000, linger_ms=10
    )
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush(60)
    producer.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    ends = consumer.end_offsets(parts)
    consumer.close()
    return {tp.partition: off for tp, off in ends.items()}


def latest_offsets(root: Path, topic: str) -> dict[int, int]:
    name = snapshot.latest_name(root)
    if name is None:
        return {}
    try:
        offsets = snapshot.read(root / name).offsets
    except Exception:  # retention may delete it between the two reads: ask again
        return {}
    return {int(p): o for p, o in offsets.get(topic, {}).items()}


def wait_until(check, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker_args(kafka, topic: str, group: str, root: Path, dlq: str | None = None) -> list[str]:
    args = [
        "run", "--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--group-id", group,
        "--snapshot-dir", str(root), "--snapshot-interval", "0.3", "--batch-size", "200",
        "--group-instance-id", f"{group}-worker", "--metrics-port", "0",
        "--attribution-window", str(WINDOW), "--allowed-lateness", str(LATENESS), "--progress-interval", "2",
    ]  # fmt: skip
    return args + (["--dead-letter-topic", dlq] if dlq else [])


class Trickle:
    """Feeds a topic slowly from a background thread, so that a worker killed meanwhile is killed
    in the middle of its work, however fast the machine: the worker is always busy with messages
    that just arrived, and the rest of the stream is still to come."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]):
        self.topic, self.pending = topic, list(messages)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4_000_000)
        self.running: threading.Event | None = None
        self.thread: threading.Thread | None = None

    def start(self, per_step: int = 20, step_seconds: float = 0.02, keep: int = 500) -> None:
        """Produce ``per_step`` messages every ``step_seconds`` until stopped, holding back the
        last ``keep`` so that something is always left for after the kills."""
        self.running = threading.Event()
        self.running.set()

        def feed(running: threading.Event = self.running) -> None:
            while running.is_set() and len(self.pending) > keep:
                self.send(min(per_step, len(self.pending) - keep))
                time.sleep(step_seconds)

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.running.clear()
            self.thread.join()
            self.thread = None

    def send(self, n: int | None = None) -> None:
        n = len(self.pending) if n is None else n
        for key, value in self.pending[:n]:
            self.producer.send(self.topic, key=key, value=value)
        self.producer.flush(60)
        del self.pending[:n]

    def close(self) -> None:
        self.stop()
        self.producer.close()


def run_to_the_end(kafka, topic, group, root, log, ends, dlq=None, trickle=None, kills=0, seed=0):
    """Run the worker until it has consumed ``ends``, then SIGTERM it; returns the final snapshot.
    With a ``trickle`` of the topic's messages not yet produced, first start the worker ``kills``
    times, feeding it slowly, and SIGKILL it at a random moment after each new snapshot."""
    rng = random.Random(seed)
    proc = None
    try:
        for _ in range(kills):
            proc = stream_fm_process(worker_args(kafka, topic, group, root, dlq), log)
            before = sum(latest_offsets(root, topic).values())
            trickle.start()
            # let it publish at least one new snapshot, then kill it at a random moment
            wait_until(
                lambda b=before: sum(latest_offsets(root, topic).values()) > b, 120, "a snapshot", proc
            )
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            trickle.stop()
        if trickle is not None:
            trickle.send()
        proc = stream_fm_process(worker_args(kafka, topic, group, root, dlq), log)
        wait_until(lambda: latest_offsets(root, topic) == ends, 300, "the whole topic to be consumed", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    return snapshot.read(root / snapshot.latest_name(root))


def dead_letters(kafka, topic: str) -> dict[int, bytes]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    out = {}
    for m in consumer:
        headers = dict(m.headers)
        out[int(headers["stream-fm-source"].decode().rsplit("/", 1)[1])] = headers["stream-fm-reason"]
    consumer.close()
    return out


def test_kill_9_at_random_points_loses_and_repeats_nothing(kafka, topic_factory, tmp_path):
    topic, dlq = topic_factory(1, "events"), topic_factory(1, "dlq")
    stream = make_stream(6000, seed=1)
    ends = {0: len(stream.messages)}
    trickle = Trickle(kafka.bootstrap, topic, stream.messages)
    try:
        killed = run_to_the_end(
            kafka, topic, "killed", tmp_path / "killed", tmp_path / "killed.log", ends, dlq, trickle, kills=3
        )
    finally:
        trickle.close()
    assert end_offsets(kafka.bootstrap, topic) == ends
    calm = run_to_the_end(kafka, topic, "calm", tmp_path / "calm", tmp_path / "calm.log", ends)

    stats = killed.extra["stats"]
    assert stats["events"] == stream.counts
    trained = len(stream.impressions)  # all but the final impression (not in the set): its window is open
    assert stats["trained"] == {"1": len(stream.positives), "0": trained - len(stream.positives)}
    assert killed.manifest["samples_seen"] == trained
    assert sum(stats["bad_events"].values()) == len(stream.bad)
    # every malformed message reached the dead-letter topic, with its reason
    assert set(dead_letters(kafka, dlq)) == set(stream.bad)

    # and the model is, bit for bit, the one an uninterrupted run learned
    assert calm.extra["stats"] == stats
    assert killed.model_arrays.keys() == calm.model_arrays.keys()
    for name, array in killed.model_arrays.items():
        assert np.array_equal(array, calm.model_arrays[name]), name


def test_the_worker_rides_out_a_broker_restart(kafka, topic_factory, tmp_path):
    topic = topic_factory(2, "events")
    first, second = make_stream(1500, seed=2), make_stream(1500, seed=3)
    produce(kafka.bootstrap, topic, first.messages)
    log = tmp_path / "worker.log"
    proc = stream_fm_process(worker_args(kafka, topic, "restart", tmp_path / "snaps"), log)
    try:
        ends = end_offsets(kafka.bootstrap, topic)
        wait_until(lambda: latest_offsets(tmp_path / "snaps", topic) == ends, 120, "the first half", proc)
        url = re.search(r"metrics on (http://[\d.:]+)/metrics", log.read_text()).group(1)
        assert readiness(url) == 200
        kafka.stop()
        # the worker polls a dead broker meanwhile: not ready, broker down, but it does not exit
        wait_until(lambda: readiness(url) == 503, 30, "/readyz to say 503", proc)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert "stream_fm_broker_up 0.0" in metrics
        assert proc.poll() is None, log.read_text()[-3000:]
        kafka.start()
        wait_until(lambda: readiness(url) == 200, 60, "/readyz to say 200 again", proc)
        produce(kafka.bootstrap, topic, second.messages)
        ends = end_offsets(kafka.bootstrap, topic)
        wait_until(lambda: latest_offsets(tmp_path / "snaps", topic) == ends, 180, "the second half", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    final = snapshot.read(tmp_path / "snaps" / snapshot.latest_name(tmp_path / "snaps"))
    events = final.extra["stats"]["events"]
    assert events == {k: first.counts[k] + second.counts[k] for k in events}


def test_sigterm_exits_0_with_a_final_snapshot_whose_offsets_are_committed(kafka, topic_factory, tmp_path):
    topic = topic_factory(3, "events")
    stream = make_stream(800, seed=4)
    produce(kafka.bootstrap, topic, stream.messages)
    ends = end_offsets(kafka.bootstrap, topic)
    root = tmp_path / "snaps"
    args = worker_args(kafka, topic, "sigterm", root)
    args[args.index("--snapshot-interval") + 1] = "3600"  # only the shutdown snapshot will have it all
    proc = stream_fm_process(args, tmp_path / "worker.log")
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        # consumed everything: the group has not committed it yet (no snapshot has covered it)
        wait_until(
            lambda: "progress: " in (tmp_path / "worker.log").read_text() and _consumed(tmp_path, stream),
            120,
            "consumption",
            proc,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        final = snapshot.read(root / snapshot.latest_name(root))
        assert {int(p): o for p, o in final.offsets[topic].items()} == ends
        committed = admin.list_group_offsets("sigterm")["sigterm"]
        assert {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic} == ends
    finally:
        admin.close()
        if proc.poll() is None:
            proc.kill()


def _consumed(tmp_path: Path, stream: Produced) -> bool:
    """The worker's progress line reports every event (it logs one every 2 s)."""
    total = stream.counts["impression"] + stream.counts["click"]
    return f"progress: {total} events" in (tmp_path / "worker.log").read_text()


def readiness(url: str) -> int:
    try:
        return urllib.request.urlopen(url + "/readyz", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def _consumer_child(pid: int) -> int:
    """The pid of the worker's Kafka consumer process (a multiprocessing spawn child)."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
            return int(child)
    raise AssertionError("no consumer child process found")


def test_a_killed_consumer_process_is_replaced_and_nothing_is_lost(kafka, topic_factory, tmp_path):
    topic = topic_factory(2, "events")
    first, second = make_stream(1000, seed=5), make_stream(1000, seed=6)
    produce(kafka.bootstrap, topic, first.messages)
    log = tmp_path / "worker.log"
    root = tmp_path / "snaps"
    proc = stream_fm_process(worker_args(kafka, topic, "child", root), log)
    try:
        ends = end_offsets(kafka.bootstrap, topic)
        wait_until(lambda: latest_offsets(root, topic) == ends, 120, "the first half", proc)
        os.kill(_consumer_child(proc.pid), signal.SIGKILL)
        produce(kafka.bootstrap, topic, second.messages)
        ends = end_offsets(kafka.bootstrap, topic)
        wait_until(lambda: latest_offsets(root, topic) == ends, 180, "the second half", proc)
        assert "the Kafka consumer process exited" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    events = snapshot.read(root / snapshot.latest_name(root)).extra["stats"]["events"]
    assert events == {k: first.counts[k] + second.counts[k] for k in events}


def test_a_second_member_in_the_group_is_reported_loudly(kafka, topic_factory, tmp_path):
    """One worker per group is the rule: an accidental second worker takes partitions away, and
    the first says so (an ERROR naming it and its partitions, a metric) until it leaves."""
    topic = topic_factory(4, "events")
    produce(kafka.bootstrap, topic, make_stream(400, seed=7).messages)

    def args(name: str) -> list[str]:
        return [
            "run", "--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--group-id", "crowded",
            "--snapshot-dir", str(tmp_path / f"snaps-{name}"), "--metrics-port", "0",
        ]  # fmt: skip

    def gauge(url: str, name: str) -> float:
        body = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        return float(re.search(rf"^{name} (\S+)$", body, re.MULTILINE).group(1))

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    first = stream_fm_process(args("a"), log_a)
    second = None
    try:
        wait_until(lambda: "metrics on http" in log_a.read_text(), 120, "the metrics server", first)
        url = re.search(r"metrics on (http://[\d.:]+)/metrics", log_a.read_text()).group(1)
        wait_until(
            lambda: gauge(url, "stream_fm_consumer_assigned_partitions") == 4, 120, "4 partitions", first
        )
        assert gauge(url, "stream_fm_consumer_group_members") == 1
        assert " ERROR " not in log_a.read_text()

        second = stream_fm_process(args("b"), log_b)
        intruder = f"stream-fm-{socket.gethostname()}-{second.pid}"
        wait_until(lambda: gauge(url, "stream_fm_consumer_group_members") == 2, 120, "2 members", first)
        pattern = re.compile(
            rf" ERROR .*has 2 members: .*client id '{re.escape(intruder)}' on [\d.]+ holds (\[.*?\])"
        )
        wait_until(lambda: pattern.search(log_a.read_text()), 60, "the ERROR line naming the intruder", first)
        taken = {p for _, p in ast.literal_eval(pattern.search(log_a.read_text()).group(1))}
        kept = gauge(url, "stream_fm_consumer_assigned_partitions")
        assert taken and kept == 4 - len(taken), log_a.read_text()[-3000:]

        second.send_signal(signal.SIGTERM)  # the intruder leaves: the worker is alone again
        assert second.wait(timeout=60) == 0, log_b.read_text()[-3000:]
        wait_until(lambda: gauge(url, "stream_fm_consumer_group_members") == 1, 120, "1 member", first)
        wait_until(lambda: "is its only member again" in log_a.read_text(), 60, "the all-clear", first)
        wait_until(lambda: gauge(url, "stream_fm_consumer_assigned_partitions") == 4, 60, "4 again", first)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def test_a_held_partition_stops_and_a_released_one_goes_on_where_it_stopped(kafka, topic_factory):
    """A cluster member holds a partition it has read far enough ahead: the fetch process stops
    fetching it (the others go on) and, released, reads it on from the last record handed over,
    nothing skipped or repeated. (kafka-python 3.0 alone would never fetch it again.) A pause and
    a resume of the whole source, after it, do the same."""
    from stream_fm.stream.sources import KafkaSource

    topic = topic_factory(partitions=3)
    produce(kafka.bootstrap, topic, make_stream(30_000, 5).messages)
    ends = end_offsets(kafka.bootstrap, topic)
    source = KafkaSource(kafka.bootstrap, [topic], f"g-{topic}", max_records=200, cluster=True)
    got: dict[int, list[int]] = {p: [] for p in ends}

    def take(until, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, {p: len(o) for p, o in got.items()}
            for batch in source.poll(0.2, 200):
                got[batch.partition] += batch.offsets

    def drain(seconds: float) -> None:  # whatever comes within ``seconds``
        quiet = time.monotonic() + seconds
        take(lambda: time.monotonic() >= quiet)

    source.start({})
    try:
        take(lambda: got[0])
        source.hold(topic, 0)
        take(lambda: all(len(got[p]) == ends[p] for p in (1, 2)))
        held = len(got[0])
        drain(2.0)
        assert len(got[0]) == held < ends[0] // 2  # (what was in flight at the hold came, no more)
        source.release(topic, 0)
        take(lambda: len(got[0]) >= ends[0] // 2)
        source.pause()
        drain(2.0)
        assert len(got[0]) < ends[0]
        source.resume()
        take(lambda: len(got[0]) >= ends[0])
        assert got == {p: list(range(end)) for p, end in ends.items()}
    finally:
        source.close()
