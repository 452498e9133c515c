"""What every benchmark prints: the machine it ran on, and markdown tables."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import numba
import numpy as np
import river

from stream_fm import __version__


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"CPython {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"river {river.__version__}, stream-fm {__version__} ({commit()})"
    )


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return "commit " + out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"


def print_table(header: list[str], rows: list[tuple[str, ...]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def one_hot(x: dict) -> dict[str, float]:
    """river's linear model needs numbers; encode like SparseFM does (same keys, same values)."""
    out: dict[str, float] = {}
    for k, v in x.items():
        if isinstance(v, str):
            out[f"{k}={v}"] = 1.0
        elif isinstance(v, list):
            out.update({f"{k}={s}": 1.0 for s in v})
        else:
            out[k] = float(v)
    return out
