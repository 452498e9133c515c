"""Cluster mode against the single worker: quality, cost, bandwidth, and scale on paper.

- **Quality**: progressive log loss of a cluster of 6 partitions against the single learner on
  the same stream, for several ``round_records``, on three kinds of stream (sparse ids, a dense
  table with numeric fields, rare positives) and two whose order matters (drifting ids, MovieLens
  ratings in time order), with curves. In process, on the package's own rounds
  (``cluster`` below: ``pack_round`` as an owner publishes, ``fold_round`` as every member folds):
  the cluster's model does not depend on how many members learn it (tests/test_cluster_kafka.py),
  so one process computes exactly what any number of members would.
- **Cost**: real ``stream-fm run`` processes on the local broker (deploy/kafka/kafka-local.sh,
  started if needed) and a 6-partition topic of demo events (``--event-rate``: impressions a
  second of event time), snapshots every 60 s (the default): CPU-seconds per event of a single
  worker and of clusters of 1, 2 and 3 members, and of 3 members at other round lengths
  (``--cost-rounds``; their Kafka fetch processes included; the broker's own CPU beside it), over
  the whole run (start-up and rebalances included) and in the steady state (from the first second
  every process has had partitions assigned to the last before the end, against the events
  learned meanwhile; on a short stream it flatters long rounds, whose read-ahead at the window's
  start was paid for before it: ``--events 3600000``), delta bytes per event, fold and wait time
  per round, and the recovery after ``kill -9`` of one of two members.
- **Bandwidth**: the sync topic's bytes per event as published (lz4), with zlib, uncompressed, and
  with float32 values.
- **Scale, on paper**: events/s of N = 1..32 members from the measured per-event costs.

    python benchmarks/bench_cluster.py [--events 3600000] [--rounds 500 2000 4000 8000 16000] [--repeat 3]
        [--event-rate 50] [--cost-rounds 4000] [--skip-quality] [--skip-cost]
"""

from __future__ import annotations

import argparse
import http.client
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import lz4.frame
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import suite
from bench_e2e import broker, end_offsets, ensure_topic
from bench_quality import log_loss
from common import machine, print_table

from stream_fm import SparseFM
from stream_fm.cluster.delta import Assembler, encode
from stream_fm.cluster.member import ROUND_RECORDS
from stream_fm.cluster.rounds import fold_round, pack_round
from stream_fm.snapshots import snapshot

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PARTITIONS = 6
DEFAULT_ROUND = ROUND_RECORDS  # a new cluster's
STREAMS = {  # the three kinds the issue names, from the quality suite (benchmarks/suite.py), and two
    # whose order carries information (drifting ids; ratings in time order), which longer rounds shuffle more
    "sparse ids (planted FM, 200k)": "planted FM, enough (200k)",
    "dense table (census-like, 48.8k)": "census-like table (48.8k)",
    "rare positives (100k, CTR 0.5%)": "rare positives (100k, CTR 0.5%)",
    "new ids and drift (150k)": "new ids and drift (150k)",
    "MovieLens 100K (time order)": "MovieLens 100K",
}


# ---------------------------------------------------------------------------------- quality


def cluster(stream: list, partitions: int, round_records: int) -> np.ndarray:
    """Progressive predictions of a cluster, in stream order: samples go round-robin to the
    partitions (as producers keyed by impression id spread them); round r of a partition is its
    next ``round_records`` samples, packed as its owner publishes them, and every round is folded
    as every member folds it (each sample predicted, then learned)."""
    parts = [np.arange(p, len(stream), partitions) for p in range(partitions)]
    out = np.empty(len(stream))
    model = SparseFM()
    for r, start in enumerate(range(0, max(map(len, parts)), round_records)):
        idx = [part[start : start + round_records] for part in parts]
        samples = [([stream[i][0] for i in ix], [stream[i][1] for i in ix]) for ix in idx]
        deltas = [pack_round(xs, ys, p, r) for p, (xs, ys) in enumerate(samples)]
        out[np.concatenate(idx)] = fold_round(model, deltas)
    return out


