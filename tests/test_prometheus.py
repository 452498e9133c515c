"""The shipped scrape config, alert rules and dashboard against a real Prometheus server.

Prometheus (Debian's package, installed by scripts/test.sh) scrapes a worker running the demo
source; every expression of the dashboard and of the rules is evaluated through its HTTP API;
pausing the source makes the stalled-consumption alert fire for real. The rules run here with
their time windows shortened (minutes -> seconds): the expressions are the shipped ones.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from stream_fm.ops.metrics import MetricsServer
from stream_fm.stream.sources import DemoSource
from stream_fm.stream.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "stream-fm.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: scripts/test.sh installs Debian's prometheus package"
    return path


def test_promtool_accepts_the_shipped_config_and_rules():
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(RULES)],
    ):
        out = subprocess.run([tool("promtool"), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def shorten(expr_or_duration: str) -> str:
    """Minutes and hours -> seconds, so that a test sees the rules act within a minute."""
    text = re.sub(r"\[\d+[mh]:\d+[mh]\]", "[20s:1s]", expr_or_duration)
    text = re.sub(r"\[\d+[mh]\]", "[10s]", text)
    return re.sub(r"offset \d+[mh]", "offset 5s", text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def dashboard_queries() -> list[tuple[str, list[str]]]:
    """(panel title, its expressions) with the dashboard's variables filled in."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    out = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        exprs = [
            t["expr"].replace("$__rate_interval", "10s").replace('instance=~"$instance"', 'instance=~".*"')
            for t in panel["targets"]
        ]
        out.append((panel["title"], [shorten(e) for e in exprs]))
    return out


@pytest.fixture
def demo_worker(tmp_path):
    source = DemoSource(rate=1000)
    config = WorkerConfig(
        snapshot_dir=tmp_path / "snaps", snapshot_every_seconds=1.0, poll_timeout=0.1, attribution_window=30
    )
    worker = Worker(source, config)
    server = MetricsServer(worker, "127.0.0.1", 0).start()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker, server
    stop.set()
    thread.join(30)
    server.stop()


@pytest.fixture
def prometheus(tmp_path, demo_worker):
    _, server = demo_worker
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["expr"] = shorten(rule["expr"])
            rule["for"] = "3s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [server.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()


def test_dashboard_and_rules_evaluate_and_the_stalled_alert_fires(demo_worker, prometheus):
    worker, _ = demo_worker
    base = prometheus
    # let Prometheus gather a little history: several scrapes, snapshots and closed impressions
    deadline = time.monotonic() + 60
    while not api(base, "query", query='stream_fm_samples_trained_total{label="0"} > 0')["data"]["result"]:
        assert time.monotonic() < deadline, "Prometheus saw no trained samples"
        time.sleep(0.5)
    time.sleep(12)

    empty = []
    for title, exprs in dashboard_queries():
        results = []
        for expr in exprs:
            answer = api(base, "query", query=expr)
            assert answer["status"] == "success", (title, expr, answer)
            results += answer["data"]["result"]
        if not results:
            empty.append(title)
    # a demo worker is no cluster member: the cluster panels must evaluate, they cannot have data
    assert not [t for t in empty if not t.startswith("Cluster:")], f"dashboard panels without data: {empty}"

    groups = api(base, "rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"]) == 9
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert api(base, "query", query=rule["query"])["status"] == "success"
    firing = {
        a["labels"]["alertname"] for a in api(base, "alerts")["data"]["alerts"] if a["state"] == "firing"
    }
    assert not firing, f"alerts firing on a healthy worker: {firing}"

    worker.source.pause()  # consumption stops; the demo's pacing clock runs on, so lag grows
    deadline = time.monotonic() + 60
    while True:
        alerts = api(base, "alerts")["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        if states.get("StreamFmConsumptionStalled") == "firing":
            break
        assert time.monotonic() < deadline, f"the stall alert did not fire: {states}"
        time.sleep(0.5)
    assert "StreamFmWorkerDown" not in states  # the worker is up: it is its consumption that stalled
