"""deploy/kafka/kafka-local.sh on a machine that has never run it: empty jar cache, empty Maven
repository. Its stdout is parsed by scripts/test.sh, the test fixtures and the benchmarks, so it
must be the bootstrap address alone, whatever Maven and Java print on the way."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import KAFKA_SCRIPT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port_pair() -> int:
    """A port p such that p and p + 1 (the controller's) are both free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _script(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KAFKA_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_a_first_start_prints_only_the_address_and_a_client_connects_to_it(tmp_path: Path) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    home, m2 = tmp_path / "home", tmp_path / "m2"
    home.mkdir()
    port = _free_port_pair()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_LOCAL_", "MAVEN_"))}
    # HOME empties the jar cache; Maven (Java) takes its home from the password database, not
    # from HOME, so its local repository is emptied by name
    env.update(HOME=str(home), KAFKA_LOCAL_PORT=str(port), KAFKA_LOCAL_MAVEN_REPO=str(m2))
    try:
        started = _script(env, "start")
        assert started.returncode == 0, started.stderr
        # a first run really resolved everything from Maven Central
        assert any(m2.rglob("kafka_2.13-*.jar")), started.stderr
        assert "resolving Kafka" in started.stderr
        address = f"127.0.0.1:{port}"
        assert started.stdout == f"{address}\n", f"stdout was {started.stdout!r}"
        assert re.fullmatch(r"[A-Za-z0-9.:_-]+:\d+\n", started.stdout)

        # the address works as it is: a topic, a message in, the message out
        topic = f"first-run-{uuid.uuid4().hex[:8]}"
        admin = KafkaAdminClient(bootstrap_servers=started.stdout.strip(), request_timeout_ms=30_000)
        admin.create_topics([NewTopic(topic, 1, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=address, acks="all")
        producer.send(topic, b"hello").get(timeout=30)
        producer.close()
        consumer = KafkaConsumer(
            topic, bootstrap_servers=address, auto_offset_reset="earliest", consumer_timeout_ms=30_000
        )
        got = next(iter(consumer), None)  # the first message, or None after 30 s without one
        consumer.close()
        assert got is not None and got.value == b"hello"

        # a second start finds it running: the same one line, nothing else on stdout
        again = _script(env, "start", timeout=60)
        assert (again.returncode, again.stdout) == (0, f"{address}\n"), again.stderr
        status = _script(env, "status", timeout=60)
        assert status.returncode == 0 and status.stdout.startswith(f"running: {address} (pid ")
    finally:
        stopped = _script(env, "stop", timeout=120)
    assert stopped.returncode == 0 and stopped.stdout == "", stopped.stderr
    status = _script(env, "status", timeout=60)
    assert (status.returncode, status.stdout) == (3, "stopped\n")
