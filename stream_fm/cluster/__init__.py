"""Cluster mode: several workers learning one model, with Kafka as the engine (issue 13).

So far: the wire format of the sync topic (:mod:`stream_fm.cluster.delta`), and rounds: one
partition's round learned on the base model and taken out as a delta, a round's deltas folded
back (:mod:`stream_fm.cluster.rounds`). No Kafka yet.
"""
