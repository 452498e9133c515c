"""Serving: predictions from the newest snapshot, hot-reloaded, over HTTP."""
