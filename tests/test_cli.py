"""The command line as a user meets it: --help everywhere, the README's first command, a clean install."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import venv
from pathlib import Path

import pytest
from helpers import stream_fm_process

from stream_fm import __version__
from stream_fm.ops import cli
from stream_fm.snapshots import snapshot

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "replay", "produce", "inspect", "serve", "config", "warmup"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: stream-fm" in out
    if command:
        assert "examples:" in out and f"stream-fm {command}" in out
    else:
        assert all(c in out for c in COMMANDS) and "exit codes" in out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2


def test_the_readme_first_command_runs_the_demo_with_snapshots_and_metrics(tmp_path):
    """`stream-fm run` on the demo source for a few seconds, then SIGTERM, as a new user would."""
    port = _free_port()
    log = tmp_path / "run.log"
    proc = stream_fm_process(
        ["run", "--metrics-port", str(port), "--snapshot-interval", "1"], log, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while (
            "stream_fm_samples_trained_total" not in body
            or snapshot.latest_name(tmp_path / "snapshots") is None
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                pass
            time.sleep(0.2)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-2000:]
    final = snapshot.read(tmp_path / "snapshots" / snapshot.latest_name(tmp_path / "snapshots"))
    assert final.offsets["demo"]["0"] > 0 and final.manifest["samples_seen"] > 0
    assert "progress:" in log.read_text() or "shutdown snapshot" in log.read_text()


@pytest.mark.slow
def test_a_clean_clone_installs_into_a_fresh_virtualenv(tmp_path):
    """The README's install command from a clean copy of the tracked files: nothing missing."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # the tests run on the working tree, which may hold changes not yet committed: copy them over
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes((REPO / name).read_bytes())
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(clone)], check=True, timeout=900)  # a regular (not editable) install
    out = subprocess.run(
        [env_dir / "bin" / "stream-fm", "--version"], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.stdout.strip() == f"stream-fm {__version__}"
    # every module imports from the installed wheel (nothing left out of the package)
    modules = sorted(p.stem for p in (REPO / "stream_fm").glob("*.py") if not p.stem.startswith("__"))
    code = f"import importlib; [importlib.import_module('stream_fm.' + m) for m in {modules!r}]"
    subprocess.run([python, "-c", code], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_bar_draws_on_a_terminal_only():
    import io

    from stream_fm.ops.progress import Bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = Bar(200, "replay", stream=stream)
        bar.update(50, "events")
        bar.update(60, "events")  # within 0.2 s of the last draw: skipped
        bar.close()
    assert tty.getvalue().startswith("\rreplay [#######") and "25.0%" in tty.getvalue()
    assert tty.getvalue().count("\r") == 1 and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""  # never into logs or pipes
