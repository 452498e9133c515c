"""Dead letters: bad messages, forwarded unchanged with the reason, so nothing is lost.

To a Kafka topic (headers ``stream-fm-reason``, ``stream-fm-detail`` and ``stream-fm-source``:
``topic/partition/offset``; the original key and value untouched), or to a JSON-lines file for the
file and demo sources. Sends are flushed before every snapshot, so a snapshot never covers a bad
message that has not been delivered.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from stream_fm.stream.sources import Record

__all__ = ["DeadLetters", "FileDeadLetters", "KafkaDeadLetters"]

log = logging.getLogger(__name__)


class DeadLetters:
    """Counts only (no destination configured)."""

    sent = 0

    def send(self, record: Record, reason: str, detail: str) -> None:
        self.sent += 1

    def flush(self) -> bool:
        """Deliver everything sent so far; False if that failed (retried at the next flush)."""
        return True

    def close(self) -> None:
        pass


class KafkaDeadLetters(DeadLetters):
    def __init__(
        self, bootstrap_servers: Any, topic: str, client_config: Mapping[str, Any] | None = None
    ) -> None:
        self.topic = topic
        # the client-side size limit is lifted: the broker (which took the message once) decides
        self._config = {
            "bootstrap_servers": bootstrap_servers,
            "acks": "all",
            "max_request_size": 64 * 2**20,
            **(client_config or {}),
        }
        self._producer: KafkaProducer | None = None
        self._unsent: list[tuple[Record, str, str]] = []
        self.stripped = 0  # messages the dead-letter topic refused whole: forwarded without value
        self._warned = 0.0

    def send(self, record: Record, reason: str, detail: str) -> None:
        self.sent += 1
        self._unsent.append((record, reason, detail))

    def flush(self, timeout: float = 30.0) -> bool:
        if not self._unsent:
            return True
        try:
            if self._producer is None:
                self._producer = KafkaProducer(**self._config)
            futures = [(item, self._send(*item)) for item in self._unsent]
            self._producer.flush(timeout)
        except KafkaError as e:
            self._warn(
                f"dead-letter delivery to {self.topic} failed ({len(self._unsent)} kept, retried): {e}"
            )
            return False
        retry = []
        for (record, reason, detail), future in futures:
            error = future.exception if future.is_done else KafkaError("not delivered in time")
            if error is None:
                continue
            if getattr(error, "retriable", False) or not future.is_done:
                retry.append((record, reason, detail))
                continue
            # refused for good (e.g. too large for the topic): forward the position and the reason,
            # without the value, rather than block every snapshot behind it forever
            self.stripped += 1
            stripped = Record(record.topic, record.partition, record.offset, None, record.key)
            note = f"{detail} [value of {len(record.value or b'')} bytes dropped: {error}]"
            retry.append((stripped, reason, note))
        self._unsent = retry
        if retry:
            self._warn(
                f"dead-letter delivery to {self.topic}: {len(retry)} messages kept for the next attempt"
            )
        return not retry

    def _send(self, record: Record, reason: str, detail: str) -> Any:
        assert self._producer is not None
        headers = [
            ("stream-fm-reason", reason.encode()),
            ("stream-fm-detail", detail[:1000].encode("utf-8", "replace")),
            ("stream-fm-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        return self._producer.send(self.topic, value=record.value, key=record.key, headers=headers)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= 10.0:
            log.warning(message)
            self._warned = now

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class FileDeadLetters(DeadLetters):
    """One JSON object per line: reason, detail, source position, and the message base64-encoded
    (it may not be text at all)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")

    def send(self, record: Record, reason: str, detail: str) -> None:
        self.sent += 1
        line = {
            "reason": reason,
            "detail": detail,
            "source": f"{record.topic}/{record.partition}/{record.offset}",
            "value_b64": base64.b64encode(record.value or b"").decode(),
        }
        self._file.write(orjson.dumps(line) + b"\n")

    def flush(self) -> bool:
        self._file.flush()
        return True

    def close(self) -> None:
        self._file.close()
