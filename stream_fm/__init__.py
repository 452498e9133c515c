"""stream-fm: an online factorization machine for click-through rate, fed by Kafka."""

from __future__ import annotations

from stream_fm.ops import kernelcache as _kernelcache

_kernelcache.seed_from_env()  # prebuilt kernels into numba's cache, before numba loads any
_kernelcache.drop_stale()  # and none compiled from other sources than these

from stream_fm import errors as _errors  # noqa: E402
from stream_fm.errors import *  # noqa: E402, F403  (the exception hierarchy, as errors.__all__ names it)
from stream_fm.model import SparseFM  # noqa: E402
from stream_fm.serve import serving  # noqa: E402  (``from stream_fm import serving, snapshot``)
from stream_fm.snapshots import snapshot  # noqa: E402

__all__ = [*_errors.__all__, "SparseFM", "__version__", "serving", "snapshot"]

__version__ = "0.1.0"
