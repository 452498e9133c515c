"""One writer per snapshot root: an exclusive lock that a process holds while it writes there.

Two workers on one ``--snapshot-dir`` would interleave their snapshots, and ``LATEST`` would flip
between two different models that a serving layer hot-reloads in turn. So every writer (the
worker, ``replay``, :func:`stream_fm.snapshots.snapshot.write`,
:class:`stream_fm.snapshots.snapshot_writer.SnapshotWriter`) takes ``ROOT/.writer.lock`` first,
and a second process is refused with :class:`RootLockedError` naming the holder (pid, host,
command, since when).

The lock is a ``flock`` on that file: the kernel drops it when the holder's process ends, however
it ends, so a lock left by a ``kill -9`` never blocks a restart, and the file itself is never
deleted (deleting a lock file races with the next taker). Readers (``serve``, ``inspect``,
:func:`stream_fm.serve.serving.load`) never take it. Within one process the lock is shared: a process
that holds it may write through any number of writers (they take turns on its one thread of
control, which is the caller's business). ``flock`` works on local filesystems and on NFS (Linux
emulates it with NFS byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stream_fm.errors import RootLockedError

__all__ = ["LOCK_FILE", "RootLock", "holder"]

LOCK_FILE = ".writer.lock"

# realpath of a root -> [fd, holders]: flock conflicts between two open() of the same file even in
# one process, so this process opens each root's lock file once and counts its holders
_held: dict[str, list[int]] = {}
_guard = threading.Lock()


class RootLock:
    """The writer's lock on a snapshot root; :meth:`acquire` raises :class:`RootLockedError`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._key: str | None = None

    def acquire(self) -> RootLock:
        if self._key is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.root)
        with _guard:
            entry = _held.get(key)
            if entry is not None:
                entry[1] += 1
                self._key = key
                return self
            fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RootLockedError(self.root, _read_holder(key)) from None
            except BaseException:
                os.close(fd)
                raise
            _write_holder(fd)
            _held[key] = [fd, 1]
            self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                os.close(entry[0])  # the lock goes with the last descriptor of the file

    def __enter__(self) -> RootLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds ``root``'s writer lock now ({pid, host, command, since}), or None if nobody does."""
    path = os.path.join(root, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        key = os.path.realpath(root)
        with _guard:
            if key in _held:
                return _read_holder(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(key)
        return None  # nobody holds it (the shared lock goes when fd closes)
    finally:
        os.close(fd)


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = json.dumps(info).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(key: str) -> dict[str, Any]:
    # the holder writes its record right after it locks: a reader that comes in between may see
    # an empty file, so it looks again for a moment
    for _ in range(20):
        try:
            text = Path(key, LOCK_FILE).read_text(encoding="utf-8", errors="replace")
            info = json.loads(text)
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


def _close_in_child() -> None:
    # a child forked without exec must not keep the parent's locks alive after the parent dies
    # (flock belongs to the open file, which fork shares); closing its copies releases nothing
    global _guard
    _guard = threading.Lock()  # another thread may have held it at the fork
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
