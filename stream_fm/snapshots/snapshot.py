"""Snapshots: durable, atomic, checksummed model state on disk (the format is in the README).

A snapshot root holds immutable snapshot directories and a ``LATEST`` file naming the newest
complete one::

    ROOT/
      LATEST                                   "snap-0000000042-20261125T101500Z\\n"
      snap-0000000042-20261125T101500Z/
        manifest.json                          format, model config, counters, offsets, checksums
        manifest.json.sha256                   the manifest's own sha256 (hex)
        model.w.npy  model.V.npy  ...          the model's arrays (numpy .npy, no pickle)
        extra.<name>.npy                       arrays the caller added (the worker's join state)

One process writes to a root at a time: writers hold its lock (:mod:`stream_fm.snapshots.rootlock`), and a
second writing process gets :class:`~stream_fm.errors.RootLockedError`. Readers need no lock.

Publishing is atomic: files are written into a temporary directory in the same root and fsynced,
the directory is renamed into place and fsynced, then ``LATEST`` is replaced by rename. A crash or
a full disk at any instant leaves the previous snapshot and ``LATEST`` as they were.

:func:`write` publishes one snapshot synchronously
(:class:`stream_fm.snapshots.snapshot_writer.SnapshotWriter` is the worker's periodic writer);
:func:`read` verifies and loads one, and :func:`read_newest` finds the newest valid one in a root
(whose names, listing and retention are :mod:`stream_fm.snapshots.snapshot_root`'s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stream_fm.errors import SnapshotError
from stream_fm.model import SparseFM, StateCapture
from stream_fm.snapshots.rootlock import RootLock
from stream_fm.snapshots.snapshot_root import (
    LATEST,
    MANIFEST,
    TMP_PREFIX,
    latest_name,
    list_snapshots,
    next_sequence,
    prune,
)

__all__ = [
    "FORMAT_VERSION",
    "Extra",
    "Snapshot",
    "latest_name",
    "list_snapshots",
    "prune",
    "read",
    "read_newest",
    "restore",
    "restore_newest",
    "write",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_SHA256 = "manifest.json.sha256"  # the manifest's own checksum: hex sha256 of its bytes
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


@dataclass
class Extra:
    """What a caller stores beside the model: named arrays, a JSON-able dict, Kafka offsets."""

    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    offsets: Mapping[str, Any] = field(default_factory=dict)
    # more arrays, computed by the writer (background thread): for state whose serialisation is
    # slow but whose copy is cheap (the worker's pending join state)
    deferred: Callable[[], Mapping[str, np.ndarray]] | None = None


@dataclass
class Snapshot:
    """A verified snapshot: its directory, manifest, and arrays (memory-mapped, read-only)."""

    path: Path
    manifest: dict[str, Any]
    model_arrays: dict[str, np.ndarray]
    extra_arrays: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def offsets(self) -> dict[str, Any]:
        return self.manifest["offsets"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest["extra"]


# ---------------------------------------------------------------------------------------- writing


def write(
    root: str | os.PathLike[str], model: SparseFM, extra: Extra | None = None, *, keep: int | None = None
) -> Path:
    """Publish one snapshot of ``model`` (and ``extra``) under ``root``; returns its directory.

    ``keep``: afterwards delete all but the newest ``keep`` snapshots (never the one ``LATEST``
    names, nor one a reader holds). Raises :class:`SnapshotError` if it cannot be written, in
    which case the previous snapshot and ``LATEST`` are untouched, and
    :class:`~stream_fm.errors.RootLockedError` if another process writes to ``root``.
    """
    with RootLock(root):
        return Capture.take(model, extra).publish(Path(root), keep=keep)


class Capture:
    """Model state, extra state and offsets copied at one instant (the caller's thread)."""

    def __init__(self, state: StateCapture, extra: Extra) -> None:
        self.state = state
        self.extra = extra
        self.created = datetime.now(timezone.utc)

    @classmethod
    def take(
        cls, model: SparseFM, extra: Extra | None, buffers: dict[str, np.ndarray] | None = None
    ) -> Capture:
        extra = extra or Extra()
        _check_array_names(extra.arrays)  # fail on the caller's thread, where the mistake is
        # the caller's containers may change as soon as we return: copy them now
        copied = Extra(
            arrays={k: np.array(v, copy=True) for k, v in extra.arrays.items()},
            meta=json.loads(json.dumps(extra.meta)),
            offsets=json.loads(json.dumps(extra.offsets)),
            deferred=extra.deferred,
        )
        return cls(model.capture_state(buffers), copied)

    def publish(self, root: Path, keep: int | None = None) -> Path:
        """Write, fsync and rename into place, then point ``LATEST`` at it (background-safe)."""
        root.mkdir(parents=True, exist_ok=True)
        arrays, meta = self.state.materialize()
        extra_arrays = dict(self.extra.arrays)
        if self.extra.deferred is not None:
            deferred = self.extra.deferred()
            _check_array_names(deferred)
            extra_arrays.update(deferred)
        sequence = next_sequence(root)
        name = f"snap-{sequence:010d}-{self.created.strftime('%Y%m%dT%H%M%SZ')}"
        tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
        published = None
        try:
            tmp.mkdir()
            files: dict[str, Any] = {}
            for prefix, group in (("model", arrays), ("extra", extra_arrays)):
                for key, array in group.items():
                    files[f"{prefix}.{key}.npy"] = _write_array(tmp / f"{prefix}.{key}.npy", array)
            manifest = {
                "format_version": FORMAT_VERSION,
                "name": name,
                "created_at": self.created.isoformat().replace("+00:00", "Z"),
                "sequence": sequence,
                "model": meta,
                "samples_seen": meta["samples_seen"],
                "n_features": meta["n_features"],
                "offsets": self.extra.offsets,
                "extra": self.extra.meta,
                "files": files,
            }
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _write_bytes(tmp / MANIFEST, body)
            _write_bytes(tmp / MANIFEST_SHA256, f"{hashlib.sha256(body).hexdigest()}\n".encode())
            _fsync_dir(tmp)
            os.rename(tmp, root / name)
            published = root / name
            _fsync_dir(root)
            _write_bytes(root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}", f"{name}\n".encode())
            os.replace(root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}", root / LATEST)
            _fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if published is not None and latest_name(root) != name:
                shutil.rmtree(published, ignore_errors=True)  # complete, but never announced
            with contextlib.suppress(OSError):
                os.unlink(root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}")
            raise SnapshotError(root / name, f"write failed: {e}") from e
        if keep is not None:
            prune(root, keep)
        return root / name


def _check_array_names(names: Iterable[str]) -> None:
    for name in names:
        if not _ARRAY_NAME.match(name):
            raise SnapshotError(name, "extra array names must match [A-Za-z0-9_][A-Za-z0-9_.-]*")


def _write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    with _open_new(path) as raw:
        out = _HashingFile(raw)
        np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        raw.flush()
        os.fsync(raw.fileno())
    return {
        "sha256": out.sha256.hexdigest(),
        "size": out.size,
        "dtype": array.dtype.str,
        "shape": list(array.shape),
    }


def _write_bytes(path: Path, data: bytes) -> None:
    with _open_new(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _open_new(path: Path) -> BinaryIO:
    # one place where snapshot files are created: tests replace it to simulate a full disk
    return open(path, "xb")


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.raw.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- reading


def read(path: str | os.PathLike[str]) -> Snapshot:
    """Verify and load one snapshot directory. Raises :class:`SnapshotError` if anything is
    missing, truncated or does not match its checksum; nothing is returned half-loaded."""
    path = Path(path)
    with _reading(path):
        manifest = _read_manifest(path)
        arrays: dict[str, dict[str, np.ndarray]] = {"model": {}, "extra": {}}
        for fname, info in manifest["files"].items():
            prefix, _, rest = fname.partition(".")
            key = rest.removesuffix(".npy")
            if (
                prefix not in arrays
                or not fname.endswith(".npy")
                or "/" in fname
                or not _ARRAY_NAME.match(key)
            ):
                raise SnapshotError(path, f"manifest lists an unexpected file {fname!r}")
            arrays[prefix][key] = _read_array(path / fname, info)
    return Snapshot(path, manifest, arrays["model"], arrays["extra"])


def restore(path: str | os.PathLike[str]) -> tuple[SparseFM, Snapshot]:
    """The model stored in a snapshot directory, ready to learn on, and the snapshot itself."""
    snap = read(path)
    return SparseFM.from_state(snap.model_arrays, snap.manifest["model"]), snap


def restore_newest(root: str | os.PathLike[str]) -> tuple[SparseFM, Snapshot] | None:
    """:func:`restore` of the newest valid snapshot under ``root``; None if it holds none at all.
    Snapshots of which none is valid raise :class:`SnapshotError`: starting afresh would silently
    lose the model."""
    try:
        return read_newest(root, restore)
    except SnapshotError:
        if list_snapshots(root):
            raise
        return None


def read_newest(root: str | os.PathLike[str], loader: Callable[[Path], Any] = read) -> Any:
    """``loader`` applied to the newest valid snapshot under ``root`` (default: :func:`read`).

    Tries the one ``LATEST`` names first, then every other from newest to oldest; each one that
    fails is logged with the reason. Raises :class:`SnapshotError` if none is valid.
    """
    root = Path(root)
    for _ in range(3):
        latest = latest_name(root)
        names = [name for _, name in reversed(list_snapshots(root))]
        if latest is not None and latest in names:
            names.remove(latest)
            names.insert(0, latest)
        elif (root / LATEST).exists():
            log.warning("%s/LATEST does not name a snapshot here; using the newest valid one", root)
        problems = []
        for name in names:
            try:
                result = loader(root / name)
            except SnapshotError as e:
                problems.append(str(e))
                log.warning("skipping snapshot %s: %s", name, e.reason)
                continue
            if name != latest:
                log.warning("loaded %s instead of LATEST (%s)", name, latest)
            return result
        if latest_name(root) == latest:
            break
        # a writer published (and retention deleted what we were about to read) meanwhile: again
    detail = "; ".join(problems) if problems else "none found"
    raise SnapshotError(root, f"no valid snapshot: {detail}")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Hold a shared lock on the manifest, so that retention does not delete it meanwhile."""
    try:
        f = open(path / MANIFEST, "rb")
    except FileNotFoundError:
        raise SnapshotError(path, f"{MANIFEST} is missing (not a snapshot, or deleted)") from None
    except OSError as e:
        raise SnapshotError(path, f"cannot open {MANIFEST}: {e}") from e
    with f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        body = (path / MANIFEST).read_bytes()
        expected = (path / MANIFEST_SHA256).read_text(encoding="ascii", errors="replace").strip()
    except OSError as e:
        raise SnapshotError(path, f"{MANIFEST} or its checksum is unreadable: {e}") from e
    if hashlib.sha256(body).hexdigest() != expected:
        raise SnapshotError(path, f"{MANIFEST} does not match {MANIFEST_SHA256} (corrupt)")
    try:
        manifest = json.loads(body)
    except ValueError as e:
        raise SnapshotError(path, f"{MANIFEST} is not JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise SnapshotError(path, f"format_version {got!r} is not supported (expected {FORMAT_VERSION})")
    required = ("created_at", "sequence", "model", "samples_seen", "n_features", "offsets", "extra", "files")
    missing = [k for k in required if k not in manifest]
    if missing or not isinstance(manifest["files"], dict):
        raise SnapshotError(path, f"{MANIFEST} lacks {missing or ['files']}")
    return manifest


def _read_array(path: Path, info: Mapping[str, Any]) -> np.ndarray:
    where = path.parent
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SnapshotError(where, f"{path.name} is missing") from None
    if size != info["size"]:
        raise SnapshotError(
            where, f"{path.name} has {size} bytes, the manifest says {info['size']} (truncated?)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != info["sha256"]:
        raise SnapshotError(where, f"{path.name} does not match its sha256 (corrupt)")
    try:
        # memory-mapped and read-only: a serving process shares the pages with the page cache
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise SnapshotError(where, f"{path.name} is not a plain numpy array: {e}") from e
    if array.dtype.str != info["dtype"] or list(array.shape) != list(info["shape"]):
        raise SnapshotError(where, f"{path.name} is {array.dtype.str}{array.shape}, the manifest disagrees")
    return array


# ---------------------------------------------------------------------------------------- the worker's writer
