"""One typed configuration for the worker: a TOML file, environment variables and CLI flags.

Precedence, lowest to highest: defaults, the TOML file (``--config``), environment variables
(``STREAM_FM_<SECTION>_<NAME>``, e.g. ``STREAM_FM_KAFKA_BOOTSTRAP_SERVERS``), command-line flags.
Everything is validated at start: an unknown key, a wrong type or an out-of-range value raises
:class:`~stream_fm.errors.ConfigError` naming the key, the value and what is allowed.

Secrets (``secret=True``) may also come from a file (``<name>_file`` in TOML, or the environment
variable with ``_FILE`` appended), are passed to kafka-python and are never printed or logged.

>>> c = load(file_values={"model": {"n_factors": 16}}, environ={"STREAM_FM_JOIN_ATTRIBUTION_WINDOW": "600"})
>>> c.model.n_factors, c.join.attribution_window, c.source_of("join", "attribution_window")
(16, 600.0, 'env STREAM_FM_JOIN_ATTRIBUTION_WINDOW')
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stream_fm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SETTINGS", "Config", "Setting", "load", "reference_markdown"]

ENV_PREFIX = "STREAM_FM_"
MASK = "********"


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
    S("kafka", "group_id", str, "", "consumer group (one worker per group)", "--group-id"),
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
        "seconds the watermark trails the newest event time",
        "--allowed-lateness",
        min=0,
    ),
    S(
        "join",
        "max_pending",
        int,
        1_000_000,
        "impressions waiting at most; beyond, the oldest close as negatives",
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
        "learn numeric features as if centred on their running mean (none: on with normalized)",
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
_BY_KEY = {s.key: s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))


class Config:
    """The effective settings: ``config.kafka.group_id``; ``source_of(section, name)``."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]) -> None:
        self._values, self._sources = values, sources
        for section in SECTIONS:
            names = {s.name: values[s.key] for s in SETTINGS if s.section == section}
            setattr(self, section, SimpleNamespace(**names))

    def source_of(self, section: str, name: str) -> str:
        return self._sources[f"{section}.{name}"]

    def as_dict(self, mask: bool = True) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for s in SETTINGS:
            value = self._values[s.key]
            out.setdefault(s.section, {})[s.name] = MASK if mask and s.secret and value else value
        return out

    def model_kwargs(self) -> dict[str, Any]:
        return vars(self.model).copy()

    def kafka_client_config(self) -> dict[str, Any]:
        """kafka-python settings beyond the ones the sources set themselves (security)."""
        k = self.kafka
        out: dict[str, Any] = {"security_protocol": k.security_protocol}
        for name in (
            "sasl_mechanism",
            "sasl_plain_username",
            "sasl_plain_password",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
            "ssl_password",
        ):
            if getattr(k, name):
                out[name] = getattr(k, name)
        return out

    def describe(self) -> str:
        """The effective configuration as TOML-like lines, secrets masked, each with its source."""
        lines = []
        for section, names in self.as_dict().items():
            lines.append(f"[{section}]")
            for name, value in names.items():
                line = f"{name} = {_show(value)}"
                lines.append(f"{line:<56} # {self.source_of(section, name)}")
            lines.append("")
        return "\n".join(lines)


