"""Serving: Predictor parity with the live model, hot reload, the HTTP server, `stream-fm inspect`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import categorical_stream

from stream_fm import FeatureError, SparseFM
from stream_fm.model import _kernels
from stream_fm.ops import cli
from stream_fm.serve import serving
from stream_fm.serve.server import PredictServer
from stream_fm.snapshots import snapshot

PARAMS = [{}, {"optimizer": "sgd"}, {"hash_bits": 8}, {"max_features": 30}]


def trained(n: int = 400, seed: int = 0, **params) -> SparseFM:
    model = SparseFM(seed=3, **params)
    model.learn_batch(*zip(*categorical_stream(n, seed), strict=True))
    return model


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(p) or "defaults")
def test_predictions_equal_the_live_model_at_snapshot_time(tmp_path, params):
    model = trained(**params)
    snapshot.write(tmp_path, model)
    probe = [x for x, _ in categorical_stream(200, seed=8)] + [{"unseen": "feature"}, {}]
    live = model.predict_proba_batch(probe)
    predictor = serving.load(tmp_path)
    model.learn_batch(*zip(*categorical_stream(100, seed=2), strict=True))  # the live model moves on
    served = predictor.predict_batch(probe)
    assert np.max(np.abs(served - live)) <= 1e-12
    assert [predictor.predict(x) for x in probe] == served.tolist()
    assert predictor.manifest["samples_seen"] == 400 and predictor.name.startswith("snap-0000000001-")


def test_a_predictor_shared_by_threads_gives_each_the_same_numbers(tmp_path):
    """Threads predicting one at a time through one Predictor, switching as often as CPython lets
    them: every answer is the one-thread answer."""
    snapshot.write(tmp_path, trained(n=2000))
    predictor = serving.load(tmp_path)
    probe = [x for x, _ in categorical_stream(3000, seed=8)]
    expected = predictor.predict_batch(probe).tolist()
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = [predictor.predict(x) for x in probe]
        except BaseException as e:  # reported below: a thread's exception would vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns far more often than by default
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert all(results[i] == expected for i in range(4))


def test_predictor_refuses_bad_features_like_the_model(tmp_path):
    snapshot.write(tmp_path, trained())
    predictor = serving.load(tmp_path)
    with pytest.raises(FeatureError) as info:
        predictor.predict_batch([{"ad": "a1"}, {"price": float("nan")}])
    assert info.value.field == "price" and info.value.index == 1


def test_watcher_swaps_in_new_snapshots_and_keeps_the_old_on_failure(tmp_path):
    watcher = serving.Watcher(tmp_path, interval=3600)
    assert not watcher.check() and watcher.predictor is None  # nothing published yet: no error
    model = trained()
    first = snapshot.write(tmp_path, model)
    assert watcher.check() and watcher.predictor.name == first.name
    assert not watcher.check()  # unchanged
    model.learn_batch(*zip(*categorical_stream(50, seed=4), strict=True))
    second = snapshot.write(tmp_path, model)
    assert watcher.check() and watcher.predictor.name == second.name
    third = snapshot.write(tmp_path, model)
    (third / "model.w.npy").write_bytes(b"garbage")
    held = watcher.predictor
    assert not watcher.check()
    assert watcher.predictor is held and watcher.failures == 0  # fell back to the newest valid: second
    assert watcher.reloads == 2


def test_watcher_thread_reloads_in_the_background(tmp_path):
    model = trained()
    snapshot.write(tmp_path, model)
    with serving.Watcher(tmp_path, interval=0.05) as watcher:
        first = watcher.predictor.name
        newer = snapshot.write(tmp_path, model)
        deadline = time.monotonic() + 10
        while watcher.predictor.name == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.predictor.name == newer.name


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def http_server(tmp_path):
    watcher = serving.Watcher(tmp_path, interval=0.05).start()
    server = PredictServer(watcher, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, tmp_path
    server.shutdown()
    server.server_close()
    watcher.stop()


def request(server: PredictServer, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_http_predictions_hot_reload_and_errors(http_server):
    server, root = http_server
    assert request(server, "GET", "/healthz") == (200, {"status": "ok"})
    status, body = request(server, "POST", "/predict", b'{"features": {"ad": "a1"}}')
    assert status == 503 and "no snapshot" in body["error"]
    assert request(server, "GET", "/readyz")[0] == 503

    model = trained()
    first = snapshot.write(root, model)
    deadline = time.monotonic() + 10
    while request(server, "GET", "/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    xs = [x for x, _ in categorical_stream(5, seed=1)]
    status, body = request(server, "POST", "/predict", json.dumps({"features": xs[0]}).encode())
    assert status == 200 and body["snapshot"] == first.name
    assert body["probability"] == model.predict_proba_one(xs[0])[True]
    status, body = request(server, "POST", "/predict", json.dumps({"instances": xs}).encode())
    assert status == 200 and body["probabilities"] == model.predict_proba_batch(xs).tolist()

    model.learn_batch(*zip(*categorical_stream(100, seed=6), strict=True))
    second = snapshot.write(root, model)
    deadline = time.monotonic() + 10
    while body.get("snapshot") != second.name and time.monotonic() < deadline:
        status, body = request(server, "POST", "/predict", json.dumps({"features": xs[0]}).encode())
    assert body["snapshot"] == second.name and body["probability"] == model.predict_proba_one(xs[0])[True]

    bad = [
        (b"{not json", "malformed JSON"),
        (b'{"features": {"price": NaN}}', "malformed JSON"),
        (b'{"features": {"price": null}}', "price"),
        (b'{"instances": [{"a": "b"}, {"x": [1]}]}', "sample 1"),
        (b'{"feature": {}}', "expected"),
        (b"[1, 2]", "expected"),
    ]
    for payload, message in bad:
        status, body = request(server, "POST", "/predict", payload)
        assert status == 400 and message in body["error"], (payload, body)
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "GET", "/healthz")[0] == 200  # still standing


@pytest.mark.slow
def test_stream_fm_serve_command(tmp_path):
    model = trained()
    snapshot.write(tmp_path, model)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_fm",
            "serve",
            "--snapshots",
            str(tmp_path),
            "--port",
            str(port),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/predict", body=b'{"features": {"ad": "a1", "user": "u2"}}')
                body = json.loads(conn.getresponse().read())
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve did not come up"
                time.sleep(0.1)
        assert body["probability"] == model.predict_proba_one({"ad": "a1", "user": "u2"})[True]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- inspect


def test_inspect_verifies_and_summarises(tmp_path, capsys):
    model = SparseFM(seed=0)
    for _ in range(50):
        model.learn_one({"ad": "strong", "user": "u1"}, True)
        model.learn_one({"ad": "weak", "user": "u1"}, False)
    path = snapshot.write(tmp_path, model, snapshot.Extra(offsets={"events": {"0": 12}}))
    assert cli.main(["inspect", str(tmp_path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"ok      {path.name}" in out and "samples_seen  100" in out and "'events': {'0': 12}" in out
    bias = model._bias  # the intercept reported and the calibration parts' means, as learned
    assert f"reported {bias[_kernels.B_W0_REPORT]:+.6f}" in out
    assert f"part means    linear {bias[_kernels.B_LIN_MEAN]:+.4f}" in out
    top_w = out.split("by |w|:")[1].split("top")[0]
    assert "'ad=strong'" in top_w and "'ad=weak'" in top_w and "'user=u1'" not in top_w

    corrupt = snapshot.write(tmp_path, model)
    data = bytearray((corrupt / "model.V.npy").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "model.V.npy").write_bytes(bytes(data))
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert f"FAILED  {corrupt.name}" in capsys.readouterr().out
    assert cli.main(["inspect", str(corrupt)]) == 1
    assert cli.main(["inspect", str(path)]) == 0


def test_a_predictor_of_a_live_model_is_a_copy_of_it_now():
    """What a follower serves (stream_fm.cluster.follower): the model's state when it was taken."""
    model = trained()
    xs = [{"ad": f"a{i}", "user": f"u{i % 3}"} for i in range(6)]
    before = model.predict_proba_batch(xs)
    predictor = serving.Predictor.of_model(model, "live+1")
    model.learn_batch(xs, [True] * 6)  # the model goes on learning; the predictor does not move
    assert np.array_equal(predictor.predict_batch(xs), before) and predictor.name == "live+1"
    assert predictor.predict(xs[0]) == before[0]
    assert predictor.samples_seen == model.samples_seen - 6
