"""A model's state as plain arrays and a JSON-able dict: export, capture, import (no pickle).

:class:`StateIO` is a part of :class:`~stream_fm.model.SparseFM` (a mixin). ``STATE_FORMAT``
versions the layout; a state of another version is refused with both versions named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stream_fm.errors import ConfigError
from stream_fm.model import _kernels
from stream_fm.model.keyindex import KeyIndex, decode_keys, encode_keys, gather_keys

__all__ = ["STATE_FORMAT", "StateCapture", "StateIO", "as_made", "upgrade_bias"]

STATE_FORMAT = 6
# Earlier formats are read and migrated: their dense state ("bias") is shorter, and gets the rest
# of today's from a new model's (``_kernels.fresh_bias``):
# 1: before the normalized optimizer (bias [w0, accumulator]; the sum of sample norms 0: format 1
#    models are adagrad or sgd, which ignore it);
# 2: before calibration (bias [w0, accumulator, sum of norms]; the calibration is the identity,
#    and the model is made with ``calibrate=False``: it predicts and learns on exactly as before);
# 3: before centring and the averaged intercept (the reported intercept is w0, a normalized row
#    has one column after its factor accumulators, N, and not its sum of x; the model is made
#    with ``center=False`` and ``average_intercept=False``: it predicts and learns on exactly as
#    before);
# 4: before the calibration's gains were kept from going below 0 (the model is made with
#    ``nonnegative_gains=False``: it predicts and learns on exactly as before);
# 5: before ``dense_factors`` (a normalized row had two columns after its accumulators, N and its
#    sum of x, and not its count; the model is made with ``dense_factors=False``, which keeps no
#    count: it predicts and learns on exactly as before).
READABLE_FORMATS = (1, 2, 3, 4, 5, 6)
_BIAS_LENGTHS = {1: 2, 2: 3, 3: _kernels.B_W0_REPORT, 4: _kernels.BIAS_SIZE, 5: _kernels.BIAS_SIZE,
                 6: _kernels.BIAS_SIZE}  # fmt: skip


# the settings each state_format added, with the value that keeps a model made before it as it was
_ADDED_SETTINGS = {
    3: {"calibrate": False},
    4: {"center": False, "average_intercept": False},
    5: {"nonnegative_gains": False},
    6: {"dense_factors": False},
}


def as_made(config: Mapping[str, Any], version: int = 0) -> dict[str, Any]:
    """A model's settings as an earlier release recorded them (in a snapshot of state_format
    ``version``; 0: any earlier release, e.g. in a cluster's genesis), with each setting added
    since set as that model had it: it predicts and learns on exactly as it did."""
    config = dict(config)
    for added_in, settings in _ADDED_SETTINGS.items():
        if version < added_in:
            for name, value in settings.items():
                config.setdefault(name, value)
    return config


def upgrade_bias(bias: np.ndarray, version: int) -> np.ndarray:
    """A state's dense array ("bias") of format ``version``, in today's layout."""
    bias = np.asarray(bias, np.float64)
    want = _BIAS_LENGTHS.get(version)
    if bias.shape != (want,):
        got = tuple(bias.shape)
        raise ConfigError("state array 'bias'", got, f"shape ({want},) in state_format {version}")
    return _kernels.fresh_bias(bias)


class StateIO:
    """State export and import (part of SparseFM)."""

    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to continue learning bit for bit: named arrays plus a JSON-able dict.

        No pickle: arrays are plain numeric ``ndarray``s; feature keys are stored as their UTF-8
        bytes (``surrogatepass``) back to back plus offsets, so any string round-trips exactly.
        The returned arrays are copies, safe to hand to another thread.
        """
        return self.capture_state().materialize()

    def capture_state(self, buffers: dict[str, np.ndarray] | None = None) -> StateCapture:
        """The fast half of :meth:`export_state`: a consistent copy of the state, taken while the
        caller holds the model still (parameter arrays copied, key strings referenced: they are
        immutable). ``materialize()`` does the rest and may run on another thread.

        ``buffers`` (name -> array, owned by the caller and filled in here) lets a periodic
        writer copy into memory it already holds: copying into fresh memory costs a page fault
        per 4 KiB, several times the copy itself. The arrays returned are then views into those
        buffers, valid until the next capture into them.
        """
        n = self._n_rows
        arrays = {"bias": self._bias.copy(), "free": np.array(self._free, np.int64)}
        for name, (a, count) in self._captured(n).items():
            arrays[name] = _copy_rows(a, count, buffers, name)
        keys = None
        if self.hash_bits is None:  # the index's arrays, gathered into keys by materialize()
            keys = tuple(arrays.pop(name) for name in ("key_start", "key_length", "key_arena"))
        meta = {
            "class": type(self).__name__,
            "state_format": STATE_FORMAT,
            "config": self.get_config(),
            "samples_seen": self.samples_seen,
            "n_features": self.n_features,
            "n_rows": n,
            "n_evicted": self.n_evicted,
            "n_rejected": self.n_rejected,
            "n_skipped": self.n_skipped,
            "n_trained_rows": int(self._counts[1]),
        }
        return StateCapture(arrays, meta, keys, list(self._pending.items()))

    def reserve_buffers(self, buffers: dict[str, np.ndarray]) -> int:
        """Grow ``buffers`` for :meth:`capture_state` ahead of need, touching every page.

        A periodic writer calls this on its own thread between snapshots, so that the capture on
        the learner's thread is a plain copy, never a page fault. Returns the row count up to
        which the buffers fit.
        """
        n = self._n_rows
        for name, (a, count) in self._captured(n).items():
            target = count + count // 4 + 1024
            buf = buffers.get(name)
            if buf is None or buf.shape[0] < target or buf.shape[1:] != a.shape[1:] or buf.dtype != a.dtype:
                buf = np.zeros((target, *a.shape[1:]), a.dtype)
                buf.fill(0)  # np.zeros maps lazily: write every page now
                buffers[name] = buf
        return min(buffers[name].shape[0] for name in ("w", "V", "last"))

    def _captured(self, n: int) -> dict[str, tuple[np.ndarray, int]]:
        """The arrays a state capture copies, by name, each with the length of its prefix in
        use: the per-row parameter arrays (``n`` rows) and the key index's."""
        arrays = {"w": (self._w, n), "V": (self._V, n), "last": (self._last, n)}
        if self._gw.shape[0]:
            arrays.update(gw=(self._gw, n), gV=(self._gV, n))
        if self.hash_bits is None:
            arrays.update(self._index.parts(n))
        return arrays

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Any:
        """Rebuild a model from :meth:`export_state` output (arrays may be read-only/memory-mapped)."""
        version = meta.get("state_format")
        if meta.get("class") != cls.__name__ or version not in READABLE_FORMATS:
            raise ConfigError(
                "state_format",
                (meta.get("class"), version),
                f"({cls.__name__!r}, one of {READABLE_FORMATS}); this release writes {STATE_FORMAT}",
            )
        model = cls(**as_made(meta["config"], version))
        n = int(meta["n_rows"])
        k = model.n_factors
        if "bias" in arrays:
            arrays = {**arrays, "bias": upgrade_bias(arrays["bias"], version)}
        width = model._gV.shape[1]
        before = k + 1 if version < 4 else k + 2 if version < 6 else width  # an earlier format's columns
        if before < width and "gV" in arrays and arrays["gV"].shape == (n, before):
            # a normalized row had fewer columns after its accumulators; the new ones start at 0
            gV = np.zeros((n, width))
            gV[:, :before] = arrays["gV"]
            arrays = {**arrays, "gV": gV}
        expect = {"bias": (model._bias.shape[0],), "w": (n,), "V": (n, k), "last": (n,)}
        if model._gw.shape[0]:
            expect.update(gw=(n,), gV=(n, model._gV.shape[1]))
        for name, shape in expect.items():
            if name not in arrays or tuple(arrays[name].shape) != shape:
                got = None if name not in arrays else tuple(arrays[name].shape)
                raise ConfigError(f"state array {name!r}", got, f"shape {shape}")
        if model.hash_bits is None:
            model._alloc(max(1024, n))
        model._n_rows = n
        model._bias[:] = arrays["bias"]
        model._w[:n] = arrays["w"]
        model._V[:n] = arrays["V"]
        model._last[:n] = arrays["last"]
        if model._gw.shape[0]:
            model._gw[:n] = arrays["gw"]
            model._gV[:n] = arrays["gV"]
        model._free = [int(r) for r in arrays["free"]]
        if model.hash_bits is None:
            model._index = KeyIndex.from_keys(arrays["key_bytes"], arrays["key_offsets"], model._free)
        if "pending_counts" in arrays:
            pending = decode_keys(arrays["pending_key_bytes"], arrays["pending_key_offsets"])
            model._pending = dict(zip(pending, arrays["pending_counts"].tolist(), strict=True))
        model.samples_seen = int(meta["samples_seen"])
        model.n_evicted = int(meta["n_evicted"])
        model.n_rejected = int(meta["n_rejected"])
        model._counts[:2] = [int(meta["n_skipped"]), int(meta["n_trained_rows"])]
        model._publish()  # a new index, free rows
        return model


