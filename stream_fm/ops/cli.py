"""The ``stream-fm`` command line. Exit codes: 0 ok, 2 usage or configuration error, 1 other failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream_fm import __version__
from stream_fm.errors import ConfigError, RootLockedError, StreamFMError
from stream_fm.ops import logs

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-fm",
        description="Online factorization machine for click-through rate, fed by Kafka.",
        epilog="exit codes: 0 ok, 1 failure (e.g. a snapshot fails verification), "
        "2 usage or configuration error (also: another process writes to the snapshot directory)",
    )
    parser.add_argument("--version", action="version", version=f"stream-fm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = _command(
        sub, "run", "run the worker: Kafka (or the built-in demo stream) in, snapshots out",
        "Consume impression and click events, learn, snapshot, serve metrics. With no Kafka brokers "
        "configured it runs the built-in demo stream. SIGTERM/SIGINT: final snapshot, exit 0. "
        "Settings come from --config FILE < STREAM_FM_* environment variables < flags.",
        "stream-fm run                                   # the demo stream\n"
        "  stream-fm run --bootstrap-servers 127.0.0.1:9092 --topic events --group-id ctr \\\n"
        "      --snapshot-dir snapshots/ --dead-letter-topic events-dlq\n"
        "  STREAM_FM_KAFKA_SASL_PLAIN_PASSWORD_FILE=/run/secrets/kafka stream-fm run --config worker.toml",
    )  # fmt: skip
    _config_flags(run)

    replay = _command(
        sub, "replay", "learn from a JSON-lines file of events, then write a final snapshot",
        "Run the worker over FILE (one event per line) to its end; exit 0 after the final snapshot. "
        "Resumes where a previous replay into the same snapshot directory stopped.",
        "stream-fm replay events.jsonl --snapshot-dir snapshots/ --dead-letter-file bad.jsonl",
    )  # fmt: skip
    replay.add_argument("file", type=Path, help="events, one JSON object per line")
    replay.add_argument("--dead-letter-file", type=Path, help="bad lines go here (JSON lines)")
    _config_flags(replay)

    config = _command(
        sub, "config", "print the effective configuration and where each value came from",
        "Resolve --config FILE, STREAM_FM_* environment variables and flags as `run` would, validate "
        "them, and print the result with secrets masked. Exit 2 if anything is invalid.",
        "stream-fm config --config worker.toml --n-factors 16",
    )  # fmt: skip
    _config_flags(config)

    produce = _command(
        sub, "produce", "write the demo stream or a JSON-lines file into a Kafka topic",
        "Produce events keyed by impression id (an impression and its clicks share a partition).",
        "stream-fm produce --bootstrap-servers 127.0.0.1:9092 --topic events --demo 100000\n"
        "  stream-fm produce --bootstrap-servers 127.0.0.1:9092 --topic events --file events.jsonl",
    )  # fmt: skip
    produce.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    produce.add_argument("--topic", required=True)
    what = produce.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", type=int, metavar="N", help="the first N events of the demo stream")
    what.add_argument("--file", type=Path, help="a JSON-lines file, one event per line")
    produce.add_argument("--seed", type=int, default=0, help="demo stream seed")
    _log_flags(produce)

    inspect = _command(
        sub, "inspect", "verify a snapshot and summarise it",
        "Verify every checksum of a snapshot (or of every snapshot in a root) and print its manifest "
        "summary and top features. Exit code 1 if any snapshot fails verification.",
        "stream-fm inspect snapshots/\n"
        "  stream-fm inspect snapshots/snap-0000000042-20261125T101500Z --top 20",
    )  # fmt: skip
    inspect.add_argument("path", type=Path, help="a snapshot root or one snapshot directory")
    inspect.add_argument("--top", type=int, default=10, help="how many top features to list (default 10)")
    _log_flags(inspect)

    serve = _command(
        sub, "serve", "serve predictions over HTTP from the newest snapshot",
        "HTTP predictions from the newest valid snapshot under ROOT, hot-reloaded. "
        'POST /predict {"features": {...}} or {"instances": [...]}; GET /healthz, /readyz.',
        "stream-fm serve --snapshots snapshots/ --port 8080\n"
        "  curl -s localhost:8080/predict -d '{\"features\": {\"ad\": \"a17\"}}'",
    )  # fmt: skip
    serve.add_argument("--snapshots", type=Path, required=True, metavar="ROOT", help="snapshot root")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--reload-interval", type=float, default=5.0, help="seconds between checks (default 5)"
    )
    serve.add_argument(
        "--sync-topic", metavar="NAME",
        help="a cluster's sync topic: fold its rounds between snapshots (with --bootstrap-servers; "
        "security settings from STREAM_FM_KAFKA_* as for run)",
    )  # fmt: skip
    serve.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka, for --sync-topic")
    _log_flags(serve)

    warmup = _command(
        sub, "warmup", "compile every kernel into numba's cache, so that no start pays for it",
        "Run every compiled kernel once, so that numba's on-disk cache (NUMBA_CACHE_DIR) holds them "
        "all: a start on an empty cache spends about 10 s compiling, one on a warm cache none. "
        "Prints one line: kernels loaded from the cache and compiled. Run it after installing (an "
        "image build runs it). --check: exit 1 if anything had to be compiled.",
        "stream-fm warmup\n"
        "  NUMBA_CACHE_DIR=/opt/stream-fm/kernels stream-fm warmup --check",
    )  # fmt: skip
    warmup.add_argument("--check", action="store_true", help="exit 1 unless everything came from the cache")
    _log_flags(warmup)
    return parser


def _command(sub: Any, name: str, help_: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help_, description=description, epilog=f"examples:\n  {examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def _config_flags(p: argparse.ArgumentParser) -> None:
    """A flag per setting that has one; each defaults to "not given" so that precedence works."""
    from stream_fm.ops.config import SETTINGS, _show

    p.add_argument("--config", type=Path, metavar="FILE", help="a TOML file of settings (see the README)")
    for s in SETTINGS:
        if not s.flag:
            continue
        kw: dict[str, Any] = {"dest": s.key, "default": argparse.SUPPRESS}
        kw["help"] = f"{s.help} [{s.key}, default {_show(s.default)}]"
        if s.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif s.type is list:
            kw["action"] = "append"
            kw["metavar"] = s.name.upper().rstrip("S")
        else:
            kw["metavar"] = "|".join(s.choices) if s.choices else s.name.upper()
        p.add_argument(s.flag, **kw)


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command in ("run", "replay", "config"):
            config = _load_config(args)
            if args.command == "config":
                print(config.describe())
                return EXIT_OK
            logs.setup(config.logging.level, config.logging.format)
            return _run(args, config)
        logs.setup(args.log_level, args.log_format)
        if args.command == "produce":
            return _produce(args)
        if args.command == "inspect":
            from stream_fm.snapshots import inspection

            return inspection.inspect(args.path, args.top)
        if args.command == "warmup":
            from stream_fm.ops import kernelcache

            return kernelcache.main(args.check)
        if args.command == "serve":
            from stream_fm.serve import server

            server.run(args.snapshots, args.host, args.port, args.reload_interval, _follow(args))
            return EXIT_OK
    except ConfigError as e:
        print(f"stream-fm: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RootLockedError as e:  # a second worker on one snapshot directory: a usage mistake
        print(f"stream-fm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StreamFMError as e:
        print(f"stream-fm: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def _load_config(args: argparse.Namespace) -> Any:
    from stream_fm.ops.config import SETTINGS, load

    keys = {s.key for s in SETTINGS}
    flags = {k: v for k, v in vars(args).items() if k in keys}
    return load(args.config, flags=flags)


def _run(args: argparse.Namespace, config: Any) -> int:
    import signal
    import threading

    from stream_fm.stream import deadletters, sources
    from stream_fm.stream.worker import Worker, WorkerConfig

    log = logging.getLogger("stream_fm")
    c = config
    window = c.join.attribution_window
    dead: deadletters.DeadLetters | None = None
    source: sources.Source
    if args.command == "replay":
        source = sources.FileSource(args.file)
        dead = deadletters.FileDeadLetters(args.dead_letter_file) if args.dead_letter_file else None
    elif c.kafka.bootstrap_servers:
        client = c.kafka_client_config()
        session_ms = int(c.kafka.session_timeout * 1000)
        consumer_client = dict(
            client, session_timeout_ms=session_ms, heartbeat_interval_ms=min(3000, session_ms // 3)
        )
        if c.kafka.group_instance_id:
            consumer_client["group_instance_id"] = c.kafka.group_instance_id
        source = sources.KafkaSource(
            c.kafka.bootstrap_servers, c.kafka.topics, c.kafka.group_id,
            auto_offset_reset=c.kafka.auto_offset_reset, client_config=consumer_client,
            max_records=c.worker.batch_size, cluster=bool(c.cluster.sync_topic),
        )  # fmt: skip
        if c.kafka.dead_letter_topic:
            dead = deadletters.KafkaDeadLetters(c.kafka.bootstrap_servers, c.kafka.dead_letter_topic, client)
    else:
        source = sources.DemoSource(seed=c.demo.seed, rate=c.demo.rate or None, limit=c.demo.limit)
        if c.source_of("join", "attribution_window") == "default":
            window = 120.0  # the demo's event time runs fast: a short window shows negatives at once
    worker_config = WorkerConfig(
        snapshot_dir=Path(c.snapshot.dir),
        snapshot_every_seconds=c.snapshot.interval,
        snapshot_every_samples=c.snapshot.every_samples,
        snapshot_keep=c.snapshot.keep,
        attribution_window=window,
        allowed_lateness=c.join.allowed_lateness,
        max_pending=c.join.max_pending,
        max_message_bytes=c.worker.max_message_bytes,
        batch_size=c.worker.batch_size,
        poll_timeout=c.worker.poll_timeout,
        quality_window=c.worker.quality_window,
        progress_interval=c.worker.progress_interval,
        shutdown_timeout=c.worker.shutdown_timeout,
        model=c.model_kwargs(),
    )
    worker: Worker
    if c.cluster.sync_topic:
        worker = _member(args, c, source, worker_config, dead)
    else:
        worker = Worker(source, worker_config, dead)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("stream-fm %s: %s -> %s", __version__, source.name, c.snapshot.dir)
    exporter = None
    if c.metrics.enabled:
        from stream_fm.ops.metrics import MetricsServer

        try:
            exporter = MetricsServer(worker, c.metrics.host, c.metrics.port).start()
        except OSError as e:
            raise ConfigError("metrics.port", c.metrics.port, f"a free port on {c.metrics.host} ({e})") from e
    try:
        worker.run(stop)
    finally:
        if exporter is not None:
            exporter.stop()
    return EXIT_OK


def _member(args: argparse.Namespace, c: Any, source: Any, worker_config: Any, dead: Any) -> Any:
    """A cluster member (``cluster.sync_topic`` set): Kafka in, Kafka between members."""
    from stream_fm.cluster.member import ClusterConfig, Member
    from stream_fm.cluster.sync import SyncLog

    if args.command != "run" or not c.kafka.bootstrap_servers:
        raise ConfigError(
            "cluster.sync_topic",
            c.cluster.sync_topic,
            "unset unless `stream-fm run` reads Kafka (bootstrap_servers)",
        )
    sync = SyncLog(c.kafka.bootstrap_servers, c.cluster.sync_topic, client_config=c.kafka_client_config())
    cluster = ClusterConfig(c.cluster.sync_topic, c.cluster.round_records, c.cluster.round_timeout)
    return Member(source, worker_config, cluster, sync, dead)


def _follow(args: argparse.Namespace) -> Any:
    """The sync topic (a ``SyncLog``) ``stream-fm serve`` follows, if it was given one."""
    from stream_fm.cluster.sync import SyncLog
    from stream_fm.ops import config

    if args.sync_topic is None:
        return None
    if not args.bootstrap_servers:
        raise ConfigError(
            "--bootstrap-servers", "", "the Kafka brokers of the sync topic (with --sync-topic)"
        )
    client = config.load().kafka_client_config()  # (security: the environment, as for run)
    return SyncLog(args.bootstrap_servers, args.sync_topic, client_config=client)


def _produce(args: argparse.Namespace) -> int:
    import orjson
    from kafka import KafkaProducer

    from stream_fm.ops.progress import Bar
    from stream_fm.stream.demo import DemoStream

    producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, acks="all", linger_ms=20)
    n = 0
    bar = Bar(args.demo, "produce")
    if args.demo is not None:
        for key, event in DemoStream(seed=args.seed):
            if n >= args.demo:
                break
            producer.send(args.topic, key=key.encode(), value=orjson.dumps(event))
            n += 1
            bar.update(n, "events")
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
                bar.update(n, "events", fraction=f.tell() / max(1, args.file.stat().st_size))
    producer.flush()
    bar.close()
    producer.close()
    print(f"produced {n} events to {args.topic}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