def load(
    file: str | os.PathLike[str] | None = None,
    *,
    file_values: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file < environment < flags (``{"section.name": value}``), validated."""
    values = {s.key: s.default for s in SETTINGS}
    sources = {s.key: "default" for s in SETTINGS}
    if file is not None:
        try:
            with open(file, "rb") as f:
                file_values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", str(file), "an existing TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", str(file), f"valid TOML ({e})") from None
    for key, value in _flatten(file_values or {}, str(file or "file")).items():
        values[key] = _coerce(_BY_KEY[key], value, from_text=False)
        sources[key] = f"file {file}" if file else "file"
    for key, (value, origin) in _from_env(environ if environ is not None else os.environ).items():
        values[key] = _coerce(_BY_KEY[key], value, from_text=True)
        sources[key] = origin
    for key, value in (flags or {}).items():
        setting = _BY_KEY[key]
        values[key] = _coerce(setting, value, from_text=isinstance(value, str) and setting.type is not str)
        sources[key] = f"flag {setting.flag}"
    config = Config(values, sources)
    _check_together(config)
    return config


def _flatten(doc: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(section, "(a section)", f"one of the sections {', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(section, table, "a table of settings")
        for name, value in table.items():
            key = f"{section}.{name}"
            if (
                name.endswith("_file")
                and f"{section}.{name[:-5]}" in _BY_KEY
                and _BY_KEY[f"{section}.{name[:-5]}"].secret
            ):
                out[f"{section}.{name[:-5]}"] = _read_secret(key, value)
                continue
            if key not in _BY_KEY:
                known = ", ".join(s.name for s in SETTINGS if s.section == section)
                raise ConfigError(key, value, f"a known setting of [{section}]: {known}")
            out[key] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    by_env = {s.env: s for s in SETTINGS}
    out = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        section = var[len(ENV_PREFIX) :].split("_", 1)[0].lower()
        if section not in SECTIONS:
            continue  # STREAM_FM_VENV and friends belong to scripts, not to the worker
        if var in by_env:
            out[by_env[var].key] = (value, f"env {var}")
        elif var.endswith("_FILE") and var[:-5] in by_env and by_env[var[:-5]].secret:
            out[by_env[var[:-5]].key] = (_read_secret(var, value), f"env {var}")
        else:
            known = ", ".join(s.env for s in SETTINGS if s.section == section)
            raise ConfigError(var, value, f"a known variable: {known}")
    return out


def _read_secret(key: str, path: Any) -> str:
    try:
        return Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(key, str(path), f"a readable file holding the secret ({e.strerror})") from None


def _coerce(s: Setting, value: Any, from_text: bool) -> Any:
    shown = MASK if s.secret else value
    if value is None or (from_text and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if s.optional:
            return None
        raise ConfigError(s.key, shown, s.allowed())
    try:
        if s.type is bool:
            if isinstance(value, bool):
                out: Any = value
            elif from_text and str(value).strip().lower() in (
                "true",
                "1",
                "yes",
                "on",
                "false",
                "0",
                "no",
                "off",
            ):
                out = str(value).strip().lower() in ("true", "1", "yes", "on")
            else:
                raise ValueError
        elif s.type is list:
            if isinstance(value, str):
                out = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
                out = [item for v in value for item in (x.strip() for x in v.split(",")) if item]
            else:
                raise ValueError
        elif s.type is int:
            if isinstance(value, bool) or not (isinstance(value, int) or from_text):
                raise ValueError
            out = int(str(value).strip()) if from_text else value
        elif s.type is float:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) or from_text):
                raise ValueError
            out = float(str(value).strip()) if from_text else float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except ValueError:
        raise ConfigError(s.key, shown, s.allowed()) from None
    if s.choices is not None and out not in s.choices:
        raise ConfigError(s.key, shown, s.allowed())
    if (s.min is not None and out < s.min) or (s.max is not None and out > s.max):
        raise ConfigError(s.key, shown, s.allowed())
    return out


def _check_together(c: Config) -> None:
    """Rules that span several settings."""
    from stream_fm.model import SparseFM

    try:
        SparseFM(**c.model_kwargs())  # the model's own checks (e.g. hash_bits with max_features)
    except ConfigError as e:
        raise ConfigError(f"model.{e.key}", e.value, e.allowed) from None
    k = c.kafka
    if k.bootstrap_servers and (not k.topics or not k.group_id):
        missing = "kafka.topics" if not k.topics else "kafka.group_id"
        raise ConfigError(
            missing, "", "set as well, when kafka.bootstrap_servers is (or neither, for the demo)"
        )
    if k.security_protocol.startswith("SASL") and not k.sasl_mechanism:
        raise ConfigError(
            "kafka.sasl_mechanism", "", f"set when kafka.security_protocol is {k.security_protocol}"
        )


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value)


def reference_markdown() -> str:
    """The configuration reference, as the README shows it (a test keeps the two in sync)."""
    lines = ["| key | environment | flag | default | allowed | meaning |", "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        default = _show(s.default).replace("|", "\\|")
        flag = f"`{s.flag}`" if s.flag else ""
        lines.append(f"| `{s.key}` | `{s.env}` | {flag} | `{default}` | {s.allowed()} | {s.help} |")
    return "\n".join(lines)
