"""Cluster mode against the real broker, with real `stream-fm run` processes: several members
learn one model, and the model is the same whatever their number (issue 13)."""

from __future__ import annotations

import json
import random
import re
import signal
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import stream_fm_process
from test_worker_kafka import (
    LATENESS,
    WINDOW,
    Trickle,
    end_offsets,
    latest_offsets,
    make_stream,
    produce,
    wait_until,
)

from stream_fm.snapshots import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6


def stream_messages(n: int, seed: int) -> tuple[list[tuple[bytes | None, bytes]], int]:
    """``n`` impressions with their clicks (keyed by impression id, so each impression and its
    clicks share a partition), and the number of distinct impressions, each to be trained once."""
    stream = make_stream(n, seed)
    return stream.messages, len(stream.impressions)


def close_windows(kafka, topic: str) -> dict[int, int]:
    """One impression far in the future on every partition (it closes every window there);
    returns the end offset of each partition."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    for p in range(PARTITIONS):
        event = b'{"type":"impression","id":"end-%d","ts":1e9,"features":{"ad":"a0"}}' % p
        producer.send(topic, value=event, partition=p)
    producer.flush(60)
    producer.close()
    return end_offsets(kafka.bootstrap, topic)


def new_topic(kafka, prefix: str, partitions: int = PARTITIONS) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    name = f"{prefix}-{random.randrange(1 << 30):08x}"
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()
    time.sleep(1)
    return name


def member_args(
    kafka, topic: str, sync: str, root: Path, round_timeout: float = 1.0, round_records: int | None = 400
) -> list[str]:
    rounds = ["--round-records", str(round_records)] if round_records else []  # (none: the cluster's)
    return [
        "run", "--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--group-id", sync,
        "--sync-topic", sync, *rounds, "--round-timeout", str(round_timeout),
        "--snapshot-dir", str(root), "--snapshot-interval", "0.5", "--batch-size", "500",
        "--session-timeout", "6", "--metrics-port", "0",
        "--attribution-window", str(WINDOW), "--allowed-lateness", str(LATENESS), "--progress-interval", "2",
    ]  # fmt: skip


def by_key(root: Path) -> tuple[dict[str, bytes], dict[str, object]]:
    """Every trained key's numbers (bytes of w, V, gw, gV and last), and the dense state."""
    model, snap = snapshot.restore(root / snapshot.latest_name(root))
    out = {}
    arrays = (model._w, model._V, model._gw, model._gV, model._last)
    for key, row in model._index.as_dict().items():
        if model._last[row] >= 0:
            out[key] = b"".join(np.ascontiguousarray(a[row]).tobytes() for a in arrays)
    dense = {"bias": model._bias.tobytes(), "samples_seen": model.samples_seen, "stats": snap.extra["stats"]}
    return out, dense


def start(
    kafka,
    topic: str,
    sync: str,
    root: Path,
    log: Path,
    round_timeout: float = 1.0,
    round_records: int | None = 400,
) -> subprocess.Popen:
    return stream_fm_process(member_args(kafka, topic, sync, root, round_timeout, round_records), log)


def publishers(kafka, sync: str) -> set[str]:
    """The members (process ids) whose deltas the sync topic holds."""
    from kafka import KafkaConsumer

    from stream_fm.cluster.delta import Assembler

    reader = KafkaConsumer(
        sync, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
    )
    assembler, out = Assembler(), set()
    for m in reader:
        if m.value[:4] == b"SFMC" and (delta := assembler.add(m.value)) is not None:
            out.add(delta.meta["by"])
    reader.close()
    return out


def wait_folded(root: Path, topic: str, ends: dict[int, int], proc: subprocess.Popen) -> None:
    done = lambda: latest_offsets(root, topic) == ends  # noqa: E731
    wait_until(done, 300, f"{root.name} to fold the whole topic", proc)


def wait_progress(root: Path, topic: str, at_least: int, proc: subprocess.Popen) -> None:
    """Until the member's newest snapshot has folded ``at_least`` records of the topic."""
    done = lambda: sum(latest_offsets(root, topic).values()) >= at_least  # noqa: E731
    wait_until(done, 300, f"{root.name} to fold {at_least} records", proc)


def stop(procs: list[subprocess.Popen], log: Path) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]


