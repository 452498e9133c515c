"""Shared fixtures: the real Kafka broker (started by deploy/kafka/kafka-local.sh), topics, workers."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from helpers import KAFKA_SCRIPT


class Broker:
    """The local broker of deploy/kafka/kafka-local.sh; tests may stop and start it."""

    def __init__(self) -> None:
        self.bootstrap = os.environ.get("STREAM_FM_TEST_KAFKA") or self.start()

    def start(self) -> str:
        out = subprocess.run([str(KAFKA_SCRIPT), "start"], check=True, stdout=subprocess.PIPE, text=True)
        return out.stdout.strip()  # the script's stdout is the bootstrap address alone

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def kafka() -> Broker:
    """A running broker: the one scripts/test.sh started, else started here (idempotent)."""
    return Broker()


@pytest.fixture
def topic_factory(kafka: Broker) -> Iterator[Callable[..., str]]:
    """Creates uniquely named topics (deleted afterwards)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=30_000)
    created: list[str] = []

    def create(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])
        created.append(name)
        deadline = time.monotonic() + 30
        while name not in admin.list_topics():
            assert time.monotonic() < deadline, f"topic {name} did not appear"
            time.sleep(0.1)
        return name

    yield create
    try:
        admin.delete_topics(created)
    except Exception:  # the broker may have been restarted by the test: topics die with the run
        pass
    admin.close()
