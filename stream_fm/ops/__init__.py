"""Running it: the command line, configuration, metrics, logging, rolling quality, progress and
the compiled-kernel cache."""
