"""The model: the factorization machine (:class:`SparseFM`), its update rules and compiled
kernels, its key index and storage, feature encoding and state export."""

from stream_fm.model.fm import SparseFM, StateCapture, encode_rows

__all__ = ["SparseFM", "StateCapture", "encode_rows"]
