"""Prometheus metrics, health and readiness for the worker.

``MetricsServer(worker, host, port)`` serves:

- ``/metrics``: the ``stream_fm_*`` series below, plus the client's process and GC series;
- ``/healthz``: 200 while the process runs;
- ``/readyz``: 200 while the source is ready (Kafka: broker reachable and partitions assigned;
  file and demo: running), else 503.

Nothing here touches the hot path: the worker keeps plain counters, and a custom collector reads
them when Prometheus scrapes. Only two histograms are observed by the worker, once per batch and
once per snapshot. Counters count from process start (a restart resets them, as Prometheus
expects, even though the worker's own totals continue from its snapshot).
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numba
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from stream_fm import __version__
from stream_fm.snapshots import snapshot
from stream_fm.stream.events import REASONS
from stream_fm.stream.worker import Worker

__all__ = ["DEFAULT_PORT", "MetricsServer", "WorkerCollector", "registry_for"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
EVENT_TYPES = ("impression", "click", "sample")
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WorkerCollector(Collector):
    """Reads a worker's counters at scrape time (on the HTTP thread: plain reads only)."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.started_model = (worker.model.n_evicted, worker.model.n_skipped)
        self.started_join = _join_counts(worker)

    def collect(self) -> Iterator[Metric]:
        w = self.w
        stats, base = w.stats, w.baseline
        events = CounterMetricFamily("stream_fm_events", "Valid events consumed, by type", labels=["type"])
        for kind in EVENT_TYPES:
            events.add_metric([kind], stats.events[kind] - base.events[kind])
        yield events
        bad = CounterMetricFamily("stream_fm_bad_events", "Messages refused, by reason", labels=["reason"])
        for reason in REASONS:
            bad.add_metric([reason], stats.bad_events[reason] - base.bad_events[reason])
        yield bad
        yield _counter(
            "stream_fm_dead_letter", "Messages sent to the dead-letter destination", w.dead_letters.sent
        )
        trained = CounterMetricFamily(
            "stream_fm_samples_trained", "Samples learned, by label", labels=["label"]
        )
        for label in ("0", "1"):
            trained.add_metric([label], stats.trained[label] - base.trained[label])
        yield trained

        q = w.quality
        window = f" over the latest {q.window} samples, each scored before it was learned"
        yield _gauge("stream_fm_progressive_logloss", "Log loss" + window, q.logloss())
        yield _gauge("stream_fm_progressive_auc", "Exact ROC AUC" + window, q.auc())
        yield _gauge("stream_fm_ctr", "Share of positives" + window, q.ctr())

        m = w.model
        yield _gauge("stream_fm_model_features", "Features held by the model", m.n_features)
        yield _counter(
            "stream_fm_model_evictions",
            "Features evicted (max_features)",
            m.n_evicted - self.started_model[0],
        )
        yield _counter(
            "stream_fm_model_skipped_updates",
            "Updates skipped: they would have left NaN/inf",
            m.n_skipped - self.started_model[1],
        )
        yield _gauge("stream_fm_model_memory_bytes", "Bytes held by the model (estimate)", m.memory_bytes)
        calibration = GaugeMetricFamily(
            "stream_fm_model_calibration",
            "Calibration of the reports: gains on the intercept, linear and pairwise parts; the offset",
            labels=["part"],
        )
        for part, v in zip(("intercept", "linear", "pairwise", "offset"), m.calibration, strict=True):
            calibration.add_metric([part], _finite(v))
        yield calibration
        yield _gauge(
            "stream_fm_model_samples_seen", "Samples the model has learned in its lifetime", m.samples_seen
        )

        j = w.joiner
        now_join = _join_counts(w)
        yield _gauge(
            "stream_fm_join_pending", "Impressions waiting for a click or their window's end", j.pending
        )
        for (name, help_), now, then in zip(_JOIN_COUNTERS, now_join, self.started_join, strict=True):
            yield _counter(name, help_, now - then)
        yield _gauge(
            "stream_fm_join_watermark_seconds", "Event-time watermark (Unix seconds)", _finite(j.watermark)
        )

        lag = GaugeMetricFamily(
            "stream_fm_consumer_lag",
            "Messages behind the end of each partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(w.lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        offset = GaugeMetricFamily(
            "stream_fm_consumer_offset",
            "Next offset to read, per partition (in the model's state)",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(w.positions.items()):
            offset.add_metric([topic, str(partition)], value)
        yield offset
        yield _gauge(
            "stream_fm_consumer_assigned_partitions", "Partitions assigned to this worker", len(w.assigned)
        )
        yield _gauge(
            "stream_fm_consumer_group_members",
            "Members of the worker's consumer group (Kafka; 1 elsewhere); over 1, each has a partial model",
            w.group_members,
        )
        yield _gauge(
            "stream_fm_broker_up",
            "1 if the source is reachable (Kafka: a broker answers)",
            float(w.broker_up),
        )

        newest = stats.newest_event_ts
        lag_s = time.time() - newest if newest is not None else math.nan
        yield _gauge(
            "stream_fm_event_time_lag_seconds", "Now minus the event time of the newest trained sample", lag_s
        )

        writer = w.writer
        last = writer.last_success if writer.last_success is not None else math.nan
        yield _gauge(
            "stream_fm_snapshot_last_success_timestamp_seconds", "When the last snapshot was published", last
        )
        yield _gauge("stream_fm_snapshot_bytes", "Size of the last snapshot on disk", writer.last_bytes)
        yield _gauge(
            "stream_fm_snapshot_pause_seconds",
            "Ingestion pause of the last snapshot (the copy)",
            writer.last_pause_seconds,
        )
        yield _counter(
            "stream_fm_snapshot_failures",
            "Snapshot writes that failed (retried at the next trigger)",
            writer.failures,
        )

        counters = getattr(w, "counters", None)
        if counters is not None:  # a cluster member (stream_fm.cluster.member)
            yield from _cluster_series(counters)

        info = InfoMetricFamily("stream_fm_build", "Versions of stream-fm and what it runs on")
        info.add_metric(
            [],
            {
                "version": __version__,
                "python": platform.python_version(),
                "numba": numba.__version__,
                "source": w.source.name,
                "snapshot_format": str(snapshot.FORMAT_VERSION),
            },
        )
        yield info


def _cluster_series(c: Any) -> Iterator[Metric]:
    """A cluster member's rounds (``ClusterCounters``)."""
    rounds = GaugeMetricFamily(
        "stream_fm_cluster_round",
        "The round each partition this member owns is in",
        labels=["topic", "partition"],
    )
    for (topic, partition), value in sorted(c.rounds.items()):
        rounds.add_metric([topic, str(partition)], value)
    yield rounds
    yield _gauge(
        "stream_fm_cluster_merged_round", "Rounds folded into the model (every partition's)", c.merged
    )
    yield _gauge(
        "stream_fm_cluster_records_waiting", "Records read, waiting for their round", c.records_waiting
    )
    yield _counter(
        "stream_fm_cluster_wait_seconds",
        "Time every partition this member owns had published as far ahead as it may, waiting for others'",
        c.wait_seconds,
    )
    yield _counter(
        "stream_fm_cluster_records_reread",
        "Records fetched too far ahead or before a seek, dropped to be read again",
        c.records_reread,
    )
    yield _counter(
        "stream_fm_cluster_fold_seconds", "Time spent folding rounds into the model", c.fold_seconds
    )
    yield _counter("stream_fm_cluster_rounds_published", "Rounds this member published", c.rounds_published)
    yield _counter("stream_fm_cluster_delta_bytes", "Bytes of rounds this member published", c.delta_bytes)
    yield _counter(
        "stream_fm_cluster_delta_keys", "Feature keys in the samples this member published", c.delta_keys
    )


_JOIN_COUNTERS = (
    ("stream_fm_join_late_clicks", "Clicks for an impression already closed or outside its window"),
    ("stream_fm_join_orphan_clicks", "Clicks for an impression never seen"),
    ("stream_fm_join_duplicates", "Repeated impressions and repeated clicks (not trained again)"),
    ("stream_fm_join_overflow", "Impressions closed early because max_pending was reached"),
    ("stream_fm_join_late_impressions", "Impressions whose window had closed before they arrived"),
)


def _join_counts(w: Worker) -> tuple[int, ...]:
    j = w.joiner
    return (j.late_clicks, j.orphan_clicks, j.duplicates, j.overflow, j.late_impressions)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else math.nan


def registry_for(worker: Worker) -> CollectorRegistry:
    """A registry with the worker's series, its two histograms (hooked into the worker) and the
    process and GC series. A registry per worker, never the global one (tests build several)."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    batch = Histogram(
        "stream_fm_batch_seconds",
        "Time to process one polled batch",
        buckets=BATCH_BUCKETS,
        registry=registry,
    )
    snap = Histogram(
        "stream_fm_snapshot_seconds",
        "Time to write one snapshot (background)",
        buckets=SNAPSHOT_BUCKETS,
        registry=registry,
    )
    worker.on_batch.append(batch.observe)
    worker.on_snapshot.append(lambda writer: snap.observe(writer.last_write_seconds))
    ProcessCollector(registry=registry)
    registry.register(GC_COLLECTOR)
    return registry


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread."""

    def __init__(self, worker: Worker, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.worker = worker
        self.registry = registry_for(worker)
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="stream-fm-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on %s/metrics (health: /healthz, /readyz)", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: MetricsServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(HTTPStatus.OK, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._reply(HTTPStatus.OK, b"ok\n")
        elif path == "/readyz":
            ready = owner.worker.ready
            self._reply(
                HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                b"ready\n" if ready else b"not ready\n",
            )
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
