"""The built-in demo stream: impressions with delayed clicks, drawn from a planted model.

Seeded and deterministic: event ``n`` of a seed is always the same, so the demo source can resume
from an offset after a restart like a Kafka partition. Event time runs at ``impressions_per_second``
impressions per second of event time, starting at ``start_ts``; clicks follow their impression
after an exponential delay (mean ``click_delay`` seconds), so some fall outside the attribution
window.

>>> events = DemoStream(seed=1)
>>> key, first = next(iter(events))
>>> sorted(first), first["type"]
(['features', 'id', 'ts', 'type'], 'impression')
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DemoStream"]

_FIELDS = {"user": 20_000, "ad": 800, "site": 60, "device": 3, "hour": 24}


class DemoStream:
    """An endless, seeded stream of ``(key, event dict)`` pairs; key = the impression id."""

    def __init__(
        self,
        seed: int = 0,
        impressions_per_second: float = 50.0,
        click_delay: float = 60.0,
        start_ts: float = 1_764_000_000.0,
        rank: int = 4,
    ) -> None:
        self.seed = seed
        self.impressions_per_second = impressions_per_second
        self.click_delay = click_delay
        self.start_ts = start_ts
        rng = np.random.default_rng(seed)
        # the planted model: biases per id, and a rank-4 interaction between users and ads
        self._bias = {f: rng.normal(0, 0.6, n) for f, n in _FIELDS.items()}
        self._user = rng.normal(0, 0.7, (_FIELDS["user"], rank))
        self._ad = rng.normal(0, 0.7, (_FIELDS["ad"], rank))
        self._zipf = {f: _zipf_cdf(n, 1.1) for f, n in _FIELDS.items()}

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        rng = np.random.default_rng([self.seed, 1])
        clicks: list[tuple[float, int, str]] = []
        n = 0
        while True:
            block = self._block(rng, 1024)
            for ids, position, p, delay in block:
                ts = self.start_ts + n / self.impressions_per_second
                while clicks and clicks[0][0] <= ts:
                    click_ts, _, imp = heapq.heappop(clicks)
                    yield imp, {"type": "click", "impression_id": imp, "ts": round(click_ts, 3)}
                imp = f"d{self.seed}-{n}"
                features = {f: f"{f[0]}{i}" for f, i in zip(_FIELDS, ids, strict=True)}
                features["position"] = position
                yield imp, {"type": "impression", "id": imp, "ts": round(ts, 3), "features": features}
                if p:
                    heapq.heappush(clicks, (ts + delay, n, imp))
                n += 1

    def _block(self, rng: np.random.Generator, size: int) -> list[tuple[list[int], float, bool, float]]:
        ids = {f: np.searchsorted(self._zipf[f], rng.random(size)) for f in _FIELDS}
        position = rng.integers(1, 6, size).astype(float)
        logit = (
            -2.6 - 0.25 * position + np.einsum("ij,ij->i", self._user[ids["user"]], self._ad[ids["ad"]]) * 0.5
        )
        for f in _FIELDS:
            logit += self._bias[f][ids[f]]
        clicked = rng.random(size) < 1.0 / (1.0 + np.exp(-logit))
        delay = rng.exponential(self.click_delay, size)
        columns = np.stack([ids[f] for f in _FIELDS], axis=1).tolist()
        return list(zip(columns, position.tolist(), clicked.tolist(), delay.tolist(), strict=True))


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = math.inf  # searchsorted never runs off the end
    return cdf
