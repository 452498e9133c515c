"""Configuration: precedence, validation messages, secrets, the README reference in sync."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from stream_fm.errors import ConfigError
from stream_fm.ops import cli
from stream_fm.ops.config import MASK, SETTINGS, load, reference_markdown
from stream_fm.ops.logs import JsonFormatter

README = Path(__file__).resolve().parents[1] / "README.md"


def test_precedence_defaults_file_env_flags(tmp_path):
    toml = tmp_path / "worker.toml"
    toml.write_text(
        "[model]\nn_factors = 16\nlearning_rate = 0.1\n[join]\nmax_pending = 5\n[snapshot]\nkeep = 2\n"
    )
    env = {
        "STREAM_FM_MODEL_LEARNING_RATE": "0.2",
        "STREAM_FM_JOIN_MAX_PENDING": "7",
        "STREAM_FM_VENV": "/elsewhere",
    }
    c = load(toml, environ=env, flags={"join.max_pending": "9"})
    assert (c.model.n_factors, c.model.learning_rate, c.join.max_pending, c.snapshot.keep) == (16, 0.2, 9, 2)
    assert c.model.seed == 0
    assert c.source_of("model", "n_factors") == f"file {toml}"
    assert c.source_of("model", "learning_rate") == "env STREAM_FM_MODEL_LEARNING_RATE"
    assert c.source_of("join", "max_pending") == "flag --max-pending"
    assert c.source_of("model", "seed") == "default"


@pytest.mark.parametrize(
    ("where", "key", "says"),
    [
        ({"file": "[model]\nn_factor = 8\n"}, "model.n_factor", "a known setting of [model]: n_factors"),
        ({"file": "[modle]\nn_factors = 8\n"}, "modle", "one of the sections"),
        ({"file": '[model]\nn_factors = "eight"\n'}, "model.n_factors", "an integer >= 1 and <= 256"),
        ({"file": "[model]\nn_factors = 0\n"}, "model.n_factors", "an integer >= 1 and <= 256"),
        ({"file": '[model]\noptimizer = "adam"\n'}, "model.optimizer", "one of normalized, adagrad, sgd"),
        (
            {"file": "[model]\nhash_bits = 10\nmax_features = 100\n"},
            "model.hash_bits",
            "None when max_features",
        ),
        ({"file": "[model\n"}, "--config", "valid TOML"),
        ({"env": {"STREAM_FM_JOIN_ATTRIBUTION_WINDOW": "soon"}}, "join.attribution_window", "a number >= 0"),
        (
            {"env": {"STREAM_FM_JOIN_WINDOW": "60"}},
            "STREAM_FM_JOIN_WINDOW",
            "STREAM_FM_JOIN_ATTRIBUTION_WINDOW",
        ),
        ({"env": {"STREAM_FM_METRICS_ENABLED": "maybe"}}, "metrics.enabled", "true or false"),
        ({"flags": {"metrics.port": "70000"}}, "metrics.port", "<= 65535"),
        ({"flags": {"kafka.bootstrap_servers": ["b:9092"]}}, "kafka.topics", "set as well"),
        ({"env": {"STREAM_FM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}}, "kafka.sasl_mechanism", "set when"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_allowed(tmp_path, where, key, says):
    file = None
    if "file" in where:
        file = tmp_path / "c.toml"
        file.write_text(where["file"])
    with pytest.raises(ConfigError) as info:
        load(file, environ=where.get("env", {}), flags=where.get("flags"))
    assert info.value.key == key
    assert says in str(info.value)


def test_secrets_come_from_files_and_are_never_shown(tmp_path, capsys, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[kafka]\nsasl_plain_password_file = "{secret}"\nssl_password = "keypass"\n')
    c = load(toml, environ={})
    assert c.kafka.sasl_plain_password == "hunter2"
    assert c.kafka_client_config()["sasl_plain_password"] == "hunter2"
    shown = c.describe()
    assert "hunter2" not in shown and "keypass" not in shown and shown.count(MASK) == 2
    env = {"STREAM_FM_KAFKA_SSL_PASSWORD_FILE": str(secret)}
    assert load(environ=env).kafka.ssl_password == "hunter2"
    with pytest.raises(ConfigError) as info:  # a missing secret file: named, and the error is not the secret
        load(environ={"STREAM_FM_KAFKA_SSL_PASSWORD_FILE": str(tmp_path / "nope")})
    assert info.value.key == "STREAM_FM_KAFKA_SSL_PASSWORD_FILE"
    with pytest.raises(ConfigError) as info:
        load(
            environ={
                "STREAM_FM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "STREAM_FM_KAFKA_SASL_MECHANISM": "NOPE",
            }
        )
    assert info.value.key == "kafka.sasl_mechanism"
    monkeypatch.setenv("STREAM_FM_KAFKA_SASL_PLAIN_PASSWORD", "s3cret")
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "sasl_plain_password = " + '"' + MASK in out


def test_stream_fm_config_prints_values_and_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STREAM_FM_SNAPSHOT_KEEP", "3")
    assert cli.main(["config", "--n-factors", "12", "--topic", "a,b"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"n_factors = 12 +# flag --n-factors", out)
    assert re.search(r"keep = 3 +# env STREAM_FM_SNAPSHOT_KEEP", out)
    assert re.search(r'topics = \["a", "b"\] +# flag --topic', out)
    assert cli.main(["config", "--n-factors", "0"]) == 2
    assert "model.n_factors" in capsys.readouterr().err


def test_every_setting_is_documented_and_the_readme_reference_is_generated():
    reference = reference_markdown()
    readme = README.read_text()
    begin, end = "<!-- config-reference:begin -->\n", "\n<!-- config-reference:end -->"
    assert begin in readme and end in readme, "README lacks the generated configuration reference"
    assert readme.split(begin)[1].split(end)[0] == reference, (
        "README's configuration reference drifted: "
        "paste stream_fm.ops.config.reference_markdown() between the markers"
    )
    for s in SETTINGS:
        assert s.help and f"`{s.key}`" in reference


def test_json_log_lines():
    record = logging.makeLogRecord(
        {"name": "stream_fm.stream.worker", "levelname": "INFO", "msg": "hello %s", "args": ("you",)}
    )
    record.created = 0.0
    doc = json.loads(JsonFormatter().format(record))
    assert doc == {
        "ts": "1970-01-01T00:00:00.000+00:00",
        "level": "INFO",
        "logger": "stream_fm.stream.worker",
        "message": "hello you",
    }