def quality(rounds: list[int]) -> dict:
    rows, curves = [], {}
    for title, name in STREAMS.items():
        stream = suite.SUITE[name][1]()
        y = np.array([label for _, label in stream], np.float64)
        single = SparseFM().learn_batch([x for x, _ in stream], list(y))
        base = log_loss(single, y)
        cells = []
        for r in rounds:
            p = cluster(stream, PARTITIONS, r)
            ll = log_loss(p, y)
            cells.append(f"{ll:.4f} ({100 * (ll / base - 1):+.2f}%)")
            print(f"  {title}, {r} records a round: {cells[-1]}", file=sys.stderr, flush=True)
            if r == DEFAULT_ROUND:
                curves[title] = (rolling(single, y), rolling(p, y))
        rows.append((title, f"{base:.4f}", *cells))
    print_table(["stream", "single learner", *(f"{r} records a round" for r in rounds)], rows)
    plot(curves)
    return {"rounds": rounds, "rows": rows}


def rolling(p: np.ndarray, y: np.ndarray, points: int = 100) -> np.ndarray:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return np.array([chunk.mean() for chunk in np.array_split(losses, points)])


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6))
    for ax, (title, (single, members)) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        x = np.linspace(0, 100, len(single))
        ax.plot(x, single, label="single learner")
        ax.plot(x, members, label=f"cluster, 6 partitions, {DEFAULT_ROUND} a round")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("% of the stream")
        ax.set_ylabel("log loss (1% windows)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "cluster_curves.png", dpi=110)
    print(f"curves: {RESULTS / 'cluster_curves.png'}")


# ---------------------------------------------------------------------------------- cost


def worker_args(
    bootstrap: str,
    topic: str,
    root: Path,
    sync: str | None,
    group: str,
    snapshot_interval: float = 60.0,
    round_records: int | None = None,
) -> list[str]:
    args = [
        sys.executable, "-m", "stream_fm", "run", "--bootstrap-servers", bootstrap, "--topic", topic,
        "--group-id", group, "--snapshot-dir", str(root), "--snapshot-interval", str(snapshot_interval),
        "--metrics-port", "0", "--attribution-window", "120", "--progress-interval", "5",
        "--session-timeout", "6",
    ]  # fmt: skip
    if round_records is not None:
        args += ["--round-records", str(round_records)]
    return args + (["--sync-topic", sync, "--round-timeout", "1"] if sync else [])


def folded(root: Path, topic: str) -> dict[int, int]:
    name = snapshot.latest_name(root)
    try:
        offsets = snapshot.read(root / name).offsets if name else {}
    except Exception:
        return {}
    return {int(p): o for p, o in offsets.get(topic, {}).items()}


def tree_cpu(pid: int) -> float:
    """CPU-seconds a process and its descendants alive now have used (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100.0
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return total


def broker_cpu() -> float:
    """CPU-seconds the local broker has used (its pid file: deploy/kafka/kafka-local.sh)."""
    pid = (Path.home() / ".cache/stream-fm/kafka/run-9092/broker.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def urls(log: Path) -> list[str]:
    """The metrics URLs the members in ``log`` announced, in order of start."""
    return re.findall(r"metrics on (http://[\d.:]+)/metrics", log.read_text())


def positions(url: str, topic: str) -> dict[int, int]:
    """The positions a worker's metrics report for ``topic`` (a member's: folded rounds')."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out = {}
    for labels, value in re.findall(r"^stream_fm_consumer_offset{(.*)} (\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if label["topic"] == topic:
            out[int(label["partition"])] = int(float(value))
    return out


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(stream_fm_cluster_\w+) (\S+)$", text, re.M)}


def run(
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    members: int | None,
    tmp: Path,
    round_records: int | None = None,
) -> dict:
    """One run to the end of the topic: a single worker (``members`` None) or a cluster (of
    rounds of ``round_records``; None: a new cluster's default)."""
    tag = f"single-{time.time_ns()}" if members is None else f"sync-{members}-{time.time_ns()}"
    roots = [tmp / f"{tag}-{i}" for i in range(members or 1)]
    log = tmp / f"{tag}.log"
    with open(log, "ab") as out:
        procs = [
            subprocess.Popen(
                worker_args(bootstrap, topic, r, tag if members else None, tag, round_records=round_records),
                stdout=out,
                stderr=out,
            )
            for r in roots
        ]
    # measured from the first event learned to the last (process start and numba's cache load,
    # about 2 CPU-seconds a process, are left out: they do not grow with the stream)
    deadline = time.monotonic() + 1800
    while "partitions assigned: [(" not in log.read_text():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), log.read_text()[-3000:]
        time.sleep(0.01)
    t, before, broker_before = time.perf_counter(), sum(tree_cpu(p.pid) for p in procs), broker_cpu()
    # done when every process's metrics report the topic's end as its position (folded, for a
    # member): snapshots keep their default interval (60 s), as a deployment would. Asked once a
    # second (a scrape computes the rolling AUC: asking often costs the workers CPU), so the run
    # is measured up to a second past its end (idle then: a few ms of CPU). Each answer is also
    # a point of the steady state: (CPU so far, events learned so far) once every process has
    # had partitions assigned, up to the last answer before the end
    total, points = sum(ends.values()), []
    while True:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), log.read_text()[-3000:]
        announced = urls(log)
        if len(announced) == len(procs):
            cpu_now = sum(tree_cpu(p.pid) for p in procs)
            try:
                done = min(sum(positions(u, topic).values()) for u in announced)
            except (OSError, http.client.HTTPException) as e:  # (asked again a second later)
                said = [ln for ln in log.read_text().splitlines() if "Error" in ln or "Exception" in ln]
                print(f"a scrape failed ({e!r}); the workers' log says: {said[-5:]}", file=sys.stderr)
                time.sleep(1.0)
                continue
            if done >= total:
                break
            if log.read_text().count("partitions assigned: [(") >= len(procs) and done > 0:
                points.append((cpu_now, done))
        time.sleep(1.0)
    wall = time.perf_counter() - t
    cpu = sum(tree_cpu(p.pid) for p in procs) - before
    counters = [scrape(url) for url in urls(log)] if members else []
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(120) == 0, log.read_text()[-3000:]
    steady = None
    if len(points) >= 3:  # (from the first point to the last: at least 2 seconds)
        (cpu0, done0), (cpu1, done1) = points[0], points[-1]
        steady = (cpu1 - cpu0) / (done1 - done0) if done1 > done0 else None
    return {
        "tag": tag,
        "wall": wall,
        "cpu": cpu,
        "steady": steady,  # CPU-seconds an event in the steady state (None: too short a run)
        "broker_cpu": broker_cpu() - broker_before,
        "counters": counters,
        # what the joins made of the stream (each partition's own, in either mode)
        "trained": snapshot.read(roots[0] / snapshot.latest_name(roots[0])).extra["stats"]["trained"],
    }


