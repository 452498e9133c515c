"""The model's state on disk: snapshots (format, atomic writes, names, retention) and the lock
on a snapshot directory."""
