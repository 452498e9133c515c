"""The worker end to end from a local Kafka topic, side by side with a bare consumer loop.

Both read the same topic of >= 10^6 demo events (impressions and their clicks) from the local
broker (deploy/kafka/kafka-local.sh, started if needed):

- bare: kafka-python polling and orjson-decoding every message, nothing else;
- worker: the whole pipeline (decode, validate, join, learn_batch, snapshots every 60 s) with
  the Prometheus exporter off, and on (its HTTP endpoint scraped every second meanwhile).

    python benchmarks/bench_e2e.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table

from stream_fm.ops.progress import Bar
from stream_fm.stream.demo import DemoStream
from stream_fm.stream.sources import KafkaSource
from stream_fm.stream.worker import Worker, WorkerConfig

REPO = Path(__file__).resolve().parents[1]


def broker() -> str:
    # the script's stdout is the bootstrap address alone; its messages go to our stderr
    out = subprocess.run(
        [str(REPO / "deploy/kafka/kafka-local.sh"), "start"], check=True, stdout=subprocess.PIPE, text=True
    )
    return out.stdout.strip()


def ensure_topic(bootstrap: str, n: int, partitions: int, rate: float = 50.0) -> str:
    """A topic holding the first ``n`` demo events, ``rate`` impressions a second of event time
    (made once, reused by later runs)."""
    topic = f"bench-e2e-{n}-p{partitions}" + (f"-r{rate:g}" if rate != 50.0 else "")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    if topic in admin.list_topics() and sum(end_offsets(bootstrap, topic).values()) == n:
        admin.close()
        return topic
    if topic in admin.list_topics():
        admin.delete_topics([topic])
        time.sleep(2)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=512 * 1024, acks=1)
    t = time.perf_counter()
    bar = Bar(n, "producing")
    for i, (key, event) in enumerate(DemoStream(seed=0, impressions_per_second=rate)):
        if i >= n:
            break
        producer.send(topic, key=key.encode(), value=orjson.dumps(event))
        bar.update(i + 1, "events")
    bar.close()
    producer.flush()
    producer.close()
    print(f"produced {n:,} events into {topic} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return topic


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    ends = consumer.end_offsets(parts) if parts else {}
    consumer.close()
    return {tp.partition: off for tp, off in ends.items()}


def bare(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bare-{time.time()}", auto_offset_reset="earliest",
        enable_auto_commit=False,
    )  # fmt: skip
    seen = 0
    t = None
    while seen < n:
        for messages in consumer.poll(timeout_ms=500, max_records=5000).values():
            t = t or time.perf_counter()
            for m in messages:
                orjson.loads(m.value)
            seen += len(messages)
    rate = seen / (time.perf_counter() - t)
    consumer.close()
    return rate


def worker(bootstrap: str, topic: str, n: int, metrics: bool) -> tuple[float, Worker]:
    root = Path(tempfile.mkdtemp(prefix="stream-fm-e2e-"))
    source = KafkaSource(bootstrap, [topic], f"worker-{time.time()}")
    config = WorkerConfig(snapshot_dir=root, snapshot_every_seconds=60.0, progress_interval=3600.0)
    w = Worker(source, config)
    stop = threading.Event()
    state = {"t0": None}
    exporter = None
    if metrics:
        from stream_fm.ops.metrics import MetricsServer

        exporter = MetricsServer(w, host="127.0.0.1", port=0).start()
        scrape = threading.Thread(target=_scrape, args=(exporter.url, stop), daemon=True)
        scrape.start()

    def watch() -> None:  # stop once every event is in
        while not stop.is_set():
            consumed = sum(w.positions.values())
            if consumed and state["t0"] is None:
                state["t0"] = time.perf_counter()
            if consumed >= n:
                state["t1"] = time.perf_counter()
                stop.set()
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    w.run(stop)
    if exporter is not None:
        exporter.stop()
    return n / (state["t1"] - state["t0"]), w


def _scrape(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        urllib.request.urlopen(f"{url}/metrics", timeout=5).read()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    bootstrap = broker()
    topic = ensure_topic(bootstrap, args.events, args.partitions)
    r_bare = bare(bootstrap, topic, args.events)
    r_off, w = worker(bootstrap, topic, args.events, metrics=False)
    r_on, _ = worker(bootstrap, topic, args.events, metrics=True)
    events = w.stats.events
    print(
        f"\n{args.events:,} events ({events['impression']:,} impressions, {events['click']:,} clicks) "
        f"on {args.partitions} partitions; worker trained {w.model.samples_seen:,} samples"
    )
    print_table(
        ["consumer", "events/s", "vs bare loop"],
        [
            ("bare kafka-python poll + orjson decode", f"{r_bare:,.0f}", "100%"),
            ("stream-fm worker, metrics exporter off", f"{r_off:,.0f}", f"{r_off / r_bare:.0%}"),
            ("stream-fm worker, metrics exporter on (scraped 1/s)", f"{r_on:,.0f}", f"{r_on / r_bare:.0%}"),
        ],
    )


if __name__ == "__main__":
    main()
