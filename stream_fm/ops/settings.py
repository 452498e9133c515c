"""Every setting of the worker, as data: section, name, type, default, help, CLI flag and limits.

The table is the single source of the TOML keys, the environment variables
(``STREAM_FM_<SECTION>_<NAME>``), the flags of ``stream-fm run``/``replay`` and the README's
configuration reference; :mod:`stream_fm.ops.config` loads and checks values against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_PREFIX", "SETTINGS", "Setting"]

ENV_PREFIX = "STREAM_FM_"


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    type: type  # str, int, float, bool, or list (of str)
    default: Any
    help: str
    flag: str | None = None  # the CLI flag (run/replay), if it has one
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    optional: bool = False  # None allowed ("none" in env and flags)
    secret: bool = False

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"

    def allowed(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.type is bool:
            text = "true or false"
        elif self.type is list:
            text = "a list of strings (comma-separated in env and flags)"
        else:
            kind = {int: "an integer", float: "a number", str: "a string"}[self.type]
            bounds = [
                f">= {self.min:g}" if self.min is not None else "",
                f"<= {self.max:g}" if self.max is not None else "",
            ]
            text = " ".join([kind, " and ".join(b for b in bounds if b)]).strip()
        return text + (", or none" if self.optional else "")


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # -- kafka
    S(
        "kafka",
        "bootstrap_servers",
        list,
        [],
        "Kafka brokers, host:port; empty: run the demo source",
        "--bootstrap-servers",
    ),
    S("kafka", "topics", list, [], "topics to consume", "--topic"),
    S("kafka", "group_id", str, "", "consumer group (one worker per group, or a cluster)", "--group-id"),
    S(
        "kafka",
        "group_instance_id",
        str,
        "",
        "static membership: a stable name, e.g. the pod's",
        "--group-instance-id",
    ),
    S(
        "kafka",
        "session_timeout",
        float,
        45.0,
        "seconds without a heartbeat before the group gives a member's partitions to others",
        "--session-timeout",
        min=6,
        max=1800,
    ),
    S(
        "kafka",
        "auto_offset_reset",
        str,
        "earliest",
        "where a partition without a position starts",
        "--auto-offset-reset",
        choices=("earliest", "latest"),
    ),
    S(
        "kafka",
        "dead_letter_topic",
        str,
        "",
        "bad messages go here unchanged; empty: counted only",
        "--dead-letter-topic",
    ),
    S(
        "kafka",
        "security_protocol",
        str,
        "PLAINTEXT",
        "kafka-python security_protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ),
    S(
        "kafka",
        "sasl_mechanism",
        str,
        "",
        "e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"),
    ),
    S("kafka", "sasl_plain_username", str, "", "SASL user name"),
    S("kafka", "sasl_plain_password", str, "", "SASL password (secret)", secret=True),
    S("kafka", "ssl_cafile", str, "", "CA bundle to verify the brokers"),
    S("kafka", "ssl_certfile", str, "", "client certificate (mTLS)"),
    S("kafka", "ssl_keyfile", str, "", "client key (mTLS)"),
    S("kafka", "ssl_password", str, "", "password of the client key (secret)", secret=True),
    # -- join
    S(
        "join",
        "attribution_window",
        float,
        1800.0,
        "seconds of event time a click may follow its impression",
        "--attribution-window",
        min=0,
    ),
    S(
        "join",
        "allowed_lateness",
        float,
        60.0,
        "seconds the watermark trails the newest event time (each partition's own)",
        "--allowed-lateness",
        min=0,
    ),
    S(
        "join",
        "max_pending",
        int,
        1_000_000,
        "impressions waiting at most (all partitions together); beyond, the oldest close as negatives",
        "--max-pending",
        min=1,
    ),
    # -- model (SparseFM's arguments; its constructor checks their ranges)
    S("model", "n_factors", int, 8, "latent dimension k", "--n-factors", min=1, max=256),
    S(
        "model",
        "optimizer",
        str,
        "normalized",
        "the update rule",
        "--optimizer",
        choices=("normalized", "adagrad", "sgd"),
    ),
    S(
        "model",
        "learning_rate",
        float,
        None,
        "step size of the linear weights (none: the optimizer's own, 2.0 normalized, 0.06 adagrad and sgd)",
        "--learning-rate",
        min=0,
        optional=True,
    ),
    S(
        "model",
        "bias_learning_rate",
        float,
        None,
        "step size of the bias (none: 1.5 normalized, else learning_rate)",
        "--bias-learning-rate",
        min=0,
        optional=True,
    ),
    S(
        "model",
        "factor_learning_rate",
        float,
        None,
        "step size of the latent vectors (none: 1.0 normalized, else learning_rate)",
        "--factor-learning-rate",
        min=0,
        optional=True,
    ),
    S(
        "model",
        "initial_accumulator",
        float,
        0.5,
        "normalized: the accumulators' start (measured first steps)",
        "--initial-accumulator",
        min=0,
    ),
    S(
        "model",
        "calibrate",
        bool,
        None,
        "report probabilities through an online calibration of the model (none: on with normalized)",
        "--calibrate",
        optional=True,
    ),
    S(
        "model",
        "center",
        bool,
        None,
        "learn each feature as if centred on its running mean (none: on with normalized)",
        "--center",
        optional=True,
    ),
    S(
        "model",
        "average_intercept",
        bool,
        None,
        "report with an average of the intercept over time (none: on with calibrate)",
        "--average-intercept",
        optional=True,
    ),
    S(
        "model",
        "nonnegative_gains",
        bool,
        None,
        "keep the calibration's gains from going below 0 (none: on with calibrate)",
        "--nonnegative-gains",
        optional=True,
    ),
    S(
        "model",
        "dense_factors",
        bool,
        None,
        "faster first steps for the latent vectors of features in many samples (none: on with normalized)",
        "--dense-factors",
        optional=True,
    ),
    S("model", "l2_w", float, 0.0, "L2 penalty on linear weights", "--l2-w", min=0),
    S("model", "l2_v", float, 1e-4, "L2 penalty on latent vectors", "--l2-v", min=0),
    S("model", "init_std", float, 0.02, "standard deviation of new latent vectors", "--init-std", min=0),
    S(
        "model",
        "clip_gradient",
        float,
        100.0,
        "gradient components are clipped to +-this",
        "--clip-gradient",
        min=0,
    ),
    S(
        "model",
        "max_features",
        int,
        None,
        "keep at most this many features (least recently updated evicted)",
        "--max-features",
        min=1,
        optional=True,
    ),
    S("model", "min_count", int, 1, "store a feature once seen in this many samples", "--min-count", min=1),
    S(
        "model",
        "admission_capacity",
        int,
        1_000_000,
        "bound of min_count's counting table",
        "--admission-capacity",
        min=1,
    ),
    S(
        "model",
        "hash_bits",
        int,
        None,
        "hash features into 2**hash_bits rows (no keys stored)",
        "--hash-bits",
        min=1,
        max=30,
        optional=True,
    ),
    S("model", "seed", int, 0, "seed of the latent initialisation", "--seed", min=0),
    # -- snapshot
    S("snapshot", "dir", str, "snapshots", "snapshot root", "--snapshot-dir"),
    S("snapshot", "interval", float, 60.0, "seconds between snapshots", "--snapshot-interval", min=0.01),
    S(
        "snapshot",
        "every_samples",
        int,
        None,
        "also snapshot every this many samples",
        "--snapshot-every-samples",
        min=1,
        optional=True,
    ),
    S("snapshot", "keep", int, 5, "snapshots kept", "--snapshot-keep", min=1),
    # -- worker
    S("worker", "batch_size", int, 5000, "records per poll", "--batch-size", min=1),
    S("worker", "poll_timeout", float, 0.5, "seconds a poll waits for records", min=0.001),
    S("worker", "max_message_bytes", int, 1 << 20, "larger messages are refused (oversize)", min=1),
    S("worker", "quality_window", int, 10_000, "samples in the rolling log loss / AUC / CTR", min=1),
    S(
        "worker",
        "progress_interval",
        float,
        10.0,
        "seconds between progress log lines",
        "--progress-interval",
        min=0.1,
    ),
    S("worker", "shutdown_timeout", float, 60.0, "seconds the final snapshot may take", min=1),
    # -- cluster (several workers, one model: docs/operations.md)
    S(
        "cluster",
        "sync_topic",
        str,
        "",
        "the model's updates between members (set: run as one member of a cluster)",
        "--sync-topic",
    ),
    S(
        "cluster",
        "round_records",
        int,
        None,
        "records of a partition per round, all members alike (none: the cluster's; 16000 for a new one)",
        "--round-records",
        min=1,
        optional=True,
    ),
    S(
        "cluster",
        "round_timeout",
        float,
        2.0,
        "seconds without records before a partition's round closes early",
        "--round-timeout",
        min=0.01,
    ),
    # -- metrics
    S("metrics", "enabled", bool, True, "serve /metrics, /healthz, /readyz", "--metrics"),
    S("metrics", "host", str, "127.0.0.1", "bind address (0.0.0.0: all interfaces)", "--metrics-host"),
    S("metrics", "port", int, 9108, "port (0: any free port)", "--metrics-port", min=0, max=65535),
    # -- demo source
    S("demo", "rate", float, 2000.0, "demo events per second (0: as fast as possible)", "--demo-rate", min=0),
    S("demo", "limit", int, None, "stop after this many demo events", "--demo-limit", min=0, optional=True),
    S("demo", "seed", int, 0, "demo stream seed", "--demo-seed", min=0),
    # -- logging
    S(
        "logging",
        "level",
        str,
        "INFO",
        "log level",
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    S(
        "logging",
        "format",
        str,
        "text",
        "text for people, json for log shippers",
        "--log-format",
        choices=("text", "json"),
    ),
)