def run_cluster(kafka, topic: str, sync: str, ends: dict[int, int], roots: list[Path], log: Path) -> None:
    """``len(roots)`` members (one snapshot directory each) until each has folded the topic."""
    procs: list[subprocess.Popen] = []
    try:
        procs += [start(kafka, topic, sync, root, log) for root in roots]
        for root, proc in zip(roots, procs, strict=True):
            wait_folded(root, topic, ends, proc)
        check_metrics(log, len(roots))
        stop(procs, log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def check_metrics(log: Path, members: int) -> None:
    """Every member reports the same folded round and the rounds it published, and they add up."""
    urls = re.findall(r"metrics on (http://[\d.:]+)/metrics", log.read_text())[-members:]
    merged, published = set(), 0.0
    for url in urls:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        value = lambda name, text=text: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        merged.add(value("stream_fm_cluster_merged_round"))
        mine = value("stream_fm_cluster_rounds_published_total")
        published += mine
        # a member that joins after the others have learned the whole stream publishes nothing:
        # what it counts must agree with what it published
        assert (value("stream_fm_cluster_delta_bytes_total") > 0) == (mine > 0)
    (rounds,) = merged
    assert published >= rounds * PARTITIONS  # each round's every partition, once at least


def assert_same(got: tuple[dict, dict], reference: tuple[dict, dict], what: str) -> None:
    rows, dense = got
    reference_rows, reference_dense = reference
    assert dense == reference_dense, f"{what}: dense state or counters differ"
    differ = [k for k in reference_rows if rows.get(k) != reference_rows[k]]
    assert rows.keys() == reference_rows.keys(), f"{what}: other keys"
    assert not differ, f"{what}: {len(differ)} keys differ: {differ[:5]}"


@pytest.fixture(scope="module")
def stream(kafka):
    """One stream of 30,000 impressions on six partitions, all of it in the topic."""
    topic = new_topic(kafka, "cluster-events")
    messages, impressions = stream_messages(30_000, seed=11)
    produce(kafka.bootstrap, topic, messages)
    return topic, close_windows(kafka, topic), impressions


def single_member(kafka, topic: str, ends: dict[int, int], impressions: int, root: Path) -> tuple[dict, dict]:
    """The model one member learns from the whole topic (each impression trained once)."""
    root.mkdir(parents=True, exist_ok=True)
    run_cluster(kafka, topic, new_topic(kafka, "sync-ref", 1), ends, [root / "m0"], root / "m.log")
    model = by_key(root / "m0")
    trained = model[1]["stats"]["trained"]
    assert trained["0"] + trained["1"] == impressions == model[1]["samples_seen"]
    assert len(model[0]) > 300
    return model


@pytest.fixture(scope="module")
def reference(kafka, stream, tmp_path_factory):
    topic, ends, impressions = stream
    return single_member(kafka, topic, ends, impressions, tmp_path_factory.mktemp("reference"))


def _skip(index: int, reason: str, detail: str) -> None:
    """A bad record (the stream has some): dead-lettered by the members, never trained."""


def round_order_model(kafka, topic: str, round_records: int) -> tuple[dict, dict]:
    """The single learner (the members' default settings) on the topic's samples in round order:
    each partition's records joined by a join of its own and cut into rounds of
    ``round_records``; round r of partition 0, of partition 1, ..., then round r + 1. Rounds a
    partition has no records for are empty (the members close them once the partition stalls)."""
    from collections import Counter

    from kafka import KafkaConsumer, TopicPartition

    from stream_fm import SparseFM
    from stream_fm.ops import config
    from stream_fm.stream.join import Joiner
    from stream_fm.stream.samples import join_values

    reader = KafkaConsumer(bootstrap_servers=kafka.bootstrap, consumer_timeout_ms=3000)
    reader.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    reader.seek_to_beginning()
    values: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    for m in reader:
        values[m.partition].append(m.value)
    reader.close()
    rounds: dict[int, list[tuple[list, list]]] = {}
    for records in values.values():  # (in partition order)
        joiner = Joiner(WINDOW, LATENESS, 1_000_000)
        for r, start in enumerate(range(0, len(records), round_records)):
            xs: list = []
            ys: list = []
            join_values(records[start : start + round_records], joiner, 1 << 20, _skip, xs, ys, Counter())
            rounds.setdefault(r, []).append((xs, ys))
    model = SparseFM(**config.load(environ={}).model_kwargs())
    for r in sorted(rounds):
        model.learn_batch([x for xs, _ in rounds[r] for x in xs], [y for _, ys in rounds[r] for y in ys])
    arrays = (model._w, model._V, model._gw, model._gV, model._last)
    rows = {
        key: b"".join(np.ascontiguousarray(a[row]).tobytes() for a in arrays)
        for key, row in model._index.as_dict().items()
        if model._last[row] >= 0
    }
    return rows, {"bias": model._bias.tobytes(), "samples_seen": model.samples_seen}


def test_a_cluster_learns_what_the_single_learner_learns_from_the_stream_in_round_order(
    kafka, stream, reference
):
    """No merge stands between the cluster and the single learner: the members' model is, bit for
    bit, SparseFM.learn_batch on every partition's samples in round order (computed here from the
    topic's records, without stream-fm's cluster code)."""
    topic, _, _ = stream
    rows, dense = round_order_model(kafka, topic, 400)
    assert dense["samples_seen"] == reference[1]["samples_seen"]
    assert dense["bias"] == reference[1]["bias"]
    assert rows.keys() == reference[0].keys()
    differ = [k for k in rows if rows[k] != reference[0][k]]
    assert not differ, f"{len(differ)} keys differ: {differ[:5]}"


@pytest.mark.parametrize("members", [2, 3])
def test_two_and_three_members_learn_the_single_members_model_bit_for_bit(
    kafka, stream, reference, topic_factory, tmp_path, members
):
    topic, ends, _ = stream
    sync = topic_factory(1, "sync")
    roots = [tmp_path / f"m{i}" for i in range(members)]
    run_cluster(kafka, topic, sync, ends, roots, tmp_path / "members.log")
    for i, root in enumerate(roots):
        assert_same(by_key(root), reference, f"{members} members, member {i}")


def test_kill_9_of_a_member_mid_stream_and_its_restart_change_nothing(
    kafka, stream, reference, topic_factory, tmp_path
):
    topic, ends, _ = stream
    total = sum(ends.values())
    sync, log = topic_factory(1, "sync"), tmp_path / "members.log"
    roots = [tmp_path / "m0", tmp_path / "m1"]
    procs = [start(kafka, topic, sync, root, log) for root in roots]
    try:
        wait_progress(roots[1], topic, total // 5, procs[1])
        time.sleep(random.uniform(0.0, 0.5))
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        killed_at = sum(latest_offsets(roots[0], topic).values())
        # the survivor takes the dead member's partitions (after the session timeout) and goes on
        wait_progress(roots[0], topic, min(total, killed_at + 1), procs[0])
        procs[1] = start(kafka, topic, sync, roots[1], log)  # from its own snapshot
        for root, proc in zip(roots, procs, strict=True):
            wait_folded(root, topic, ends, proc)
        stop(procs, log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert "rebuilding" in log.read_text() or "join re-read from" in log.read_text()
    for i, root in enumerate(roots):
        assert_same(by_key(root), reference, f"member {i}")


def test_a_member_joins_mid_stream_and_another_leaves_with_sigterm(kafka, topic_factory, tmp_path):
    # the stream arrives while they learn (a trickle, steady enough that no round closes early:
    # round_timeout 5 s), so that the second member joins a cluster with work left
    topic = new_topic(kafka, "trickled-events")
    messages, impressions = stream_messages(30_000, seed=12)
    trickle = Trickle(kafka.bootstrap, topic, messages)
    sync, log = topic_factory(1, "sync"), tmp_path / "members.log"
    first, second = tmp_path / "m0", tmp_path / "m1"
    procs = [start(kafka, topic, sync, first, log, round_timeout=5.0)]
    try:
        trickle.start(per_step=60, step_seconds=0.02, keep=0)
        wait_progress(first, topic, 2000, procs[0])
        # joins, its round length unset: the cluster's (400) is taken
        procs.append(start(kafka, topic, sync, second, log, round_timeout=5.0, round_records=None))
        wait_progress(second, topic, 15_000, procs[1])
        stop(procs[:1], log)  # leaves: the second takes everything
        trickle.stop()
        trickle.send()
        ends = close_windows(kafka, topic)
        wait_folded(second, topic, ends, procs[1])
        stop(procs[1:], log)
    finally:
        trickle.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert len(publishers(kafka, sync)) == 2, "both members published rounds"
    alone = single_member(kafka, topic, ends, impressions, tmp_path / "alone")
    assert_same(by_key(second), alone, "the member that stayed")


def test_a_corrupt_sync_message_stops_the_member_with_a_clear_error(kafka, stream, topic_factory, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer

    topic = stream[0]
    sync, log, root = topic_factory(1, "sync"), tmp_path / "member.log", tmp_path / "m0"
    proc = start(kafka, topic, sync, root, log)
    try:
        wait_progress(root, topic, 1, proc)
        reader = KafkaConsumer(sync, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
        chunk = next(m.value for m in reader if m.value[:4] == b"SFMC")  # a real chunk of a delta
        reader.close()
        (length,) = struct.unpack_from("<I", chunk, 4)
        header = json.loads(chunk[8 : 8 + length])
        header["round"] += 9999  # a round still to come: the member takes it in
        body, piece = json.dumps(header).encode(), bytearray(chunk[8 + length :])
        piece[len(piece) // 2] ^= 1  # one bit flipped
        damaged = chunk[:4] + struct.pack("<I", len(body)) + body + bytes(piece)
        writer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
        writer.send(sync, damaged).get(30)
        writer.close()
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "do not match its sha256 (corrupt or truncated)" in text, text[-3000:]
    snapshot.read(root / snapshot.latest_name(root))  # the last snapshot is whole and verifies


def model_by_key(model) -> tuple[dict[str, bytes], bytes]:
    """Every trained key's numbers, and the dense state, of a model in memory (as ``by_key``)."""
    arrays = (model._w, model._V, model._gw, model._gV, model._last)
    rows = {
        key: b"".join(np.ascontiguousarray(a[row]).tobytes() for a in arrays)
        for key, row in model._index.as_dict().items()
        if model._last[row] >= 0
    }
    return rows, model._bias.tobytes()


def test_serving_follows_the_sync_topic_between_snapshots(kafka, stream, topic_factory, tmp_path):
    """A follower (`stream-fm serve --sync-topic`) serves the rounds a member folds before any
    snapshot holds them, and once it has folded what the member's final snapshot holds, it serves
    that very model, bit for bit."""
    import http.client
    import socket
    import sys

    from stream_fm.cluster.follower import Follower
    from stream_fm.cluster.sync import SyncLog

    topic, ends, _ = stream
    sync, log, root = topic_factory(1, "sync"), tmp_path / "member.log", tmp_path / "m0"
    args = member_args(kafka, topic, sync, root)
    args[args.index("--snapshot-interval") + 1] = "3600"  # no snapshot until it stops
    proc = stream_fm_process(args, log)
    try:
        with Follower(root, SyncLog(kafka.bootstrap, sync), interval=0.1) as follower:  # from genesis
            ledger = follower.ledger
            assert ledger is not None and follower.predictor is not None
            served = lambda: follower.predictor.name != "genesis+0"  # noqa: E731
            wait_until(served, 120, "the follower to serve a folded round", proc)
            assert snapshot.latest_name(root) is None  # fresher than any snapshot
            folded = lambda: {ledger.partitions[i][1]: b.start for i, b in ledger.folded.items()} == ends  # noqa: E731
            wait_until(folded, 300, "the follower to fold the whole topic", proc)
            stop([proc], log)  # its final snapshot holds every round
            model, snap = snapshot.restore(root / snapshot.latest_name(root))
            assert snap.extra["cluster"]["merged"] == ledger.merged
            assert model_by_key(follower.model) == model_by_key(model)
            wait_until(
                lambda: follower.predictor.name == f"genesis+{ledger.merged}", 10, "the last predictor"
            )
            probe = [{"user": f"u{i}", "ad": f"a{i % 40}"} for i in range(200)]
            assert np.array_equal(follower.predictor.predict_batch(probe), model.predict_proba_batch(probe))
    finally:
        if proc.poll() is None:
            proc.kill()
    # the command: from the member's last snapshot, following the topic (nothing left to fold)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(
        [sys.executable, "-m", "stream_fm", "serve", "--snapshots", str(root), "--port", str(port),
         "--sync-topic", sync, "--bootstrap-servers", kafka.bootstrap],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/predict", body=json.dumps({"features": probe[0]}).encode())
                body = json.loads(conn.getresponse().read())
                break
            except OSError:
                assert time.monotonic() < deadline and serve.poll() is None, "serve did not come up"
                time.sleep(0.2)
        assert body == {"probability": model.predict_proba_one(probe[0])[True], "snapshot": f"{snap.name}+0"}
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, serve.stderr.read()
