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
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stream_fm.errors import ConfigError
from stream_fm.ops.settings import ENV_PREFIX, SETTINGS, Setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SETTINGS", "Config", "Setting", "load", "reference_markdown"]

MASK = "********"

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
