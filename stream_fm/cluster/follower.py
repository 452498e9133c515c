"""Serving that follows a cluster's sync topic: predictions seconds old instead of a snapshot
interval old (the pattern of ByteDance's Monolith, which syncs trained rows to serving).

A :class:`Follower` starts from the newest snapshot a member wrote (or, with none yet, from the
sync topic's genesis with a new model of the cluster's settings), then reads the sync topic as a
member does and folds every round once all partitions' samples for it are in, in partition order
(:func:`stream_fm.cluster.rounds.fold_round`). It owns no partition and publishes nothing. Every
``interval`` seconds in which a round was folded, the model becomes a new
:class:`~stream_fm.serve.serving.Predictor` (one attribute, swapped atomically, as the snapshot
:class:`~stream_fm.serve.serving.Watcher` does), named after its snapshot and the rounds folded since:
``snap-0000000007-20261130T080000Z+12``. The model it serves after folding round r is the one
every member holds after round r, bit for bit.

The sync topic must still hold the rounds after the snapshot it starts from (retention:
docs/operations.md); a gap stops the follower with an error naming it, and the last predictor
keeps serving.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stream_fm.cluster import rounds
from stream_fm.cluster.ledger import Ledger, cluster_state
from stream_fm.cluster.sync import SyncLog
from stream_fm.model import SparseFM
from stream_fm.serve.serving import Predictor, Refreshed
from stream_fm.snapshots import snapshot

__all__ = ["Follower"]

log = logging.getLogger(__name__)


class Follower(Refreshed):
    """The cluster's model, folded round by round from the sync topic, served as ``predictor``."""

    thread_name = "stream-fm-follower"

    def __init__(self, root: str | Path, sync: SyncLog, interval: float = 5.0) -> None:
        super().__init__()
        self.root = Path(root)
        self.sync = sync
        self.interval = interval
        self.model: SparseFM | None = None
        self.ledger: Ledger | None = None
        self.failures = 0  # (the stop reason in ``error``)
        self.error: str | None = None
        self._base = "genesis"  # the snapshot it started from
        self._since = 0  # rounds folded since then

    def stop(self) -> None:
        super().stop()
        self.sync.close()

    def _prepare(self) -> None:
        """The newest valid snapshot of the root, or the cluster's genesis if it has none."""
        model, snap = snapshot.restore_newest(self.root) or (None, None)
        if snap is not None:
            state = cluster_state(
                snap, self.sync.topic, "--sync-topic", "the member whose snapshots these are"
            )
            self.ledger = Ledger.from_state(state)
            self.sync.start(state["sync_offset"])
            self._base = snap.name
        else:  # (the genesis is read again as the first message, and skipped)
            self.sync.start(0)
            self.ledger = Ledger(self.sync.genesis(None)[0])
            model = SparseFM(**self.ledger.genesis["model"])
        rounds.check_model(model)
        self.model = model
        self.predictor = Predictor.of_model(model, self._name())
        log.info("following %s from %s (round %d folded)", self.sync.topic, self._base, self.ledger.merged)

    def _name(self) -> str:
        return f"{self._base}+{self._since}"

    def _run(self) -> None:
        assert self.model is not None and self.ledger is not None
        published = time.monotonic()
        fresh = False
        while not self._stop.is_set():
            try:
                for offset, message in self.sync.poll(0.5):
                    self.ledger.read(offset, message)
                while (deltas := self.ledger.complete()) is not None:
                    rounds.fold_round(self.model, deltas)
                    self._since += 1
                    fresh = True
            except Exception as e:  # a corrupt round, a gap: stop folding, keep serving
                self.failures += 1
                self.error = str(e)
                log.error("stopped following %s (still serving %s): %s", self.sync.topic, self._name(), e)
                return
            if fresh and time.monotonic() - published >= self.interval:
                self.predictor = Predictor.of_model(self.model, self._name())
                published, fresh = time.monotonic(), False
