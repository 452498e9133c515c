"""The worker's periodic snapshot writer: the state copied in memory on the caller's thread,
written by :func:`stream_fm.snapshots.snapshot.write`'s machinery on a background thread."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stream_fm.errors import SnapshotError
from stream_fm.model import SparseFM
from stream_fm.snapshots.rootlock import RootLock
from stream_fm.snapshots.snapshot import Capture, Extra

__all__ = ["SnapshotWriter"]

log = logging.getLogger("stream_fm.snapshots.snapshot")


class SnapshotWriter:
    """Periodic snapshots for a running learner: every ``every_seconds`` and/or ``every_samples``,
    and on demand.

    The caller's thread only copies the state in memory (:meth:`maybe_write` returns after the
    copy); a background thread writes it. At most one write is in flight: a trigger that fires
    meanwhile is skipped and taken at the next call. A failed write is counted and logged, never
    raised, and retried at the next trigger.

    It holds ``root``'s writer lock from construction until :meth:`close` (or until it is
    garbage-collected): constructing one raises :class:`~stream_fm.errors.RootLockedError` if
    another process writes there.

    Attributes (read by the metrics layer): ``last_success`` (Unix time), ``last_path``,
    ``last_bytes``, ``last_write_seconds``, ``last_pause_seconds``, ``failures``, ``written``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        every_seconds: float | None = 60.0,
        every_samples: int | None = None,
        keep: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keep < 1:
            raise SnapshotError(root, f"keep={keep}: retention must keep at least 1 snapshot")
        self.root = Path(root)
        self._lock = RootLock(root).acquire()  # first: a refused writer must not touch anything
        weakref.finalize(self, self._lock.release)
        self.every_seconds = every_seconds
        self.every_samples = every_samples
        self.keep = keep
        self._clock = clock
        self._buffers: dict[str, np.ndarray] = {}  # reused by every capture (no page faults)
        self._reserved_rows = 0  # the buffers fit a model of up to this many rows
        self._thread: threading.Thread | None = None
        self._last_time = clock()
        self._last_samples: int | None = None
        self.last_success: float | None = None
        self.last_path: Path | None = None
        self.last_bytes = 0
        self.last_write_seconds = 0.0
        self.last_pause_seconds = 0.0
        self.failures = 0
        self.written = 0
        self.last_error: str | None = None

    def due(self, samples_seen: int) -> bool:
        if self._last_samples is None:
            self._last_samples = samples_seen
        by_time = self.every_seconds is not None and self._clock() - self._last_time >= self.every_seconds
        by_count = self.every_samples is not None and samples_seen - self._last_samples >= self.every_samples
        return by_time or by_count

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def maybe_write(self, model: SparseFM, extra: Callable[[], Extra] | Extra | None = None) -> bool:
        """Start a background write if a trigger is due and none is in flight; True if started.

        ``extra`` may be a callable, so that building it costs nothing when no write is due.
        """
        if self.busy:
            return False
        if not self.due(model.samples_seen):
            if model.n_rows * 5 // 4 > self._reserved_rows:
                self._run(self._reserve, model)  # grow the copy buffers while there is time
            return False
        self._start(model, extra() if callable(extra) else extra)
        return True

    def write_now(self, model: SparseFM, extra: Extra | None = None, timeout: float | None = None) -> bool:
        """Wait for any write in flight, then write this state and wait for it (shutdown,
        rebalance). True if it succeeded."""
        self.wait(timeout)
        if self.busy:  # the previous write is stuck (a hung disk): do not reuse its buffers
            return False
        failures = self.failures
        self._start(model, extra)
        self.wait(timeout)
        return self.failures == failures and not self.busy

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the write in flight, then release the root's writer lock (kept if the write is
        still running after ``timeout``: it goes when the process does)."""
        self.wait(timeout)
        if not self.busy:
            self._lock.release()

    def _start(self, model: SparseFM, extra: Extra | None) -> None:
        t = time.perf_counter()
        capture = Capture.take(model, extra, self._buffers)
        self.last_pause_seconds = time.perf_counter() - t
        self._last_time = self._clock()
        self._last_samples = model.samples_seen
        self._run(self._write, capture)

    def _run(self, target: Callable[[Any], None], arg: Any) -> None:
        self._thread = threading.Thread(target=target, args=(arg,), name="stream-fm-snapshot", daemon=True)
        self._thread.start()

    def _reserve(self, model: SparseFM) -> None:
        self._reserved_rows = model.reserve_buffers(self._buffers)

    def _write(self, capture: Capture) -> None:
        t = time.perf_counter()
        try:
            path = capture.publish(self.root, keep=self.keep)
        except Exception as e:  # never fatal: counted, logged, retried at the next trigger
            self.failures += 1
            self.last_error = str(e)
            log.error("snapshot failed (%d so far), will retry at the next trigger: %s", self.failures, e)
            return
        self.last_write_seconds = time.perf_counter() - t
        self.last_bytes = sum(f.stat().st_size for f in path.iterdir())
        self.last_path = path
        self.last_success = time.time()
        self.written += 1
        log.info(
            "snapshot %s: %d samples, %d features, %.1f MB in %.2f s (ingestion paused %.1f ms)",
            path.name, capture.state.meta["samples_seen"], capture.state.meta["n_features"],
            self.last_bytes / 1e6, self.last_write_seconds, 1e3 * self.last_pause_seconds,
        )  # fmt: skip
