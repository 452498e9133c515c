"""The serving side: load a snapshot into a read-only Predictor, and hot-reload new ones.

A serving process (often on another machine) loads what the worker publishes:

>>> import tempfile
>>> from stream_fm import SparseFM, snapshot
>>> model = SparseFM(seed=1)
>>> x = {"ad": "a17", "user": "u1"}
>>> model.learn_one(x, True)
>>> root = tempfile.mkdtemp()
>>> _ = snapshot.write(root, model)
>>> predictor = load(root)
>>> predictor.predict(x) == model.predict_proba_one(x)[True]
True
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stream_fm import _encode
from stream_fm.errors import SnapshotError
from stream_fm.model import SparseFM, _kernels, encode_rows, fastpath
from stream_fm.model.keyindex import KeyIndex
from stream_fm.model.state import READABLE_FORMATS, upgrade_bias
from stream_fm.snapshots import snapshot

__all__ = ["Predictor", "Refreshed", "Watcher", "load"]

log = logging.getLogger(__name__)


def load(path: str | Path) -> Predictor:
    """A :class:`Predictor` for ``path``: a snapshot directory, or a root (``LATEST``, falling
    back to the newest valid snapshot with a log line if that one is missing or corrupt).

    Every file is checked against the manifest's sha256 first; a bad snapshot raises
    :class:`~stream_fm.errors.SnapshotError` and is never half-loaded.
    """
    path = Path(path)
    if (path / snapshot.MANIFEST).exists():
        return Predictor(snapshot.read(path))
    return snapshot.read_newest(path, lambda p: Predictor(snapshot.read(p)))


class Predictor:
    """Click probabilities from one snapshot: read-only, safe to share between threads.

    The same feature rules and the same compiled arithmetic as :class:`~stream_fm.SparseFM`, so
    a prediction equals the live model's at the moment of the snapshot. Parameter arrays stay
    memory-mapped; only the key index is built in memory.
    """

    def __init__(self, snap: snapshot.Snapshot) -> None:
        self.name = snap.name
        self.path = snap.path
        self.manifest = snap.manifest
        config = snap.manifest["model"]["config"]
        a = snap.model_arrays
        try:
            version = snap.manifest["model"]["state_format"]
            if version not in READABLE_FORMATS:
                raise ValueError(f"state_format {version!r}, this release reads {READABLE_FORMATS}")
            # w0 and the calibration are what prediction reads of the dense state
            self._bias = upgrade_bias(a["bias"], version)
            # np.asarray: a plain ndarray view of the memory map, which the kernels accept
            self._w, self._V, self._last = (np.ascontiguousarray(a[k]) for k in ("w", "V", "last"))
            seed, hash_bits = int(config["seed"]), config["hash_bits"]
            self._hashing: tuple[int, int] | None = None
            if hash_bits is None:
                free = np.asarray(a["free"]).tolist()
                self._index = KeyIndex.from_keys(
                    np.asarray(a["key_bytes"]), np.asarray(a["key_offsets"]), free
                )
            else:
                self._index = KeyIndex(rows=1)
                self._hashing = fastpath.hashing(seed, int(hash_bits))
            # the per-sample kernel's view of these arrays (it only reads them)
            self._pointers = fastpath.pointer_table()
            empty = np.zeros((0, self._V.shape[1]))
            fastpath.publish(
                self._pointers, bias=self._bias, w=self._w, V=self._V, gw=np.zeros(0), gV=empty,
                last=self._last, counts=np.zeros(4, np.int64), hp=np.zeros(fastpath.HP_SIZE),
                index=self._index, opt=0, seed=seed, hash_bits=hash_bits,
                mode=fastpath.MODE_LOOKUP if hash_bits is None else fastpath.MODE_HASH,
            )  # fmt: skip
            self._address = self._pointers.ctypes.data
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(snap.path, f"model state is incomplete or inconsistent: {e!r}") from e

    @classmethod
    def of_model(cls, model: SparseFM, name: str) -> Predictor:
        """A predictor of a live model's state now (a copy: the model may go on learning)."""
        arrays, meta = model.export_state()
        return cls(
            snapshot.Snapshot(Path(name), {"model": meta, "samples_seen": meta["samples_seen"]}, arrays, {})
        )

    @property
    def samples_seen(self) -> int:
        return self.manifest["samples_seen"]

    def predict(self, x: Mapping[str, Any]) -> float:
        """The click probability of one feature dict (a ``ValueError`` names a bad field)."""
        return _encode.predict_one(x, self._address)

    def predict_batch(self, xs: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities for many feature dicts."""
        rows, vals, offsets, _ = encode_rows(xs, self._index, self._hashing)
        out = np.empty(len(offsets) - 1)
        _kernels.predict(rows, vals, offsets, self._bias, self._w, self._V, self._last, out)
        return out

    def __repr__(self) -> str:
        return f"Predictor({self.name!r}, samples_seen={self.samples_seen})"


class Refreshed:
    """A predictor kept current by a background thread: ``_prepare`` runs on :meth:`start` (the
    first predictor), then ``_run`` until :meth:`stop`. Readers take ``predictor`` (one attribute
    read, atomic)."""

    thread_name = "stream-fm-serving"

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _prepare(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Refreshed:
        self._prepare()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Refreshed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Watcher(Refreshed):
    """Hot reload: polls a snapshot root every ``interval`` seconds and swaps in each new valid
    snapshot. Readers take ``watcher.predictor`` (one attribute read, atomic); a snapshot that
    fails to load is logged and counted, and the previous predictor stays.

    ``predictor`` is None until a first valid snapshot exists (the worker may not have written
    one yet).
    """

    thread_name = "stream-fm-watcher"

    def __init__(self, root: str | Path, interval: float = 5.0) -> None:
        super().__init__()
        self.root = Path(root)
        self.interval = interval
        self.reloads = 0
        self.failures = 0
        self._failed: str | None = None  # the name that failed last: not retried until LATEST moves

    def check(self) -> bool:
        """Load the newest snapshot if it differs from the current one; True if swapped."""
        current = self.predictor.name if self.predictor else None
        latest = snapshot.latest_name(self.root)
        if latest is not None and latest in (current, self._failed):
            return False
        if latest is None and (current or not snapshot.list_snapshots(self.root)):
            return False  # nothing published yet, or LATEST garbled: keep what we serve
        try:
            fresh = load(self.root)
        except SnapshotError as e:
            self._failed = latest
            self.failures += 1
            log.error("reload failed, still serving %s: %s", current, e)
            return False
        if fresh.name == current:
            self._failed = latest  # LATEST is bad and we already serve the newest valid one
            return False
        self.predictor = fresh
        self.reloads += 1
        log.info("serving snapshot %s (%d samples)", fresh.name, fresh.samples_seen)
        return True

    def _prepare(self) -> None:
        self.check()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watcher must outlive any surprise; the old model keeps serving
                self.failures += 1
                log.exception("unexpected error while reloading")
