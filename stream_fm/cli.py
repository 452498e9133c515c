"""The ``stream-fm`` command line. Exit codes: 0 ok, 2 usage or configuration error, 1 other failures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stream_fm import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-fm",
        description="Online factorization machine for click-through rate, fed by Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"stream-fm {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
