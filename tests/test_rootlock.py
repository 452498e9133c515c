"""One writer per snapshot root, enforced with real processes: a second writer is refused with the
holder named, readers never wait, and a holder killed with SIGKILL never blocks the next one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO, stream_fm_process

from stream_fm import RootLockedError, SparseFM
from stream_fm.serve import serving
from stream_fm.snapshots import rootlock, snapshot
from stream_fm.snapshots.snapshot_writer import SnapshotWriter

HOLDER = textwrap.dedent(
    """
    import sys, time
    from stream_fm.snapshots.rootlock import RootLock
    RootLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)


def _holding(root: Path) -> subprocess.Popen[str]:
    proc = _python(HOLDER, str(root))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _model() -> SparseFM:
    model = SparseFM(seed=3)
    model.learn_batch(
        [{"ad": f"a{i % 7}", "user": f"u{i % 5}"} for i in range(50)], [i % 3 == 0 for i in range(50)]
    )
    return model


def test_a_second_process_is_refused_with_the_holder_named_and_readers_never_wait(tmp_path):
    first = snapshot.write(tmp_path, _model())
    holder = _holding(tmp_path)
    try:
        with pytest.raises(RootLockedError) as info:
            snapshot.write(tmp_path, _model())
        assert info.value.holder["pid"] == holder.pid
        message = str(info.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message
        assert f"host {socket.gethostname()}" in message
        with pytest.raises(RootLockedError):
            SnapshotWriter(tmp_path)
        with pytest.raises(RootLockedError):
            snapshot.prune(tmp_path, keep=1)
        assert rootlock.holder(tmp_path)["pid"] == holder.pid
        # nothing was written by the refused writers; readers load as ever
        assert [name for _, name in snapshot.list_snapshots(tmp_path)] == [first.name]
        assert serving.load(tmp_path).name == first.name
        assert snapshot.read_newest(tmp_path).name == first.name
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: the next writer goes ahead at once
    assert rootlock.holder(tmp_path) is None
    second = snapshot.write(tmp_path, _model())
    assert snapshot.latest_name(tmp_path) == second.name


def test_one_process_shares_its_lock_and_frees_it_with_the_last_holder(tmp_path):
    writer = SnapshotWriter(tmp_path, every_seconds=None)
    snapshot.write(tmp_path, _model())  # the same process: allowed while its writer holds the root
    assert rootlock.holder(tmp_path)["pid"] == os.getpid()
    probe = _python(
        "import sys\nfrom stream_fm import snapshot, SparseFM\n"
        "try:\n    snapshot.write(sys.argv[1], SparseFM())\nexcept Exception as e:\n"
        "    print(type(e).__name__)\nelse:\n    print('written')",
        str(tmp_path),
    )
    assert probe.communicate(timeout=120)[0].strip() == "RootLockedError"
    writer.close()
    assert rootlock.holder(tmp_path) is None
    probe = _python(
        "import sys\nfrom stream_fm import snapshot, SparseFM\nsnapshot.write(sys.argv[1], SparseFM())",
        str(tmp_path),
    )
    assert probe.wait(timeout=120) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_lock_alive(tmp_path):
    lock = rootlock.RootLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # the child outlives the parent's hold on the lock
        time.sleep(5)
        os._exit(0)
    try:
        lock.release()
        holder = _holding(tmp_path)  # would block on the child's inherited descriptor
        holder.kill()
        holder.wait()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_two_workers_on_one_snapshot_dir_the_second_exits_2(tmp_path):
    root = tmp_path / "snaps"
    common = ["--snapshot-dir", str(root), "--snapshot-interval", "0.5", "--no-metrics"]
    log = tmp_path / "first.log"
    first = stream_fm_process(["run", *common], log)  # the paced demo stream, runs until stopped
    try:
        deadline = time.monotonic() + 120
        while snapshot.latest_name(root) is None:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)

        events = tmp_path / "events.jsonl"
        events.write_text('{"type": "impression", "id": "i1", "ts": 1, "features": {"ad": "a1"}}\n')
        for args in (["run", *common], ["replay", str(events), *common]):
            second_log = tmp_path / f"second-{args[0]}.log"
            second = stream_fm_process(args, second_log)
            assert second.wait(timeout=120) == 2, second_log.read_text()[-2000:]
            message = second_log.read_text()
            assert str(root) in message and f"pid {first.pid} on host {socket.gethostname()}" in message
            assert "One writer per snapshot directory" in message
        assert first.poll() is None  # the first one never noticed

        inspect_log = tmp_path / "inspect.log"
        assert stream_fm_process(["inspect", str(root)], inspect_log).wait(timeout=120) == 0, (
            inspect_log.read_text()
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # a restart after kill -9 is never blocked by the dead worker's lock
    log = tmp_path / "restart.log"
    restarted = stream_fm_process(["run", *common], log)
    deadline = time.monotonic() + 120
    while "restored snap-" not in log.read_text():
        assert restarted.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert rootlock.holder(root) is None  # and it let go on the way out
