"""Compiled kernels ahead of the first start: ``stream-fm warmup`` and a read-only kernel cache.

numba compiles stream-fm's kernels the first time a process needs them and keeps the machine
code in its on-disk cache (``NUMBA_CACHE_DIR``, else ``stream_fm/model/__pycache__``): on an
empty cache ``import stream_fm`` takes about 8 s (the per-sample ``cfunc`` kernels compile at
import) and the first ``learn_batch`` about 3 s more; with the cache warm, the import takes 0.5 s.

- :func:`warm` runs every kernel once, on every path the worker and the serving layer take, so
  that the cache holds them all (``stream-fm warmup``); :func:`report` says what came from the
  cache and what had to be compiled in this process (``stream-fm warmup --check`` fails on the
  latter).
- numba needs its cache directory to be writable, so a read-only image cannot point
  ``NUMBA_CACHE_DIR`` at the kernels it was built with. ``STREAM_FM_KERNEL_CACHE=DIR`` names such
  a directory (filled by ``stream-fm warmup`` at build time): on import, stream-fm copies what it
  holds into ``NUMBA_CACHE_DIR`` (a writable place, e.g. an emptyDir on /tmp) before numba looks.
- numba checks a cached kernel against its own source file only, not against the files of the
  kernels it calls: after an upgrade that changed ``updates.py`` but not ``fastpath.py``, the
  per-sample kernels would run the old update rule. :func:`drop_stale` (on import) keeps a
  fingerprint of every source file of the package beside the cache and empties the cache of
  stream-fm's kernels when it differs.
- numba keys cached code by the CPU it was compiled for: an image built on one CPU model and run
  on another compiles again, unless both set ``NUMBA_CPU_NAME=generic`` (portable x86-64 code;
  the Dockerfile does). See the README for what that costs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from typing import Any

__all__ = ["drop_stale", "fingerprint", "report", "seed_from_env", "warm"]

log = logging.getLogger(__name__)

SEED_VARIABLE = "STREAM_FM_KERNEL_CACHE"
MARKER = "stream_fm.fingerprint"
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # stream_fm/
KERNELS = os.path.join(PACKAGE, "model")  # where every compiled kernel's module is


def fingerprint(package: str = PACKAGE) -> str:
    """sha256 of numba's version and every source file of the package, subpackages included
    (what kernels depend on)."""
    from importlib.metadata import version

    digest = hashlib.sha256(version("numba").encode())
    for top, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".c")):
                path = os.path.join(top, name)
                with open(path, "rb") as f:
                    digest.update(os.path.relpath(path, package).encode() + b"\0" + f.read())
    return digest.hexdigest()


def _cache_dirs() -> list[str]:
    """Where numba keeps this package's compiled kernels (its own locator rules)."""
    try:
        from numba.core.caching import _CacheLocator
        from numba.misc.appdirs import AppDirs
    except ImportError:  # another numba layout: nothing to guard
        return []
    subpath = _CacheLocator.get_suitable_cache_subpath(os.path.join(KERNELS, "fm.py"))
    if os.environ.get("NUMBA_CACHE_DIR"):
        return [os.path.join(os.environ["NUMBA_CACHE_DIR"], subpath)]
    # numba's next choices: __pycache__ beside the kernels if it can write there, else the user's
    in_tree = os.path.join(KERNELS, "__pycache__")
    if os.access(in_tree if os.path.isdir(in_tree) else KERNELS, os.W_OK):
        return [in_tree]
    return [os.path.join(AppDirs(appname="numba", appauthor=False).user_cache_dir, subpath)]


def drop_stale() -> int:
    """Delete this package's cached kernels wherever the fingerprint beside them is not the
    current one (then write it); returns how many files were deleted. Runs on import."""
    current = fingerprint()
    deleted = 0
    for folder in _cache_dirs():
        marker = os.path.join(folder, MARKER)
        try:
            with open(marker, encoding="ascii") as f:
                if f.read().strip() == current:
                    continue
        except OSError:
            pass
        try:
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith((".nbi", ".nbc")):
                        os.unlink(os.path.join(folder, name))
                        deleted += 1
            os.makedirs(folder, exist_ok=True)
            tmp = f"{marker}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="ascii") as f:
                f.write(current + "\n")
            os.replace(tmp, marker)
        except OSError:  # a read-only place: numba will not use it either
            continue
    if deleted:
        log.info("dropped %d cached kernels compiled from other sources", deleted)
    return deleted


