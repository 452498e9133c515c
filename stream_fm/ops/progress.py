"""A one-line progress bar on stderr, drawn only on a terminal (never into logs or pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Bar"]


class Bar:
    """``Bar(total, label)``; ``update(done, note="")`` at most every 0.2 s; ``close()``.

    ``total`` may be None (unknown): the bar then shows counts and rate only. ``done`` is what the
    caller counts (events, samples, bytes...); ``fraction`` overrides done/total when the caller
    knows better (e.g. bytes read of a file whose events are counted).
    """

    def __init__(
        self, total: int | None, label: str = "", stream: TextIO | None = None, force: bool = False
    ) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = 0.0

    def due(self) -> bool:
        """Whether an update now would draw (callers skip preparing a note otherwise)."""
        return self.enabled and time.monotonic() - self.drawn >= 0.2

    def update(self, done: int, note: str = "", fraction: float | None = None) -> None:
        if not self.due():
            return
        now = time.monotonic()
        self.drawn = now
        rate = done / max(now - self.started, 1e-9)
        if fraction is None and self.total:
            fraction = done / self.total
        head = f"{self.label} " if self.label else ""
        if fraction is not None:
            f = min(1.0, max(0.0, fraction))
            head += f"[{'#' * int(30 * f)}{'.' * (30 - int(30 * f))}] {100 * f:5.1f}%  "
        self.stream.write(f"\r{head}{done:,}  {rate:,.0f}/s  {note}".rstrip() + " ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
