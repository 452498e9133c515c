"""The ``stream-fm`` command line. Exit codes: 0 ok, 2 usage or configuration error, 1 other failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream_fm import __version__
from stream_fm.errors import StreamFMError

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
        if args.command == "serve":
            from stream_fm import server

            server.run(args.snapshots, args.host, args.port, args.reload_interval)
            return EXIT_OK
    except StreamFMError as e:
        print(f"stream-fm: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


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
