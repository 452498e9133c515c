"""Learning quality over a rolling window of the latest samples, each scored before it was learned.

Updated once per batch (a copy into ring buffers); log loss, exact AUC and CTR are computed when
asked (a progress line, a metrics scrape), in O(n log n) over the window.

>>> q = RollingQuality(window=4)
>>> q.update(np.array([0.9, 0.2, 0.7, 0.4]), np.array([1.0, 0.0, 1.0, 0.0]))
>>> round(q.logloss(), 4), q.auc(), q.ctr()
(0.299, 1.0, 0.5)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RollingQuality"]

_EPS = 1e-15


class RollingQuality:
    def __init__(self, window: int = 10_000) -> None:
        if window < 1:
            raise ValueError(f"window={window}: expected an integer >= 1")
        self.window = window
        self._p = np.zeros(window)
        self._y = np.zeros(window)
        self._n = 0  # samples ever added

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch (probabilities predicted before learning, labels 0/1)."""
        if len(probs) >= self.window:
            probs, labels = probs[-self.window :], labels[-self.window :]
        start = self._n % self.window
        first = min(len(probs), self.window - start)
        self._p[start : start + first] = probs[:first]
        self._y[start : start + first] = labels[:first]
        self._p[: len(probs) - first] = probs[first:]
        self._y[: len(probs) - first] = labels[first:]
        self._n += len(probs)

    @property
    def size(self) -> int:
        return min(self._n, self.window)

    # The metrics thread asks while the worker's thread updates: each reads the window's size once,
    # so that its slices agree (while the window fills, a second read could see more samples)

    def logloss(self) -> float:
        n = self.size
        if not n:
            return math.nan
        p = np.clip(self._p[:n], _EPS, 1 - _EPS)
        y = self._y[:n]
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))

    def auc(self) -> float:
        """Exact ROC AUC (ties count one half); NaN while the window holds one class only."""
        n = self.size
        p, y = self._p[:n], self._y[:n]
        positives = float(y.sum())
        negatives = len(y) - positives
        if not positives or not negatives:
            return math.nan
        order = np.argsort(p, kind="mergesort")
        ranks = np.empty(len(p))
        sorted_p = p[order]
        # average ranks over ties
        _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
        avg = first + (counts + 1) / 2.0
        ranks[order] = np.repeat(avg, counts)
        return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))

    def ctr(self) -> float:
        n = self.size
        return float(self._y[:n].mean()) if n else math.nan
