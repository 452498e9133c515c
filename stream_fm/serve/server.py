"""``stream-fm serve``: a small HTTP server in front of the newest snapshot.

- ``POST /predict`` with ``{"features": {...}}`` -> ``{"probability": p, "snapshot": name}``, or
  with ``{"instances": [{...}, ...]}`` -> ``{"probabilities": [...], "snapshot": name}``
- ``GET /healthz`` -> 200 while the process runs; ``GET /readyz`` -> 200 once a snapshot is loaded

Bad requests get a 4xx status and a JSON ``{"error": ...}``; no request can stop the server.
Snapshots are hot-reloaded by a :class:`~stream_fm.serve.serving.Watcher`; with a cluster's sync topic,
a :class:`~stream_fm.cluster.follower.Follower` folds the rounds completed since the snapshot
instead (predictions seconds old, not a snapshot interval old).
"""

from __future__ import annotations

import logging
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from stream_fm.cluster.follower import Follower
from stream_fm.cluster.sync import SyncLog
from stream_fm.errors import FeatureError
from stream_fm.serve.serving import Watcher

__all__ = ["MAX_BODY_BYTES", "PredictServer", "run"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20


class PredictServer(ThreadingHTTPServer):
    """An HTTP server bound to ``(host, port)`` answering from ``watcher.predictor``."""

    daemon_threads = True

    def __init__(self, watcher: Watcher | Follower, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.watcher = watcher
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: PredictServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/readyz":
            predictor = self.server.watcher.predictor
            if predictor is None:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no snapshot loaded yet"})
            else:
                self._reply(HTTPStatus.OK, {"status": "ready", "snapshot": predictor.name})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})

    def do_POST(self) -> None:
        if self.path != "/predict":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
            return
        try:
            status, body = self._predict()
        except Exception:  # a bug must cost one request, not the server
            log.exception("error while answering /predict")
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        self._reply(status, body)

    def _predict(self) -> tuple[HTTPStatus, dict[str, Any]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"}
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body cannot be skipped safely
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"}
        raw = self.rfile.read(int(length))
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return HTTPStatus.BAD_REQUEST, {"error": f"malformed JSON: {e}"}
        predictor = self.server.watcher.predictor
        if predictor is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no snapshot loaded yet"}
        try:
            if isinstance(request, dict) and isinstance(request.get("features"), dict):
                return HTTPStatus.OK, {
                    "probability": predictor.predict(request["features"]),
                    "snapshot": predictor.name,
                }
            if isinstance(request, dict) and isinstance(request.get("instances"), list):
                probabilities = predictor.predict_batch(request["instances"]).tolist()
                return HTTPStatus.OK, {"probabilities": probabilities, "snapshot": predictor.name}
        except FeatureError as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e), "field": str(e.field), "index": e.index}
        expected = 'expected {"features": {...}} or {"instances": [{...}, ...]}'
        return HTTPStatus.BAD_REQUEST, {"error": expected}

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def run(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    reload_interval: float = 5.0,
    follow: SyncLog | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C (``follow``: a cluster's sync topic, folded as it goes)."""
    source = Follower(root, follow, reload_interval) if follow is not None else Watcher(root, reload_interval)
    with source as watcher:
        server = PredictServer(watcher, host, port)

        def shutdown(*_: object) -> None:
            # shutdown() waits for serve_forever to return: call it from another thread
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, shutdown)
        log.info(
            "serving %s on %s (snapshot: %s)", root, server.url, getattr(watcher.predictor, "name", None)
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