def sync_bytes(bootstrap: str, sync: str) -> dict[str, float]:
    """The sync topic's rounds as published, and encoded more compactly."""
    from kafka import KafkaConsumer

    reader = KafkaConsumer(
        sync, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    assembler = Assembler()
    sizes = {"published (lz4)": 0, "zlib, level 1": 0, "uncompressed": 0, "float32 values, lz4": 0, "keys": 0}
    for m in reader:
        if m.value[:4] != b"SFMC":
            continue
        sizes["published (lz4)"] += len(m.value)
        delta = assembler.add(m.value)
        if delta is None:
            continue
        raw = b"".join(a.tobytes() for a in delta.arrays.values())
        sizes["zlib, level 1"] += len(zlib.compress(raw, 1))
        sizes["uncompressed"] += len(raw)
        small = b"".join(
            (a.astype(np.float32) if a.dtype == np.float64 else a).tobytes() for a in delta.arrays.values()
        )
        sizes["float32 values, lz4"] += len(lz4.frame.compress(small))
        sizes["keys"] += delta.meta["keys"]
    reader.close()
    return sizes


def recovery(bootstrap: str, topic: str, ends: dict[int, int], tmp: Path) -> dict[str, float]:
    """Two members; one is killed (-9) a third of the way and restarted at once."""
    tag = f"sync-kill-{time.time_ns()}"
    roots, log = [tmp / f"{tag}-0", tmp / f"{tag}-1"], tmp / f"{tag}.log"
    total = sum(ends.values())

    def start(root: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            args = worker_args(
                bootstrap, topic, root, tag, tag, snapshot_interval=1.0
            )  # (progress: snapshots)
            return subprocess.Popen(args, stdout=out, stderr=out)

    procs = [start(roots[0])]
    while not urls(log):  # the survivor's metrics first, to tell them apart
        time.sleep(0.05)
    procs.append(start(roots[1]))
    while sum(folded(roots[1], topic).values()) < total // 3:
        time.sleep(0.05)
    survivor = urls(log)[0]
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    killed, merged = time.perf_counter(), scrape(survivor)["stream_fm_cluster_merged_round"]
    procs[1] = start(roots[1])
    resumed = None
    while not all(folded(r, topic) == ends for r in roots):
        if resumed is None and scrape(survivor)["stream_fm_cluster_merged_round"] > merged + 1:
            resumed = time.perf_counter() - killed  # a whole round folded since the kill
        time.sleep(0.05)
    caught_up = time.perf_counter() - killed
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(120)
    return {"a round folded again": resumed or float("nan"), "both members at the end": caught_up}


def warm() -> None:
    """Compile (or load) every kernel the workers use before anything is measured: a process that
    compiles spends seconds of CPU that do not grow with the stream (the numba cache is shared)."""
    xs, ys = [{"ad": f"a{i % 7}", "price": float(i)} for i in range(50)], [i % 3 == 0 for i in range(50)]
    SparseFM().learn_batch(xs, ys)
    model = SparseFM()
    model.learn_one(xs[0], True)
    model.predict_proba_one(xs[1])
    assembler = Assembler()  # (through the wire format, as members fold them)
    rounds = [next(filter(None, map(assembler.add, encode(pack_round(xs[p::2], ys[p::2], p, 0), 4096))))
              for p in range(2)]  # fmt: skip
    fold_round(model, rounds)
    with tempfile.TemporaryDirectory() as d:  # snapshots: the key index's export kernels
        snapshot.write(d, model)
        snapshot.restore(Path(d) / snapshot.latest_name(d))


def cost(
    bootstrap: str, n: int, repeat: int = 1, rate: float = 50.0, other_rounds: tuple[int, ...] = ()
) -> dict:
    warm()
    topic = ensure_topic(bootstrap, n, PARTITIONS, rate)
    ends = end_offsets(bootstrap, topic)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        configs: dict[str, tuple[int | None, int | None]] = {"single worker": (None, None)}
        configs |= {f"cluster, {m} member{'s' * (m > 1)}": (m, None) for m in (1, 2, 3)}
        # three members at other round lengths: what the default's length saves
        configs |= {f"cluster, 3 members, rounds of {r:,}": (3, r) for r in other_rounds}
        tries: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(repeat):  # interleaved, so that a slow spell of the machine hits every config
            for name, (members, round_records) in configs.items():
                tries[name].append(run(bootstrap, topic, ends, members, tmp, round_records))
        # each config's run of median CPU
        runs = {name: sorted(t, key=lambda r: r["cpu"])[len(t) // 2] for name, t in tries.items()}
        spread = {name: [round(1e6 * r["cpu"] / n, 1) for r in t] for name, t in tries.items()}
        steady = {name: sorted(r["steady"] for r in t if r["steady"]) for name, t in tries.items()}
        sync = next(r["tag"] for r in runs.values() if r["tag"].startswith("sync-1-"))
        sizes = sync_bytes(bootstrap, sync)
        killed = recovery(bootstrap, topic, ends, tmp)
    base = runs["single worker"]["cpu"] / n
    median = {name: v[len(v) // 2] if v else None for name, v in steady.items()}
    base_steady = median["single worker"]
    rows = []
    for name, r in runs.items():
        c = r["counters"]
        rounds = c[0]["stream_fm_cluster_merged_round"] if c else 0
        folds = np.mean([m["stream_fm_cluster_fold_seconds_total"] for m in c]) if c else 0
        waits = np.mean([m["stream_fm_cluster_wait_seconds_total"] for m in c]) if c else 0
        published = sum(m["stream_fm_cluster_delta_bytes_total"] for m in c) if c else 0
        reread = sum(m["stream_fm_cluster_records_reread_total"] for m in c) if c else 0
        rows.append((
            name, f"{r['wall']:.1f}", f"{n / r['wall']:,.0f}", f"{1e6 * r['cpu'] / n:.1f}",
            f"{r['cpu'] / n / base:.2f}x",
            f"{1e6 * median[name]:.1f}" if median[name] else "", f"{median[name] / base_steady:.2f}x"
            if median[name] and base_steady else "", f"{1e6 * r['broker_cpu'] / n:.1f}",
            f"{published / n:.0f}" if c else "", f"{1e3 * folds / rounds:.1f}" if rounds else "",
            f"{1e3 * waits / rounds:.1f}" if rounds else "", f"{100 * reread / n:.0f}%" if c else "",
            f"{r['trained'].get('1', 0):,} of {r['trained'].get('0', 0) + r['trained'].get('1', 0):,}",
        ))  # fmt: skip
    print_table(
        ["run", "wall s", "events/s", "CPU µs/event (workers)", "vs single", "steady state µs/event",
         "vs single (steady)", "broker CPU µs/event",
         "delta B/event", "fold ms/round (each member)", "wait ms/round (each member)", "records read twice",
         "positives trained"],
        rows,
    )  # fmt: skip
    print()
    sent = sizes["published (lz4)"]
    print_table(
        ["encoding of the 1-member run's rounds", "bytes/event", "vs published"],
        [(k, f"{v / n:.0f}", f"{v / sent:.2f}") for k, v in sizes.items() if k != "keys"],
    )
    published = runs["cluster, 1 member"]["counters"][0]["stream_fm_cluster_rounds_published_total"]
    print(f"\nfeature keys per round and partition: {sizes['keys'] / max(1, published):.0f}")
    if repeat > 1:
        print(f"\nCPU µs/event of each of the {repeat} runs (the table shows the median):")
        for name, values in spread.items():
            steadies = ", ".join(f"{1e6 * v:.1f}" for v in steady[name])
            print(f"  {name}: {', '.join(map(str, values))} (steady state: {steadies})")
    times = ", ".join(f"{k}: {v:.1f} s" for k, v in killed.items())
    print(f"kill -9 of one of two members, restarted at once: {times}")
    return {"n": n, "runs": runs, "sizes": sizes, "recovery": killed}


def scale(result: dict) -> None:
    """Events/s of N members, each on its own core (plus its fetch process), from the 1-member
    run: every member reads and joins its share of the events but folds (learns) all of them."""
    n, r = result["n"], result["runs"]["cluster, 1 member"]
    fold = r["counters"][0]["stream_fm_cluster_fold_seconds_total"] / n  # s per event folded
    own = r["cpu"] / n - fold  # s per event owned: fetch, parse, join, pack, publish, read back
    rows = []
    for members in (1, 2, 4, 8, 16, 32):
        rate = 1 / (own / members + fold)  # each member: own/N of the events + every fold
        rows.append((str(members), f"{rate:,.0f}", f"{100 * fold * rate:.0f}%"))
    print_table(["members", "events/s (on paper)", "share of a member's time spent folding"], rows)
    print(
        f"\nown work {1e6 * own:.1f} µs/event (two processes per member), folding {1e6 * fold:.2f} "
        f"µs/event (every member folds every event): folding limits it near {own / fold:.0f} members"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # long against a round: a member reads up to two rounds ahead of each partition (16,000
    # records a round: 192,000 events on 6 partitions), which a short stream's start-up and steady
    # state both feel (README, "Cluster")
    parser.add_argument("--events", type=int, default=3_600_000)
    parser.add_argument("--rounds", type=int, nargs="*", default=[500, 2000, 4000, 8000, DEFAULT_ROUND])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument(
        "--cost-rounds",
        type=int,
        nargs="*",
        default=[4000],
        help="other round lengths to run three members at, beside the default's (CPU per event)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each cost config (median shown)")
    parser.add_argument(
        "--event-rate", type=float, default=50.0,
        help="demo impressions a second of event time (50: the demo's; a fetch of a slow stream spans "
        "minutes of event time, and a single worker's one watermark then closes windows early)",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {machine()}\npartitions: {PARTITIONS}; broker: kafka-local.sh, same machine\n")
    if not args.skip_quality:
        print("## Quality: progressive log loss\n")
        quality(args.rounds)
        print()
    if not args.skip_cost:
        rate = f"{args.event_rate:g} impressions a second of event time"
        print(f"## Cost: {args.events:,} demo events ({rate}) on {PARTITIONS} partitions\n")
        result = cost(broker(), args.events, args.repeat, args.event_rate, tuple(args.cost_rounds))
        print("\n## Scale, on paper\n")
        scale(result)


if __name__ == "__main__":
    main()
