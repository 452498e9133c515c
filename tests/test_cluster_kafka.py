"""Cluster mode against the real broker, with real `stream-fm run` processes: several members
learn one model, and the model is the same whatever their number (issue 13)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import stream_fm_process
from test_worker_kafka import LATENESS, WINDOW, end_offsets, make_stream, produce, wait_until

from stream_fm import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6


def produce_stream(kafka, topic: str, n: int, seed: int) -> dict[int, int]:
    """``n`` impressions with their clicks (keyed by impression id, so each impression and its
    clicks share a partition), then one impression far in the future on every partition, which
    closes every window there; returns the end offset of each partition."""
    from kafka import KafkaProducer

    stream = make_stream(n, seed)
    produce(kafka.bootstrap, topic, stream.messages)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    for p in range(PARTITIONS):
        event = b'{"type":"impression","id":"end-%d","ts":1e9,"features":{"ad":"a0"}}' % p
        producer.send(topic, value=event, partition=p)
    producer.flush(60)
    producer.close()
    return end_offsets(kafka.bootstrap, topic)


def member_args(kafka, topic: str, sync: str, group: str, root: Path, name: str) -> list[str]:
    return [
        "run", "--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--group-id", group,
        "--sync-topic", sync, "--round-records", "400", "--round-timeout", "1",
        "--snapshot-dir", str(root), "--snapshot-interval", "0.5", "--batch-size", "500",
        "--group-instance-id", f"{group}-{name}", "--metrics-port", "0",
        "--attribution-window", str(WINDOW), "--allowed-lateness", str(LATENESS), "--progress-interval", "2",
    ]  # fmt: skip


def folded_to(root: Path, topic: str) -> dict[int, int]:
    """Each partition's next round start in the member's newest snapshot."""
    name = snapshot.latest_name(root)
    if name is None:
        return {}
    try:
        offsets = snapshot.read(root / name).offsets
    except Exception:  # retention may delete it between the two reads: ask again
        return {}
    return {int(p): o for p, o in offsets.get(topic, {}).items()}


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


def run_cluster(kafka, topic: str, sync: str, ends: dict[int, int], roots: list[Path], log: Path) -> None:
    """``len(roots)`` members (one snapshot directory each) until each has folded the topic."""
    group = sync
    procs: list[subprocess.Popen] = []
    try:
        for i, root in enumerate(roots):
            procs.append(stream_fm_process(member_args(kafka, topic, sync, group, root, f"m{i}"), log))
        for root, proc in zip(roots, procs, strict=True):
            done = lambda r=root: folded_to(r, topic) == ends  # noqa: E731
            wait_until(done, 300, f"{root.name} to fold the topic", proc)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_one_two_and_three_members_learn_the_same_model_bit_for_bit(kafka, topic_factory, tmp_path):
    topic = topic_factory(PARTITIONS, "events")
    ends = produce_stream(kafka, topic, 30_000, seed=11)
    runs = {}
    for members in (1, 2, 3):
        sync = topic_factory(1, f"sync{members}")
        roots = [tmp_path / f"n{members}-m{i}" for i in range(members)]
        run_cluster(kafka, topic, sync, ends, roots, tmp_path / f"n{members}.log")
        runs[members] = [by_key(root) for root in roots]
    (reference_rows, reference_dense), *_ = runs[1]
    assert len(reference_rows) > 300 and reference_dense["samples_seen"] > 25_000
    for members, models in runs.items():
        for i, (rows, dense) in enumerate(models):
            assert dense == reference_dense, f"{members} members, member {i}: dense state or counters differ"
            differ = [k for k in reference_rows if rows.get(k) != reference_rows[k]]
            assert rows.keys() == reference_rows.keys() and not differ, (
                f"{members} members, member {i}: {len(differ)} keys differ, e.g. {differ[:5]}"
            )
