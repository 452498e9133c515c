"""The exporter: every series with its type and labels, values equal to what the worker did."""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import stream_fm
from stream_fm.ops.metrics import MetricsServer, registry_for
from stream_fm.stream.events import REASONS
from stream_fm.stream.sources import DemoSource, FileSource
from stream_fm.stream.worker import Worker, WorkerConfig

# name (without _total for counters) -> (type, label names)
SERIES = {
    "stream_fm_events": ("counter", {"type"}),
    "stream_fm_bad_events": ("counter", {"reason"}),
    "stream_fm_dead_letter": ("counter", set()),
    "stream_fm_samples_trained": ("counter", {"label"}),
    "stream_fm_progressive_logloss": ("gauge", set()),
    "stream_fm_progressive_auc": ("gauge", set()),
    "stream_fm_ctr": ("gauge", set()),
    "stream_fm_model_features": ("gauge", set()),
    "stream_fm_model_evictions": ("counter", set()),
    "stream_fm_model_skipped_updates": ("counter", set()),
    "stream_fm_model_memory_bytes": ("gauge", set()),
    "stream_fm_model_calibration": ("gauge", {"part"}),
    "stream_fm_join_pending": ("gauge", set()),
    "stream_fm_join_late_clicks": ("counter", set()),
    "stream_fm_join_duplicates": ("counter", set()),
    "stream_fm_join_overflow": ("counter", set()),
    "stream_fm_consumer_lag": ("gauge", {"topic", "partition"}),
    "stream_fm_consumer_offset": ("gauge", {"topic", "partition"}),
    "stream_fm_consumer_assigned_partitions": ("gauge", set()),
    "stream_fm_consumer_group_members": ("gauge", set()),
    "stream_fm_broker_up": ("gauge", set()),
    "stream_fm_batch_seconds": ("histogram", set()),
    "stream_fm_event_time_lag_seconds": ("gauge", set()),
    "stream_fm_snapshot_last_success_timestamp_seconds": ("gauge", set()),
    "stream_fm_snapshot_seconds": ("histogram", set()),
    "stream_fm_snapshot_bytes": ("gauge", set()),
    "stream_fm_snapshot_failures": ("counter", set()),
    "stream_fm_build_info": ("gauge", {"version"}),  # an Info: a gauge of 1 in the text format
}

IMPRESSIONS = [
    {"type": "impression", "id": f"i{i}", "ts": 100.0 + i, "features": {"ad": f"a{i % 3}"}} for i in range(40)
]
CLICKS = [{"type": "click", "impression_id": f"i{i}", "ts": 101.0 + i} for i in range(0, 40, 4)]
BAD = [b"{nope", b'{"type": "impression", "id": "x", "ts": 1, "features": {"p": null}}', b'{"type": 3}']


@pytest.fixture
def fed_worker(tmp_path):
    """A worker that has learned a known file: 40 impressions, 10 clicks, 3 bad lines, and a
    final impression far in the future that closes every window."""
    lines = (
        [orjson.dumps(e) for e in IMPRESSIONS[:20]]
        + BAD
        + [orjson.dumps(e) for e in IMPRESSIONS[20:] + CLICKS]
    )
    lines.append(orjson.dumps({"type": "impression", "id": "end", "ts": 1e6, "features": {}}))
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    worker = Worker(FileSource(path), WorkerConfig(snapshot_dir=tmp_path / "snaps", attribution_window=600))
    registry = registry_for(worker)
    worker.run()
    return worker, registry


@pytest.fixture
def demo_worker_after_a_short_run(tmp_path):
    """The built-in demo source for 20,000 events (unpaced), as `stream-fm run` would."""
    worker = Worker(
        DemoSource(rate=None, limit=20_000),
        WorkerConfig(snapshot_dir=tmp_path / "demo", attribution_window=120),
    )
    registry = registry_for(worker)
    worker.run()
    return worker, registry


def test_every_series_exists_with_its_type_and_labels(demo_worker_after_a_short_run):
    worker, registry = demo_worker_after_a_short_run
    assert (
        registry.get_sample_value("stream_fm_events_total", {"type": "impression"})
        == worker.stats.events["impression"]
        > 0
    )
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    for name, (kind, labels) in SERIES.items():
        assert name in families, f"{name} is missing"
        family = families[name]
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            if kind == "histogram":
                assert set(sample.labels) - {"le"} == labels
            else:
                assert labels <= set(sample.labels), (name, sample.labels)
    assert {s.labels["reason"] for s in families["stream_fm_bad_events"].samples} == set(REASONS)
    assert "process_resident_memory_bytes" in families


