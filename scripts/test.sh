#!/usr/bin/env bash
# The project's one test command (README: "Run the tests"). On a fresh machine it creates a
# virtualenv outside the repository, installs stream-fm with its test extra, checks style, then
# runs every test. Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"`).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${STREAM_FM_CACHE:-"$HOME/.cache/stream-fm"}
venv=${STREAM_FM_VENV:-"$cache/venv"}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtualenv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
echo "== installing stream-fm[test] into $venv"
"$venv/bin/python" -m pip install --quiet -e "$repo[test]"

cd "$repo"
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

echo "== pytest"
exec "$venv/bin/python" -m pytest "$@"
