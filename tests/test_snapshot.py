"""Snapshots: the format, atomic publishing, verification, fallback, retention, the periodic writer."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import categorical_stream, state_equal

from stream_fm import SnapshotError, SparseFM
from stream_fm.serve import serving
from stream_fm.snapshots import rootlock, snapshot
from stream_fm.snapshots.snapshot_writer import SnapshotWriter

MODES = [
    {},
    {"optimizer": "sgd", "l2_w": 0.01},
    {"hash_bits": 10},
    {"max_features": 40},
    {"min_count": 3},
]


def trained(params: dict | None = None, n: int = 300, seed: int = 0) -> tuple[SparseFM, list]:
    model = SparseFM(seed=7, **(params or {}))
    stream = categorical_stream(n, seed)
    for x, y in stream:
        model.learn_one(x, y)
    return model, stream


def snapshot_files(path: Path) -> list[str]:
    """The array files of a snapshot (what its manifest lists)."""
    return sorted(
        p.name for p in path.iterdir() if p.name not in (snapshot.MANIFEST, snapshot.MANIFEST_SHA256)
    )


# every file a write of ``trained()`` creates: its arrays, the manifest, its checksum, LATEST
FILES_PER_WRITE = len(trained()[0].export_state()[0]) + 3


# ---------------------------------------------------------------- round trip and format


@pytest.mark.parametrize("params", MODES, ids=lambda p: ",".join(p) or "defaults")
def test_restored_model_continues_exactly_as_if_never_interrupted(tmp_path, params):
    model, _ = trained(params)
    path = snapshot.write(tmp_path, model)
    restored, _ = snapshot.restore(path)
    assert state_equal(model, restored)
    probe = [x for x, _ in categorical_stream(100, seed=5)]
    assert restored.predict_proba_batch(probe).tolist() == model.predict_proba_batch(probe).tolist()
    more = categorical_stream(300, seed=9)
    for x, y in more:
        model.learn_one(x, y)
        restored.learn_one(x, y)
    assert state_equal(model, restored)
    assert restored.predict_proba_batch(probe).tolist() == model.predict_proba_batch(probe).tolist()


def test_manifest_describes_every_file(tmp_path):
    model, _ = trained()
    extra = snapshot.Extra(
        arrays={"pending_ids": np.arange(5, dtype=np.int64)},
        meta={"join": {"window": 600}},
        offsets={"events": {"0": 41, "1": 7}},
    )
    first = snapshot.write(tmp_path, model, extra)
    second = snapshot.write(tmp_path, model)
    manifest = json.loads((second / snapshot.MANIFEST).read_text())
    assert manifest["format_version"] == snapshot.FORMAT_VERSION
    assert manifest["sequence"] == 2 and manifest["name"] == second.name
    assert manifest["created_at"].endswith("Z") and "T" in manifest["created_at"]
    assert manifest["samples_seen"] == model.samples_seen and manifest["n_features"] == model.n_features
    assert manifest["model"]["config"] == model.get_config()
    assert manifest["offsets"] == {}
    assert (tmp_path / snapshot.LATEST).read_text() == second.name + "\n"

    manifest = json.loads((first / snapshot.MANIFEST).read_text())
    assert manifest["offsets"] == {"events": {"0": 41, "1": 7}} and manifest["extra"] == {
        "join": {"window": 600}
    }
    assert sorted(manifest["files"]) == snapshot_files(first)
    for name, info in manifest["files"].items():
        data = (first / name).read_bytes()
        assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
        array = np.load(first / name, allow_pickle=False)  # never needs pickle
        assert (
            array.dtype != object and array.dtype.str == info["dtype"] and list(array.shape) == info["shape"]
        )
    snap = snapshot.read(first)
    assert snap.extra_arrays["pending_ids"].tolist() == [0, 1, 2, 3, 4]
    assert snap.offsets == {"events": {"0": 41, "1": 7}}


def test_any_key_string_round_trips(tmp_path):
    keys = ["ünï cødé ✓", "new\nline", "a=b=c", "quo\"te's", "", "tab\there", "\ud800 lone surrogate", "🦀"]
    model = SparseFM(seed=1)
    for i, value in enumerate(keys):
        model.learn_one({f"f{i}": value, "we=ird\n": value}, i % 2 == 0)
    restored, _ = snapshot.restore(snapshot.write(tmp_path, model))
    assert restored._index.as_dict() == model._index.as_dict()
    for value in keys:
        x = {"f0": value, "we=ird\n": value}
        assert serving.load(tmp_path).predict(x) == model.predict_proba_one(x)[True]


# ---------------------------------------------------------------- corruption and fallback


def corrupt_flip(path: Path, name: str) -> None:
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))


def corrupt_truncate(path: Path, name: str) -> None:
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) - 3])


def corrupt_delete(path: Path, name: str) -> None:
    (path / name).unlink()


@pytest.mark.parametrize("damage", [corrupt_flip, corrupt_truncate, corrupt_delete])
def test_damage_to_any_file_is_detected_and_the_previous_snapshot_is_used(tmp_path, damage, caplog):
    model, stream = trained()
    good = snapshot.write(tmp_path, model)
    expected = serving.load(good).predict(stream[0][0])
    model.learn_one(*stream[1])
    for name in [
        *snapshot_files(snapshot.write(tmp_path, model)),
        snapshot.MANIFEST,
        snapshot.MANIFEST_SHA256,
    ]:
        bad = snapshot.write(tmp_path, model)
        damage(bad, name)
        with pytest.raises(SnapshotError) as info:
            snapshot.read(bad)
        assert bad.name in str(info.value)
        # the root falls back past every damaged snapshot to the last good one, and says so
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stream_fm.snapshots.snapshot"):
            predictor = serving.load(tmp_path)
        assert predictor.name != bad.name
        assert bad.name in caplog.text
    assert serving.load(tmp_path).predict(stream[0][0]) != expected  # the newest intact one (learned more)


@pytest.mark.parametrize(
    "garbage", [b"", b"snap-nonsense\n", b"\xff\xfe garbage", b"snap-0000000099-20261125T101500Z"]
)
def test_garbage_in_latest_falls_back_to_the_newest_valid_snapshot(tmp_path, garbage, caplog):
    model, _ = trained()
    snapshot.write(tmp_path, model)
    newest = snapshot.write(tmp_path, model)
    (tmp_path / snapshot.LATEST).write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        assert serving.load(tmp_path).name == newest.name
    assert "LATEST" in caplog.text


def test_no_valid_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(SnapshotError, match="no valid snapshot"):
        serving.load(tmp_path)
    model, _ = trained()
    corrupt_flip(snapshot.write(tmp_path, model), "model.V.npy")
    with pytest.raises(SnapshotError, match=r"model\.V\.npy does not match its sha256"):
        serving.load(tmp_path)


# ---------------------------------------------------------------- failed writes


class FullDisk:
    """A file that accepts ``budget`` bytes, then fails as a full disk does."""

    def __init__(self, path: Path, budget: int) -> None:
        self.f = open(path, "xb")
        self.budget = budget

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("fail_at", range(FILES_PER_WRITE))
def test_a_write_that_fails_midway_leaves_the_previous_snapshot_intact(tmp_path, monkeypatch, fail_at):
    model, stream = trained()
    before = snapshot.write(tmp_path, model)
    probe = stream[0][0]
    expected = serving.load(tmp_path).predict(probe)
    model.learn_one(*stream[1])
    opened = []
    real_open = snapshot._open_new

    def failing_open(path: Path):
        opened.append(path.name)
        if len(opened) - 1 == fail_at:  # this file (an array, the manifest, LATEST) hits a full disk
            return FullDisk(path, budget=10)
        return real_open(path)

    monkeypatch.setattr(snapshot, "_open_new", failing_open)
    with pytest.raises(SnapshotError, match="No space left"):
        snapshot.write(tmp_path, model)
    monkeypatch.undo()
    assert len(opened) == fail_at + 1, "every file a write creates was given the chance to fail"
    # no debris (the writer lock file stays: it is never deleted)
    assert sorted(p.name for p in tmp_path.iterdir()) == [rootlock.LOCK_FILE, snapshot.LATEST, before.name]
    assert snapshot.latest_name(tmp_path) == before.name
    assert serving.load(tmp_path).predict(probe) == expected
    after = snapshot.write(tmp_path, model)  # the next attempt succeeds
    assert snapshot.latest_name(tmp_path) == after.name


# ---------------------------------------------------------------- retention


def test_retention_keeps_exactly_n_and_never_the_latest_or_one_being_read(tmp_path):
    model, _ = trained()
    paths = [snapshot.write(tmp_path, model, keep=3) for _ in range(6)]
    assert [name for _, name in snapshot.list_snapshots(tmp_path)] == [p.name for p in paths[-3:]]

    # a reader holds the oldest one: it survives a retention pass, and goes at the next
    held = paths[-3]
    with snapshot._reading(held):
        snapshot.write(tmp_path, model, keep=2)
        assert held.exists()
    snapshot.prune(tmp_path, keep=2)
    assert not held.exists()
    assert len(snapshot.list_snapshots(tmp_path)) == 2

    # LATEST pointing at an older snapshot (an operator's rollback) protects it
    oldest = snapshot.list_snapshots(tmp_path)[0][1]
    (tmp_path / snapshot.LATEST).write_text(oldest + "\n")
    snapshot.write(tmp_path, model)  # moves LATEST again, so roll back once more
    (tmp_path / snapshot.LATEST).write_text(oldest + "\n")
    snapshot.prune(tmp_path, keep=1)
    assert (tmp_path / oldest).exists()
    with pytest.raises(SnapshotError, match="at least 1"):
        snapshot.prune(tmp_path, keep=0)


# ---------------------------------------------------------------- concurrent reader


READER = textwrap.dedent(
    """
    import json, sys, time
    from stream_fm import SnapshotError
    from stream_fm.serve import serving
    root, deadline = sys.argv[1], time.time() + float(sys.argv[2])
    probe = json.loads(sys.argv[3])
    seen = set()
    while time.time() < deadline:
        try:
            p = serving.load(root)
        except SnapshotError as e:
            if "no valid snapshot: none found" in str(e):
                continue  # the writer has not published yet
            print("ERROR", e); sys.exit(1)
        expected = p.manifest["extra"]["probe"]
        if p.predict(probe) != expected or p.samples_seen != p.manifest["extra"]["samples"]:
            print("MIXED", p.name); sys.exit(1)
        seen.add(p.name)
    print(len(seen))
    """
)


@pytest.mark.slow
def test_a_reader_never_sees_a_partial_snapshot(tmp_path):
    model, stream = trained()
    probe = stream[0][0]
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path), "8", json.dumps(probe)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    more = categorical_stream(4000, seed=3)
    i = 0
    while reader.poll() is None:
        for x, y in more[i % 3000 : i % 3000 + 20]:
            model.learn_one(x, y)
        i += 20
        extra = snapshot.Extra(
            meta={"probe": model.predict_proba_one(probe)[True], "samples": model.samples_seen}
        )
        snapshot.write(tmp_path, model, extra, keep=2)
    out = reader.stdout.read()
    assert reader.returncode == 0, out
    assert int(out.split()[-1]) >= 5, f"the reader saw too few distinct snapshots to mean anything: {out}"


# ---------------------------------------------------------------- the periodic writer


def test_writer_snapshots_by_sample_count_in_the_background(tmp_path):
    model, stream = trained()
    writer = SnapshotWriter(tmp_path, every_seconds=None, every_samples=100, keep=2)
    written = 0
    for x, y in stream * 2:
        model.learn_one(x, y)
        written += writer.maybe_write(model, lambda: snapshot.Extra(offsets={"t": {"0": model.samples_seen}}))
        writer.wait()
    # counting starts at the first call (sample 301): writes at 401, 501, ..., 801
    assert written == writer.written == 5
    assert writer.failures == 0 and writer.last_bytes > 0 and writer.last_pause_seconds > 0
    snap = snapshot.read(writer.last_path)
    assert snap.offsets == {"t": {"0": 801}} and snap.manifest["samples_seen"] == 801
    assert len(snapshot.list_snapshots(tmp_path)) == 2


def test_writer_skips_a_trigger_while_a_write_is_in_flight(tmp_path, monkeypatch):
    model, _ = trained()
    release = threading.Event()
    real_publish = snapshot.Capture.publish

    def slow_publish(self, root, keep=None):
        release.wait(10)
        return real_publish(self, root, keep)

    monkeypatch.setattr(snapshot.Capture, "publish", slow_publish)
    writer = SnapshotWriter(tmp_path, every_seconds=0.0, keep=5)
    assert writer.maybe_write(model)
    assert not writer.maybe_write(model)  # one in flight: skipped, taken at a later call
    release.set()
    writer.wait()
    assert writer.maybe_write(model)
    writer.wait()
    assert writer.written == 2


def test_a_failed_background_write_is_counted_and_retried(tmp_path, monkeypatch, caplog):
    model, _ = trained()
    writer = SnapshotWriter(tmp_path, every_seconds=0.0, keep=5)
    monkeypatch.setattr(snapshot, "_open_new", lambda path: FullDisk(path, budget=0))
    with caplog.at_level(logging.ERROR):
        assert writer.maybe_write(model)  # does not raise
        writer.wait()
    assert writer.failures == 1 and writer.written == 0 and "will retry" in caplog.text
    monkeypatch.undo()
    assert writer.write_now(model)
    assert writer.written == 1 and writer.last_success is not None
    assert snapshot.latest_name(tmp_path) == writer.last_path.name


def test_capture_is_consistent_while_the_model_keeps_learning(tmp_path):
    """The copy is taken before maybe_write returns: learning afterwards does not leak into it."""
    model, stream = trained()
    expected = model.export_state()
    writer = SnapshotWriter(tmp_path, every_seconds=0.0)
    writer.maybe_write(model)
    for x, y in stream:
        model.learn_one(x, y)
    writer.wait()
    restored, _ = snapshot.restore(writer.last_path)
    arrays, meta = restored.export_state()
    assert meta == expected[1]
    assert all(np.array_equal(arrays[k], expected[0][k]) for k in arrays)


WRITER = textwrap.dedent(
    """
    import sys
    from stream_fm import SparseFM
    from stream_fm.snapshots import snapshot
    model = SparseFM(seed=1)
    i = 0
    while True:
        xs = [{"user": f"u{i % 997}", "ad": f"a{j}"} for j in range(2000)]
        model.learn_batch(xs, [j % 3 == 0 for j in range(2000)])
        snapshot.write(sys.argv[1], model, snapshot.Extra(meta={"samples": model.samples_seen}), keep=3)
        i += 1
        print(i, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35, 0.5, 0.8])
