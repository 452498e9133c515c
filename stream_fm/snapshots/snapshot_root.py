"""A snapshot root's directory: snapshot names, ``LATEST``, listing and retention.

Names are ``snap-<sequence, 10 digits>-<UTC time>``; writers publish into temporary directories
(``.tmp-...-<pid>``) and retention renames what it deletes to ``.trash-...-<pid>`` first, so that
a directory a dead process left behind is recognised and cleared (:func:`prune`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from pathlib import Path

from stream_fm.errors import SnapshotError
from stream_fm.snapshots.rootlock import RootLock

__all__ = [
    "LATEST",
    "MANIFEST",
    "TMP_PREFIX",
    "latest_name",
    "list_snapshots",
    "next_sequence",
    "prune",
    "prune_locked",
]

log = logging.getLogger("stream_fm.snapshots.snapshot")

MANIFEST = "manifest.json"
LATEST = "LATEST"
_NAME = re.compile(r"^snap-(\d{10})-(\d{8}T\d{6}Z)$")
TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


def list_snapshots(root: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(sequence, name) of the snapshot directories in ``root``, oldest first (not verified)."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in entries if (m := _NAME.match(name))]
    return sorted(found)


def latest_name(root: str | os.PathLike[str]) -> str | None:
    """The snapshot name ``LATEST`` holds, or None if it is missing or not a snapshot name."""
    root = Path(root)
    try:
        text = (root / LATEST).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text if _NAME.match(text) else None


def next_sequence(root: Path) -> int:
    return max((seq for seq, _ in list_snapshots(root)), default=0) + 1


# ---------------------------------------------------------------------------------------- retention


def prune(root: str | os.PathLike[str], keep: int) -> list[str]:
    """Delete all but the newest ``keep`` snapshots; returns the names deleted.

    Never deletes the snapshot ``LATEST`` names, nor one a reader holds (readers take a shared
    ``flock`` on its manifest while they verify and load). Also clears temporary directories left
    by writers that died. Takes the root's writer lock (:class:`~stream_fm.errors.RootLockedError`
    if another process writes there).
    """
    root = Path(root)
    if keep < 1:
        raise SnapshotError(root, f"keep={keep}: retention must keep at least 1 snapshot")
    with RootLock(root):  # deleting is writing: not while another process writes here
        return prune_locked(root, keep)


def prune_locked(root: Path, keep: int) -> list[str]:
    """:func:`prune`, by a caller that holds the root's writer lock."""
    latest = latest_name(root)
    deleted = []
    for _, name in list_snapshots(root)[:-keep]:
        if name == latest:
            continue
        path = root / name
        try:
            with open(path / MANIFEST, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a reader holds LOCK_SH
                trash = root / f"{_TRASH_PREFIX}{name}-{os.getpid()}"
                os.rename(path, trash)
        except BlockingIOError:
            log.info("snapshot %s is being read; keeping it until the next retention pass", name)
            continue
        except OSError as e:
            log.warning("could not delete snapshot %s: %s", name, e)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(name)
    for leftover in root.iterdir():
        if leftover.name.startswith((TMP_PREFIX, _TRASH_PREFIX)) and not _pid_alive(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(
                missing_ok=True
            )
    return deleted


def _pid_alive(name: str) -> bool:
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
