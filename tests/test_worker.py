"""The worker on its file and demo sources (no broker): replay, resume, crash, dead letters, config."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from helpers import stream_fm_process

from stream_fm import ConfigError, SparseFM
from stream_fm.ops import cli
from stream_fm.snapshots import snapshot
from stream_fm.stream.demo import DemoStream
from stream_fm.stream.sources import FileSource
from stream_fm.stream.worker import Stats, Worker, WorkerConfig

BAD_LINES = [
    b"{oops",
    b'{"type": "click"}',
    b'{"type": "impression", "id": "x", "ts": 1, "features": {"a": [1]}}',
]


def write_events(path: Path, n: int, bad_every: int = 0) -> tuple[int, list[int]]:
    """The first ``n`` demo events as JSON lines, with a bad line every ``bad_every`` lines."""
    bad = []
    with open(path, "wb") as f:
        for i, (_, event) in enumerate(DemoStream(seed=5)):
            if i >= n:
                break
            if bad_every and i % bad_every == bad_every - 1:
                bad.append(i)
                f.write(BAD_LINES[len(bad) % len(BAD_LINES)] + b"\n")
            else:
                f.write(orjson.dumps(event) + b"\n")
    return n, bad


def final_offset(root: Path) -> int:
    try:
        return final(root).offsets["file"]["0"]
    except (snapshot.SnapshotError, KeyError):  # retention raced us: ask again
        return 0


def final(root: Path) -> snapshot.Snapshot:
    return snapshot.read(root / snapshot.latest_name(root))


def test_replay_learns_a_file_to_its_end_and_resumes_without_double_counting(tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    n, bad = write_events(events, 3000, bad_every=97)
    root, dead = tmp_path / "snaps", tmp_path / "dead.jsonl"
    args = [
        "replay",
        str(events),
        "--snapshot-dir",
        str(root),
        "--dead-letter-file",
        str(dead),
        "--no-metrics",
    ]
    assert cli.main([*args, "--attribution-window", "30"]) == 0
    first = final(root)
    assert first.offsets == {"file": {"0": n}}
    stats = first.extra["stats"]
    assert sum(stats["events"].values()) + sum(stats["bad_events"].values()) == n
    assert sum(stats["bad_events"].values()) == len(bad)
    assert first.manifest["samples_seen"] == stats["trained"]["0"] + stats["trained"]["1"] > 0
    lines = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert [int(d["source"].rsplit("/", 1)[1]) for d in lines] == bad
    assert {base64.b64decode(d["value_b64"]) for d in lines} == set(BAD_LINES)

    # a second replay into the same directory resumes at the end: nothing is learned twice
    assert cli.main([*args, "--attribution-window", "30"]) == 0
    again = final(root)
    assert again.name != first.name and again.extra["stats"] == stats
    assert again.manifest["samples_seen"] == first.manifest["samples_seen"]


@pytest.mark.slow
def test_replay_killed_mid_file_ends_with_the_model_of_an_uninterrupted_run(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, 150_000, bad_every=501)
    common = [
        "--attribution-window",
        "30",
        "--snapshot-interval",
        "0.2",
        "--batch-size",
        "500",
        "--no-metrics",
    ]
    calm = tmp_path / "calm"
    assert cli.main(["replay", str(events), "--snapshot-dir", str(calm), *common]) == 0

    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    for past in (20_000, 60_000):  # kill -9 once the newest snapshot has passed these lines
        proc = stream_fm_process(["replay", str(events), "--snapshot-dir", str(killed), *common], log)
        deadline = time.monotonic() + 120
        while snapshot.latest_name(killed) is None or final_offset(killed) < past:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert final(killed).offsets["file"]["0"] < 150_000
    proc = stream_fm_process(["replay", str(events), "--snapshot-dir", str(killed), *common], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]

    a, b = final(killed), final(calm)
    assert a.extra["stats"] == b.extra["stats"] and a.offsets == b.offsets
    for name, array in a.model_arrays.items():
        assert np.array_equal(array, b.model_arrays[name]), name
    assert np.array_equal(a.extra_arrays["join_state"], b.extra_arrays["join_state"])


def test_demo_run_stops_at_its_limit_with_a_final_snapshot(tmp_path):
    root = tmp_path / "snaps"
    args = [
        "run",
        "--snapshot-dir",
        str(root),
        "--metrics-port",
        "0",
        "--demo-rate",
        "0",
        "--demo-limit",
        "20000",
    ]
    assert cli.main(args) == 0
    snap = final(root)
    assert snap.offsets == {"demo": {"0": 20000}}
    # ~380 s of demo event time against its 120 s window: most impressions have closed
    assert snap.manifest["samples_seen"] > 10_000 and 0 < snap.extra["stats"]["trained"]["1"] < 5000
    assert cli.main([*args[:-1], "25000"]) == 0  # resumes: the demo stream regenerates to its offset
    assert final(root).offsets == {"demo": {"0": 25000}}


def test_a_snapshot_with_other_model_settings_is_refused(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, 500)
    config = WorkerConfig(snapshot_dir=tmp_path / "snaps", model={"n_factors": 8})
    Worker(FileSource(events), config).run()
    config.model = {"n_factors": 4, "learning_rate": 0.1}
    with pytest.raises(ConfigError) as info:
        Worker(FileSource(events), config).restore()
    message = str(info.value)
    assert "n_factors: snapshot 8, configured 4" in message and "learning_rate" in message


def test_a_cluster_members_snapshot_is_refused_naming_its_sync_topic_and_inspect_describes_it(
    tmp_path, capsys
):
    events = tmp_path / "events.jsonl"
    write_events(events, 10)
    config = WorkerConfig(snapshot_dir=tmp_path / "snaps")
    cluster = {"sync_topic": "events-sync", "merged": 12, "sync_offset": 345}
    meta = {"stats": Stats().to_json(), "cluster": cluster}
    snapshot.write(config.snapshot_dir, SparseFM(), snapshot.Extra(meta=meta))
    with pytest.raises(ConfigError, match=r"cluster\.sync_topic.*'events-sync'.*cluster member's snapshot"):
        Worker(FileSource(events), config).restore()
    assert cli.main(["inspect", str(config.snapshot_dir)]) == 0
    assert "sync topic 'events-sync', 12 rounds folded, replays from offset 345" in capsys.readouterr().out


PREVIOUS_DEFAULTS = {  # the normalized optimizer's settings before calibration (state_format 2)
    "learning_rate": 1.5,
    "factor_learning_rate": 0.7,
    "bias_learning_rate": 1.0,
    "initial_accumulator": 0.2,
}
# what each earlier format lacked: its length of the dense state, the columns after a normalized
# row's factor accumulators, and the settings it came before (each made with them off)
_EARLIER = {
    2: (3, 1, ("calibrate", "center", "average_intercept", "nonnegative_gains", "dense_factors")),
    3: (17, 1, ("center", "average_intercept", "nonnegative_gains", "dense_factors")),
    4: (20, 2, ("nonnegative_gains", "dense_factors")),
    5: (20, 2, ("dense_factors",)),
}


def _as_state_format(path: Path, version: int) -> None:
    """Rewrite a snapshot as release ``version`` wrote it (checksums and all): its dense state
    and columns after a row's factor accumulators, without the later settings."""
    import hashlib
    import json

    manifest = json.loads((path / snapshot.MANIFEST).read_bytes())
    length, extra, later = _EARLIER[version]
    k = manifest["model"]["config"]["n_factors"]
    for name, cut in (("bias", lambda a: a[:length]), ("gV", lambda a: a[:, : k + extra])):
        file = path / f"model.{name}.npy"
        np.save(file, cut(np.load(file)))
        data = file.read_bytes()
        info = manifest["files"][file.name]
        info.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data), shape=list(np.load(file).shape))
    manifest["model"]["state_format"] = version
    for name in later:
        del manifest["model"]["config"][name]
    body = json.dumps(manifest).encode()
    (path / snapshot.MANIFEST).write_bytes(body)
    (path / snapshot.MANIFEST_SHA256).write_text(hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize(
    ("version", "settings", "refused"),
    [
        (2, dict(PREVIOUS_DEFAULTS, calibrate=False), ["calibrate: snapshot False, configured True",
                                                       "learning_rate: snapshot 1.5, configured 2.0"]),
        (3, {}, ["center: snapshot False, configured True",
                 "average_intercept: snapshot False, configured True"]),
        (4, {}, ["nonnegative_gains: snapshot False, configured True"]),
        (5, {}, ["dense_factors: snapshot False, configured True"]),
    ],
)  # fmt: skip
def test_a_snapshot_of_a_previous_release_is_served_refused_with_new_defaults_and_continued(
    tmp_path, version, settings, refused
):
    from stream_fm.serve import serving

    events = tmp_path / "events.jsonl"
    write_events(events, 1500)
    root = tmp_path / "snaps"
    later = _EARLIER[version][2]
    old = dict(settings, **{name: False for name in later if name != "calibrate"})  # as that release learned
    worker = Worker(FileSource(events), WorkerConfig(snapshot_dir=root, model=old))
    worker.run()
    snap = final(root)
    _as_state_format(snap.path, version)
    probe = [
        {"user": f"u{i}", "ad": f"a{i % 7}", "site": f"s{i % 5}", "position": 1.0 + i % 3} for i in range(50)
    ]
    want = worker.model.predict_proba_batch(probe)
    assert np.ptp(want) > 0.001  # features it learned
    assert np.array_equal(serving.load(root).predict_batch(probe), want)  # serving reads it
    with pytest.raises(ConfigError) as info:
        Worker(FileSource(events), WorkerConfig(snapshot_dir=root)).restore()  # the new defaults
    for line in refused:
        assert line in str(info.value)
    again = Worker(FileSource(events), WorkerConfig(snapshot_dir=root, model=old))
    again.restore()  # its own settings (the later ones off, as that release had them): bit for bit
    assert not any(getattr(again.model, name) for name in later)
    assert np.array_equal(again.model.predict_proba_batch(probe), want)


def test_all_snapshots_corrupt_is_an_error_not_a_silent_fresh_start(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, 500)
    config = WorkerConfig(snapshot_dir=tmp_path / "snaps")
    Worker(FileSource(events), config).run()
    for path in (tmp_path / "snaps").glob("snap-*/model.w.npy"):
        path.write_bytes(b"garbage")
    with pytest.raises(snapshot.SnapshotError, match="no valid snapshot"):
        Worker(FileSource(events), config).restore()


def test_a_snapshot_with_the_previous_join_state_continues_as_if_never_stopped(tmp_path):
    """Before joins per partition, a snapshot held one join for every partition (format 1). A
    worker restoring one takes it over: on a one-partition file the result is the model of an
    uninterrupted run, bit for bit, and the join state it then saves is of the current format."""
    import hashlib
    import json

    from stream_fm.stream.join import Joins

    part, whole = tmp_path / "part.jsonl", tmp_path / "whole.jsonl"
    write_events(part, 2000)
    write_events(whole, 4000)  # (the same events, and more)
    root = tmp_path / "snaps"
    Worker(FileSource(part), WorkerConfig(snapshot_dir=root)).run()
    path = final(root).path
    state = orjson.loads(final(root).extra_arrays["join_state"].tobytes())
    [(topic, partition, joiner)] = state["partitions"]
    assert (topic, partition) == ("file", 0) and joiner["pending"]
    file = path / "extra.join_state.npy"  # as the previous version wrote it: the joiner alone
    np.save(file, np.frombuffer(orjson.dumps(joiner), np.uint8))
    manifest = json.loads((path / snapshot.MANIFEST).read_bytes())
    data = file.read_bytes()
    manifest["files"][file.name].update(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), shape=list(np.load(file).shape)
    )
    body = json.dumps(manifest).encode()
    (path / snapshot.MANIFEST).write_bytes(body)
    (path / snapshot.MANIFEST_SHA256).write_text(hashlib.sha256(body).hexdigest())

    resumed = Worker(FileSource(whole), WorkerConfig(snapshot_dir=root))
    resumed.restore()
    assert resumed.joins.inherited is not None and resumed.joiner.pending == len(joiner["pending"])
    resumed.run()
    calm = Worker(FileSource(whole), WorkerConfig(snapshot_dir=tmp_path / "calm"))
    calm.run()
    a, b = final(root), final(tmp_path / "calm")
    assert a.extra["stats"] == b.extra["stats"] and a.offsets == b.offsets
    for name, array in a.model_arrays.items():
        assert np.array_equal(array, b.model_arrays[name]), name
    saved = orjson.loads(a.extra_arrays["join_state"].tobytes())
    assert saved["format"] == Joins.FORMAT and saved["inherited"] is not None