def test_a_writer_killed_at_any_instant_leaves_latest_complete(tmp_path, delay):
    """SIGKILL a process that publishes snapshots back to back, at a different instant each time."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "1"  # one snapshot is out: from here on, kill it mid-flight
    threading.Event().wait(delay)
    proc.kill()
    proc.wait()
    latest = snapshot.latest_name(tmp_path)
    snap = snapshot.read(tmp_path / latest)  # LATEST names a complete, valid snapshot
    assert snap.manifest["samples_seen"] == snap.extra["samples"]
    assert serving.load(tmp_path).name == latest
    snapshot.prune(tmp_path, keep=3)  # and the dead writer's debris goes at the next retention pass
    kept = (snapshot.LATEST, rootlock.LOCK_FILE)
    assert all(p.name in kept or p.name.startswith("snap-") for p in tmp_path.iterdir())


def test_an_unknown_format_version_is_refused_clearly(tmp_path):
    """A snapshot from a future release: a clear refusal naming both versions, nothing half-loaded."""
    model, _ = trained()
    path = snapshot.write(tmp_path, model)
    manifest = json.loads((path / snapshot.MANIFEST).read_text())
    manifest["format_version"] = 2
    body = json.dumps(manifest).encode()
    (path / snapshot.MANIFEST).write_bytes(body)
    (path / snapshot.MANIFEST_SHA256).write_text(hashlib.sha256(body).hexdigest() + "\n")
    with pytest.raises(SnapshotError, match=r"format_version 2 is not supported \(expected 1\)"):
        snapshot.read(path)