def seed_from_env() -> int:
    """Copy ``$STREAM_FM_KERNEL_CACHE`` into ``$NUMBA_CACHE_DIR`` (files it lacks or that differ
    in size); returns how many files were copied. Runs on ``import stream_fm``, before numba
    compiles or loads anything; a no-op unless both variables are set and differ."""
    source = os.environ.get(SEED_VARIABLE)
    if not source:
        return 0
    target = os.environ.get("NUMBA_CACHE_DIR")
    if not target:
        log.warning("%s is set but NUMBA_CACHE_DIR is not: the prebuilt kernels are not used", SEED_VARIABLE)
        return 0
    if os.path.realpath(source) == os.path.realpath(target):
        return 0
    copied = 0
    try:
        for folder, _, files in os.walk(source):
            into = os.path.join(target, os.path.relpath(folder, source))
            os.makedirs(into, exist_ok=True)
            for name in files:
                src, dst = os.path.join(folder, name), os.path.join(into, name)
                if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
                    tmp = f"{dst}.{os.getpid()}.tmp"
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)  # a concurrent start never reads half a file
                    copied += 1
    except OSError as e:  # a start must not fail over a cache: it compiles instead
        log.warning("could not copy the prebuilt kernels from %s to %s: %s", source, target, e)
    return copied


def warm() -> None:
    """Run every kernel once: each optimizer, the storage modes (growing, bounded, admission,
    hashing), per-sample and batch learning and prediction, state export and restore, and the
    serving layer's predictor."""
    import tempfile

    from stream_fm.model import SparseFM
    from stream_fm.serve import serving
    from stream_fm.snapshots import snapshot

    samples = [
        {
            "user": f"u{i % 7}",
            "ad": f"a{i % 5}",
            "price": 0.5 + i % 3,
            "mobile": i % 2 == 0,
            "tags": ["x", "y"],
        }
        for i in range(64)
    ]
    labels = [i % 3 == 0 for i in range(64)]
    settings: list[dict[str, Any]] = [
        {},
        {"optimizer": "adagrad"},
        {"optimizer": "sgd"},
        {"max_features": 8},
        {"min_count": 2},
        {"hash_bits": 6},
    ]
    # growth: more rows than the first slabs hold, more key bytes than the first arena
    grown = SparseFM()
    grown.learn_batch([{"id": f"grow-{i:08d}"} for i in range(12_000)], [i % 2 == 0 for i in range(12_000)])
    for i in range(3_000):
        grown.learn_one({"one": f"grow-{i:08d}"}, i % 2 == 0)
    for kwargs in settings:
        model = SparseFM(**kwargs)
        for x, y in zip(samples[:16], labels[:16], strict=True):
            model.predict_proba_one(x)
            model.learn_one(x, y)
        model.learn_batch(samples, labels)
        model.predict_proba_batch(samples)
        arrays, meta = model.export_state()
        SparseFM.from_state(arrays, meta).learn_batch(samples[:8], labels[:8])
        with tempfile.TemporaryDirectory() as root:
            snapshot.write(root, model)
            predictor = serving.load(root)
            predictor.predict(samples[0])
            predictor.predict(samples[0])  # a key cache hit
            predictor.predict_batch(samples)


def kernels() -> dict[str, Any]:
    """Every numba kernel stream-fm has loaded: {module.name: dispatcher or cfunc}."""
    from numba.core.ccallback import CFunc
    from numba.core.dispatcher import Dispatcher

    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("stream_fm.") and module is not None:
            for attr, value in vars(module).items():
                if isinstance(value, Dispatcher | CFunc) and value.__module__ == name:
                    found[f"{name}.{attr}"] = value
    return found


def report() -> dict[str, Any]:
    """What this process got from the cache and what it had to compile, kernel by kernel."""
    from numba import config
    from numba.core.ccallback import CFunc

    loaded, compiled = 0, 0
    missed: list[str] = []
    found = kernels()
    for name, kernel in sorted(found.items()):
        if isinstance(kernel, CFunc):
            hits, misses = kernel.cache_hits, 1 - kernel.cache_hits
        else:
            stats = kernel.stats
            hits, misses = sum(stats.cache_hits.values()), sum(stats.cache_misses.values())
        loaded += hits
        compiled += misses
        if misses:
            missed.append(name)
    return {
        "cache_dir": config.CACHE_DIR or "__pycache__ beside each module",
        "cpu": config.CPU_NAME or "host",
        "kernels": len(found),
        "loaded": loaded,
        "compiled": compiled,
        "compiled_kernels": missed,
    }


def main(check: bool = False) -> int:
    """``stream-fm warmup``: warm the cache, print one line (stdout), exit 1 under ``check`` if
    anything had to be compiled."""
    t = time.perf_counter()
    warm()
    r = report()
    print(
        f"{r['kernels']} kernels, {r['loaded']} loaded from the cache and {r['compiled']} compiled "
        f"in {time.perf_counter() - t:.1f} s; cache {r['cache_dir']} (cpu {r['cpu']})"
    )
    if check and r["compiled"]:
        print(f"not in the cache: {', '.join(r['compiled_kernels'])}", file=sys.stderr)
        return 1
    return 0
