"""No compile on a start: `stream-fm warmup` fills numba's cache with every kernel, and a worker
started on that cache (here through STREAM_FM_KERNEL_CACHE, as the image does on a read-only root)
compiles nothing. Real processes, empty caches."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

from stream_fm.ops import kernelcache

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(
    """
    import json, sys
    from stream_fm.ops import cli, kernelcache
    from stream_fm.serve import serving
    root = sys.argv[1]
    assert cli.main(["run", "--snapshot-dir", root, "--no-metrics", "--demo-rate", "0",
                     "--demo-limit", "20000", "--log-level", "WARNING"]) == 0
    predictor = serving.load(root)
    predictor.predict({"ad": "a1"})
    predictor.predict_batch([{"ad": "a1"}, {"ad": "a2"}])
    print(json.dumps(kernelcache.report()))
    """
)


def _run(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_worker_on_a_warmed_cache_compiles_nothing(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "STREAM_FM_"))}
    base["PYTHONPATH"] = str(REPO)
    built = tmp_path / "kernels"  # what an image build fills
    line = _run(
        [sys.executable, "-m", "stream_fm", "warmup"], {**base, "NUMBA_CACHE_DIR": str(built)}
    ).strip()
    assert "0 loaded from the cache" in line and " 0 compiled" not in line, line
    check = subprocess.run(
        [sys.executable, "-m", "stream_fm", "warmup", "--check"],
        env={**base, "NUMBA_CACHE_DIR": str(built)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert check.returncode == 0 and " 0 compiled" in check.stdout, check.stdout + check.stderr

    for path in [built, *built.rglob("*")]:  # read-only, as in an image with a read-only root
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    runtime = tmp_path / "numba-cache"  # empty, writable: an emptyDir on /tmp
    env = {**base, "NUMBA_CACHE_DIR": str(runtime), "STREAM_FM_KERNEL_CACHE": str(built)}
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in built.rglob("*"))
    report = json.loads(_run([sys.executable, "-c", WORKER, str(tmp_path / "snaps")], env))
    assert report["compiled"] == 0, report["compiled_kernels"]
    assert report["loaded"] > 0 and report["cache_dir"] == str(runtime)
    # the prebuilt directory was only read (this may run as root, whom write bits do not stop)
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in built.rglob("*")) == before

    # kernels compiled from other sources (an upgrade that changed a module a kernel calls, which
    # numba does not notice) are dropped on import and compiled afresh
    (marker,) = runtime.rglob("stream_fm.fingerprint")
    current = marker.read_text()
    marker.write_text("0" * 64 + "\n")
    stale = {**base, "NUMBA_CACHE_DIR": str(runtime)}
    report = json.loads(_run([sys.executable, "-c", WORKER, str(tmp_path / "snaps-stale")], stale))
    assert report["compiled"] > 0 and marker.read_text() == current

    # and without the prebuilt kernels, the same worker does compile: the check above can fail
    cold = {**base, "NUMBA_CACHE_DIR": str(tmp_path / "cold")}
    report = json.loads(_run([sys.executable, "-c", WORKER, str(tmp_path / "snaps-cold")], cold))
    assert report["compiled"] > 0


def test_the_fingerprint_covers_subpackages(tmp_path):
    """A kernel may call code in any module of the package: a change anywhere is a new fingerprint."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 1\n")
    (tmp_path / "notes.txt").write_text("not source\n")
    first = kernelcache.fingerprint(str(tmp_path))
    (tmp_path / "notes.txt").write_text("still not source\n")
    assert kernelcache.fingerprint(str(tmp_path)) == first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert kernelcache.fingerprint(str(tmp_path)) != first
