"""The deployment files, checked where docker and a cluster cannot run: parsers, schemas, lint rules.

- the Dockerfile through the official Go parser (the ``dockerfile`` package): pinned base images, a
  non-root user, a health check on /healthz, files it copies exist, its command parses as stream-fm's;
- compose.yaml: parses, references only files that exist and pinned images, its commands parse;
- the Kubernetes manifests against the API schemas, offline (``kubernetes-validate``), and against
  each other (selectors, ports, the ConfigMap a valid stream-fm configuration);
- the systemd unit: its command and its configuration file are valid.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml

from stream_fm.ops import cli
from stream_fm.ops.config import load

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"


def parses_as_stream_fm(args: list[str]) -> None:
    """The arguments are a valid stream-fm command line (argparse exits on anything else)."""
    parsed = cli.build_parser().parse_args(args)
    assert parsed.command in ("run", "serve", "produce", "replay", "inspect", "config", "warmup")


def pinned(image: str) -> bool:
    """A tag with a version number (or a digest), never a floating `latest`."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_parses_and_follows_the_lint_rules():
    commands = dockerfile.parse_file(str(DEPLOY / "docker" / "Dockerfile"))
    by = lambda name: [c for c in commands if c.cmd == name]  # noqa: E731
    froms = by("FROM")
    assert froms and all(pinned(c.value[0]) for c in froms), [c.value for c in froms]
    users = by("USER")
    assert users and users[-1].value[0] not in ("root", "0"), "the final stage must not run as root"
    final_from = max(c.start_line for c in froms)
    assert users[-1].start_line > final_from, "USER must be set in the final stage"
    health = by("HEALTHCHECK")
    assert len(health) == 1 and "/healthz" in health[0].original
    assert by("ENTRYPOINT")[0].json and by("ENTRYPOINT")[0].value == ("stream-fm",)
    parses_as_stream_fm(list(by("CMD")[0].value))
    for copy in by("COPY"):
        if any(flag.startswith("--from") for flag in copy.flags):
            continue
        for source in copy.value[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
    assert not [c for c in commands if c.cmd == "ADD"], "COPY, not ADD"
    # kernels compiled at build, for any CPU, and checked; copied to a writable cache at start
    pairs = [zip(c.value[::2], c.value[1::2], strict=True) for c in by("ENV") if c.start_line > final_from]
    env = {k: v for pair in pairs for k, v in pair}
    assert env["NUMBA_CPU_NAME"] == "generic"
    kernels = env["STREAM_FM_KERNEL_CACHE"]
    assert env["NUMBA_CACHE_DIR"].startswith("/tmp/") and not env["NUMBA_CACHE_DIR"].startswith(kernels)
    warm = [c for c in by("RUN") if "stream-fm warmup" in c.original]
    assert len(warm) == 1 and warm[0].start_line < users[-1].start_line, "warm up as root, before USER"
    steps = [shlex.split(step) for step in warm[0].value[0].split("&&")]
    warmups = [step for step in steps if "warmup" in step]
    assert [step[-1] for step in warmups] == ["warmup", "--check"]
    for step in warmups:
        assert step[0] == f"NUMBA_CACHE_DIR={kernels}" and step[1] == "stream-fm"
        parses_as_stream_fm(step[2:])
    assert all(
        "apt-get install" not in c.original or "--no-install-recommends" in c.original for c in by("RUN")
    )


# ---------------------------------------------------------------- compose


def test_compose_file_references_what_exists_and_commands_parse():
    compose_path = DEPLOY / "docker" / "compose.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    services = compose["services"]
    assert {"kafka", "producer", "worker", "serve", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")  # the official Apache Kafka image
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert pinned(service["image"]) or service["image"] == "stream-fm:local", (name, service["image"])
        if "build" in service:
            context = (compose_path.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named_volumes:
                continue
            assert (compose_path.parent / source).exists(), f"{name}: {source} does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services
        if service.get("image", "").startswith("stream-fm") or "build" in service:
            parses_as_stream_fm(service["command"])
    # two workers, members of one cluster: the same group and sync topic, a snapshot volume each
    workers = [services["worker"], services["worker-2"]]
    flags = [dict(zip(w["command"][1::2], w["command"][2::2], strict=False)) for w in workers]
    assert (
        flags[0]["--sync-topic"] == flags[1]["--sync-topic"]
        and flags[0]["--group-id"] == flags[1]["--group-id"]
    )
    assert workers[0]["volumes"][0].split(":")[0] != workers[1]["volumes"][0].split(":")[0]
    # the Prometheus inside compose scrapes both workers and loads the shipped rules
    prom = yaml.safe_load((DEPLOY / "docker" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["worker:9108", "worker-2:9108"]
    grafana_mounts = " ".join(services["grafana"]["volumes"])
    assert "stream-fm.json" in grafana_mounts and "provisioning" in grafana_mounts


# ---------------------------------------------------------------- Kubernetes


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize(
    "doc",
    [d for d in manifests() if d["apiVersion"] != "monitoring.coreos.com/v1"],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_kubernetes_manifests_validate_against_the_api_schemas(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_fit_together():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    worker = docs[("StatefulSet", "stream-fm-worker")]
    serve = docs[("Deployment", "stream-fm-serve")]
    config = docs[("ConfigMap", "stream-fm")]
    monitor = docs[("PodMonitor", "stream-fm-worker")]
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]

    # the configuration in the ConfigMap is one stream-fm accepts (secrets come from files at run time)
    loaded = load(file_values=__import__("tomllib").loads(config["data"]["worker.toml"]), environ={})
    container = worker["spec"]["template"]["spec"]["containers"][0]
    parses_as_stream_fm(container["args"])
    parses_as_stream_fm(serve["spec"]["template"]["spec"]["containers"][0]["args"])
    assert worker["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert worker["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "snapshots"
    # several replicas learn one model only as members of a cluster (a sync topic)
    assert worker["spec"]["replicas"] > 1 and loaded.cluster.sync_topic

    # serve reads the worker's claim; the claim name is <template>-<statefulset>-<ordinal>
    claim = next(v for v in serve["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == "snapshots-stream-fm-worker-0"

    # services and the PodMonitor select the pods and name ports that exist
    ports = {p["name"] for p in container["ports"]}
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    service = docs[("Service", "stream-fm-worker")]
    assert service["spec"]["selector"].items() <= worker_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert worker["spec"]["serviceName"] == "stream-fm-worker"
    probe_ports = {
        container["livenessProbe"]["httpGet"]["port"],
        container["readinessProbe"]["httpGet"]["port"],
    }
    assert probe_ports <= ports


# ---------------------------------------------------------------- systemd


def test_systemd_unit_runs_a_valid_command_with_a_valid_config():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd" / "stream-fm.service")
    service = unit["Service"]
    assert service["User"] != "root" and service["KillSignal"] == "SIGTERM"
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/stream-fm")
    parses_as_stream_fm(argv[1:])
    load(DEPLOY / "systemd" / "worker.toml", environ={})
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_every_stream_fm_variable_the_deploy_files_set_is_a_known_setting(tmp_path):
    """STREAM_FM_* variables in the image, compose, manifests and unit: each names a real setting."""
    found: dict[str, str] = {}
    for path in DEPLOY.rglob("*"):
        if (path.is_file() and path.suffix in ("", ".yaml", ".yml", ".service")) or path.name == "Dockerfile":
            text = path.read_text(errors="replace")
            for name in re.findall(r"\b(STREAM_FM_[A-Z0-9_]+)", text):
                found[name] = str(path.relative_to(REPO))
    assert {"STREAM_FM_SNAPSHOT_DIR", "STREAM_FM_METRICS_HOST", "STREAM_FM_KAFKA_GROUP_INSTANCE_ID"} <= set(
        found
    )
    secret = tmp_path / "secret"
    secret.write_text("x")
    environ = {name: (str(secret) if name.endswith("_FILE") else "1") for name in found}
    for name in environ:
        try:
            load(environ={name: environ[name]})
        except Exception as e:  # a value of "1" may be out of range: only unknown names matter here
            assert "a known variable" not in str(e), f"{found[name]}: {e}"


# ---------------------------------------------------------------- alert rules


def test_every_alert_has_a_runbook_entry_in_the_readme():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    headings = re.findall(r"^#### (\w+)$", (REPO / "README.md").read_text(), re.MULTILINE)
    for rule in rules:
        name = rule["alert"]
        assert rule["annotations"]["runbook"] == f"README.md#{name.lower()}", name
        assert name in headings, f"README lacks a runbook entry '#### {name}'"
