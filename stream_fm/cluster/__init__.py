"""Cluster mode: several workers learning one model, with Kafka as the engine.

:mod:`.member` runs a member (``stream-fm run --sync-topic``); :mod:`.ledger` keeps what it has
read of the sync topic (:mod:`.sync`), whose messages are chunks of deltas (:mod:`.delta`); a
round is learned and folded by :mod:`.rounds`; :mod:`.status` holds what the metrics read.
"""
