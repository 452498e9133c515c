"""Cluster mode: several workers learning one model, with Kafka as the engine (issue 13).

So far: the wire format of the sync topic (:mod:`stream_fm.cluster.delta`).
"""
