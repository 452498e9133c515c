"""The ``stream-fm`` command line. Exit codes: 0 ok, 2 usage or configuration error, 1 other failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream_fm import __version__
from stream_fm.errors import ConfigError, StreamFMError

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-fm",
        description="Online factorization machine for click-through rate, fed by Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"stream-fm {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = sub.add_parser(
        "inspect",
        help="verify a snapshot and summarise it",
        description="Verify every checksum of a snapshot (or of every snapshot in a root) and print "
        "its manifest summary and top features. Exit code 1 if any snapshot fails verification.",
        epilog="examples:\n  stream-fm inspect snapshots/\n"
        "  stream-fm inspect snapshots/snap-0000000042-20261125T101500Z --top 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("path", type=Path, help="a snapshot root or one snapshot directory")
    inspect.add_argument("--top", type=int, default=10, help="how many top features to list (default 10)")

    run = sub.add_parser(
        "run",
        help="run the worker: Kafka (or the built-in demo stream) in, snapshots out",
        description="Consume impression and click events, learn, snapshot. With none of the Kafka "
        "options it runs the built-in demo stream. Stops cleanly on SIGTERM/SIGINT (final snapshot).",
        epilog="examples:\n  stream-fm run                                   # the demo stream\n"
        "  stream-fm run --bootstrap-servers 127.0.0.1:9092 --topic events --group-id ctr \\\n"
        "      --snapshot-dir snapshots/ --dead-letter-topic events-dlq",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka brokers (comma-separated)")
    run.add_argument("--topic", action="append", metavar="NAME", help="topic to consume (repeatable)")
    run.add_argument("--group-id", metavar="ID", help="consumer group (one worker per group)")
    run.add_argument(
        "--group-instance-id", metavar="NAME",
        help="static group membership: a stable name (e.g. the pod's) lets a restarted worker take its "
        "partitions back at once instead of after the session timeout",
    )  # fmt: skip
    run.add_argument("--dead-letter-topic", metavar="NAME", help="where bad messages go, unchanged")
    run.add_argument("--auto-offset-reset", choices=["earliest", "latest"], default="earliest")
    run.add_argument(
        "--kafka-option", action="append", default=[], metavar="KEY=VALUE",
        help="passed to kafka-python as is (security_protocol=SASL_SSL, sasl_mechanism=SCRAM-SHA-512, ...)",
    )  # fmt: skip
    run.add_argument("--demo-rate", type=float, default=2000.0, help="demo events per second (0: unpaced)")
    run.add_argument("--demo-limit", type=int, default=None, help="stop the demo after this many events")
    _worker_options(run)

    replay = sub.add_parser(
        "replay",
        help="learn from a JSON-lines file of events, then write a final snapshot",
        description="Run the worker over FILE (one event per line) to its end; exit 0 after the final "
        "snapshot. Resumes where a previous replay into the same --snapshot-dir stopped.",
        epilog="example:\n  stream-fm replay events.jsonl --snapshot-dir snapshots/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("file", type=Path)
    replay.add_argument("--dead-letter-file", type=Path, help="bad lines go here (JSON lines)")
    _worker_options(replay)

    produce = sub.add_parser(
        "produce",
        help="write the demo stream or a JSON-lines file into a Kafka topic",
        description="Produce events keyed by impression id (an impression and its clicks share a partition).",
        epilog="examples:\n"
        "  stream-fm produce --bootstrap-servers 127.0.0.1:9092 --topic events --demo 100000\n"
        "  stream-fm produce --bootstrap-servers 127.0.0.1:9092 --topic events --file events.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    produce.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    produce.add_argument("--topic", required=True)
    what = produce.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", type=int, metavar="N", help="the first N events of the demo stream")
    what.add_argument("--file", type=Path, help="a JSON-lines file, one event per line")
    produce.add_argument("--seed", type=int, default=0, help="demo stream seed")

    serve = sub.add_parser(
        "serve",
        help="serve predictions over HTTP from the newest snapshot",
        description="HTTP predictions from the newest valid snapshot under ROOT, hot-reloaded. "
        'POST /predict {"features": {...}} or {"instances": [...]}; GET /healthz, /readyz.',
        epilog="examples:\n  stream-fm serve --snapshots snapshots/ --port 8080\n"
        '  curl -s localhost:8080/predict -d \'{"features": {"ad": "a17"}}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--snapshots", type=Path, required=True, metavar="ROOT", help="snapshot root")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--reload-interval", type=float, default=5.0, help="seconds between checks (default 5)"
    )
    return parser


def _worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--snapshot-dir", type=Path, default=Path("snapshots"), help="snapshot root (default ./snapshots)"
    )
    p.add_argument(
        "--snapshot-interval", type=float, default=60.0, help="seconds between snapshots (default 60)"
    )
    p.add_argument("--snapshot-every-samples", type=int, default=None, help="also snapshot every N samples")
    p.add_argument("--snapshot-keep", type=int, default=5, help="snapshots kept (default 5)")
    p.add_argument(
        "--attribution-window", type=float, default=1800.0, help="seconds a click may follow (1800)"
    )
    p.add_argument("--allowed-lateness", type=float, default=60.0, help="event-time lateness tolerated (60)")
    p.add_argument("--max-pending", type=int, default=1_000_000, help="impressions waiting at most (10^6)")
    p.add_argument("--batch-size", type=int, default=5000, help="records per poll (5000)")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="metrics bind address (0.0.0.0: all interfaces)"
    )
    p.add_argument("--metrics-port", type=int, default=9108, help="/metrics, /healthz, /readyz port (9108)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve metrics")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "inspect":
            return _inspect(args.path, args.top)
        if args.command in ("run", "replay"):
            return _run(args)
        if args.command == "produce":
            return _produce(args)
        if args.command == "serve":
            from stream_fm import server

            server.run(args.snapshots, args.host, args.port, args.reload_interval)
            return EXIT_OK
    except ConfigError as e:
        print(f"stream-fm: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StreamFMError as e:
        print(f"stream-fm: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stream_fm import deadletters, sources
    from stream_fm.worker import Worker, WorkerConfig

    config = WorkerConfig(
        snapshot_dir=args.snapshot_dir,
        snapshot_every_seconds=args.snapshot_interval,
        snapshot_every_samples=args.snapshot_every_samples,
        snapshot_keep=args.snapshot_keep,
        attribution_window=args.attribution_window,
        allowed_lateness=args.allowed_lateness,
        max_pending=args.max_pending,
        batch_size=args.batch_size,
        progress_interval=args.progress_interval,
    )
    dead: deadletters.DeadLetters | None = None
    source: sources.Source
    if args.command == "replay":
        source = sources.FileSource(args.file)
        dead = deadletters.FileDeadLetters(args.dead_letter_file) if args.dead_letter_file else None
    elif args.bootstrap_servers or args.topic or args.group_id:
        missing = [
            f"--{n.replace('_', '-')}"
            for n in ("bootstrap_servers", "topic", "group_id")
            if not getattr(args, n)
        ]
        if missing:
            raise ConfigError(
                missing[0], None, "all of --bootstrap-servers, --topic and --group-id for Kafka"
            )
        options = _kafka_options(args.kafka_option)
        if args.group_instance_id:
            options["group_instance_id"] = args.group_instance_id
        source = sources.KafkaSource(
            args.bootstrap_servers, args.topic, args.group_id,
            auto_offset_reset=args.auto_offset_reset, client_config=options,
        )  # fmt: skip
        if args.dead_letter_topic:
            producer_options = {k: v for k, v in options.items() if k != "group_instance_id"}
            dead = deadletters.KafkaDeadLetters(
                args.bootstrap_servers, args.dead_letter_topic, producer_options
            )
    else:
        source = sources.DemoSource(rate=args.demo_rate or None, limit=args.demo_limit)
        # the demo's event time runs fast (50 impressions a second): a short window shows negatives at once
        if args.attribution_window == 1800.0:
            config.attribution_window = 120.0
    worker = Worker(source, config, dead)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger(__name__).info("stream-fm %s: %s -> %s", __version__, source.name, args.snapshot_dir)
    exporter = None
    if not args.no_metrics:
        from stream_fm.metrics import MetricsServer

        try:
            exporter = MetricsServer(worker, args.metrics_host, args.metrics_port).start()
        except OSError as e:
            raise ConfigError(
                "--metrics-port", args.metrics_port, f"a free port on {args.metrics_host} ({e})"
            ) from e
    try:
        worker.run(stop)
    finally:
        if exporter is not None:
            exporter.stop()
    return EXIT_OK


def _kafka_options(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--kafka-option", pair, "KEY=VALUE, e.g. security_protocol=SASL_SSL")
        out[key] = int(value) if value.isdigit() else value
    return out


def _produce(args: argparse.Namespace) -> int:
    import orjson
    from kafka import KafkaProducer

    from stream_fm.demo import DemoStream

    producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, acks="all", linger_ms=20)
    n = 0
    if args.demo is not None:
        for key, event in DemoStream(seed=args.seed):
            if n >= args.demo:
                break
            producer.send(args.topic, key=key.encode(), value=orjson.dumps(event))
            n += 1
    else:
        with open(args.file, "rb") as f:
            for line in f:
                line = line.rstrip(b"\r\n")
                if not line:
                    continue
                try:
                    doc = orjson.loads(line)
                    key = doc.get("id") or doc.get("impression_id") if isinstance(doc, dict) else None
                except orjson.JSONDecodeError:
                    key = None  # sent as is: the worker dead-letters it
                producer.send(args.topic, key=key.encode() if isinstance(key, str) else None, value=line)
                n += 1
    producer.flush()
    producer.close()
    print(f"produced {n} events to {args.topic}")
    return EXIT_OK


def _inspect(path: Path, top: int) -> int:
    from stream_fm import snapshot

    if (path / snapshot.MANIFEST).exists():
        names, root = [path.name], path.parent
    else:
        names, root = [name for _, name in snapshot.list_snapshots(path)], path
        if not names:
            print(f"{path}: no snapshots", file=sys.stderr)
            return EXIT_FAILURE
        print(f"root {path}: {len(names)} snapshot(s), LATEST -> {snapshot.latest_name(path)}")
    newest_valid = None
    failed = 0
    for name in names:
        try:
            snap = snapshot.read(root / name)
        except StreamFMError as e:
            failed += 1
            print(f"  FAILED  {name}: {e}")
            continue
        print(f"  ok      {name}  ({snap.manifest['samples_seen']:,} samples)")
        newest_valid = snap
    if newest_valid is not None:
        _summary(newest_valid, top)
    return EXIT_FAILURE if failed else EXIT_OK


def _summary(snap, top: int) -> None:
    from stream_fm.model import decode_keys

    m = snap.manifest
    size = sum(f["size"] for f in m["files"].values())
    print(f"\n{snap.name}")
    print(f"  created_at    {m['created_at']}   sequence {m['sequence']}   format {m['format_version']}")
    print(f"  samples_seen  {m['samples_seen']:,}   n_features {m['n_features']:,}   {size / 1e6:,.1f} MB")
    print(f"  model         {m['model']['config']}")
    print(f"  offsets       {m['offsets'] or '{}'}")
    a = snap.model_arrays
    trained = np.flatnonzero(np.asarray(a["last"]) >= 0)
    if "key_bytes" in a:
        keys = decode_keys(a["key_bytes"], a["key_offsets"])
    else:
        keys = [f"<bucket {r}>" for r in range(len(a["w"]))]
    print(f"  w0            {float(a['bias'][0]):+.6f}")
    for title, score in (
        ("|w|", np.abs(np.asarray(a["w"]))),
        ("||v||", np.linalg.norm(np.asarray(a["V"]), axis=1)),
    ):
        best = trained[np.argsort(-score[trained], kind="stable")[:top]]
        print(f"  top {len(best)} by {title}:")
        for r in best:
            print(f"    {score[r]:10.6f}  w={float(a['w'][r]):+.6f}  {keys[r]!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