def test_values_agree_with_what_the_worker_did(fed_worker):
    worker, registry = fed_worker
    value = registry.get_sample_value
    assert value("stream_fm_events_total", {"type": "impression"}) == 41
    assert value("stream_fm_events_total", {"type": "click"}) == 10
    assert value("stream_fm_events_total", {"type": "sample"}) == 0
    assert value("stream_fm_bad_events_total", {"reason": "json"}) == 1
    assert value("stream_fm_bad_events_total", {"reason": "feature"}) == 1
    assert value("stream_fm_bad_events_total", {"reason": "schema"}) == 1
    assert value("stream_fm_dead_letter_total") == 3
    # every impression but the last trained once; the clicked ones (every 4th) as positives
    assert value("stream_fm_samples_trained_total", {"label": "1"}) == 10
    assert value("stream_fm_samples_trained_total", {"label": "0"}) == 30
    assert value("stream_fm_model_features") == worker.model.n_features == 3
    parts = ("intercept", "linear", "pairwise", "offset")
    gains = [value("stream_fm_model_calibration", {"part": p}) for p in parts]
    assert gains == list(worker.model.calibration) and gains != [1.0, 1.0, 1.0, 0.0]  # it learned
    assert value("stream_fm_join_pending") == 1
    assert value("stream_fm_consumer_offset", {"topic": "file", "partition": "0"}) == 54  # lines
    assert value("stream_fm_ctr") == pytest.approx(0.25)
    assert 0 < value("stream_fm_progressive_logloss") < 1 and not math.isnan(
        value("stream_fm_progressive_auc")
    )
    assert value("stream_fm_batch_seconds_count") == worker.batches
    assert value("stream_fm_snapshot_seconds_count") == 1  # the final snapshot
    assert value("stream_fm_snapshot_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert value("stream_fm_snapshot_bytes") > 0 and value("stream_fm_snapshot_failures_total") == 0
    build = next(m for m in registry.collect() if m.name == "stream_fm_build").samples[0]
    assert build.value == 1 and build.labels["version"] == stream_fm.__version__


def test_counters_start_at_zero_in_a_restarted_process(fed_worker, tmp_path):
    """Totals continue in the snapshot, but a new process's counters start at 0 (no fake spike)."""
    worker, _ = fed_worker
    again = Worker(FileSource(worker.source.path), WorkerConfig(snapshot_dir=tmp_path / "snaps"))
    again.restore()
    registry = registry_for(again)
    assert again.stats.events["impression"] == 41
    assert registry.get_sample_value("stream_fm_events_total", {"type": "impression"}) == 0


def test_health_and_readiness_endpoints(tmp_path):
    source = DemoSource(rate=500)
    worker = Worker(source, WorkerConfig(snapshot_dir=tmp_path / "snaps", poll_timeout=0.05))
    server = MetricsServer(worker, "127.0.0.1", 0).start()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))

    def status(path: str) -> int:
        try:
            return urllib.request.urlopen(server.url + path, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert status("/healthz") == 200
        assert status("/readyz") == 503  # not started
        thread.start()
        deadline = time.monotonic() + 20
        while status("/readyz") != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
        assert "stream_fm_consumer_assigned_partitions 1.0" in body
        assert status("/nothing") == 404
    finally:
        stop.set()
        thread.join(30)
        server.stop()


def test_rolling_quality_asked_while_the_window_fills_reads_one_window(monkeypatch):
    """A scrape runs on the HTTP thread while the worker's thread adds samples: while the window
    fills, its size can grow between two reads, and slices of two sizes made a scrape fail."""
    import numpy as np

    from stream_fm.ops.quality import RollingQuality

    q = RollingQuality(window=1000)
    rng = np.random.default_rng(3)
    q.update(rng.random(500), (rng.random(500) < 0.3).astype(float))
    expected = (q.logloss(), q.auc(), q.ctr())
    growing = iter(range(500, 100_000, 7))  # every read of the size sees more samples
    monkeypatch.setattr(RollingQuality, "size", property(lambda self: next(growing)))
    got = (q.logloss(), q.auc(), q.ctr())
    assert all(math.isfinite(v) for v in got)
    assert got != expected  # (the later window, in full: the buffers hold zeros past 500)