class StateCapture:
    """A model's state copied at one instant (:meth:`SparseFM.capture_state`)."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        keys: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        pending: list[tuple[str, int]],
    ) -> None:
        self.arrays, self.meta, self._keys, self._pending = arrays, meta, keys, pending

    def materialize(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta) as :meth:`SparseFM.export_state` returns them: keys encoded to bytes."""
        arrays = dict(self.arrays)
        if self._keys is not None:
            arrays["key_bytes"], arrays["key_offsets"] = gather_keys(*self._keys)
        if self._pending:
            arrays["pending_key_bytes"], arrays["pending_key_offsets"] = encode_keys(
                k for k, _ in self._pending
            )
            arrays["pending_counts"] = np.array([c for _, c in self._pending], np.int64)
        return arrays, dict(self.meta)


def _copy_rows(a: np.ndarray, n: int, buffers: dict[str, np.ndarray] | None, name: str) -> np.ndarray:
    """``a[:n].copy()``, into ``buffers[name]`` when given (grown with a quarter of headroom)."""
    if buffers is None:
        return a[:n].copy()
    buf = buffers.get(name)
    if buf is None or buf.shape[0] < n or buf.shape[1:] != a.shape[1:] or buf.dtype != a.dtype:
        buf = buffers[name] = np.empty((n + n // 4 + 1024, *a.shape[1:]), a.dtype)
    out = buf[:n]
    np.copyto(out, a[:n])
    return out
