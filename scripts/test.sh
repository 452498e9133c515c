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

# Debian packages the run needs and the machine lacks (apt-get update only if the first try fails).
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { $sudo apt-get update -q >/dev/null \
      && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

# A C compiler and the Python headers: installing stream-fm compiles its feature encoder.
headers=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$headers/Python.h" ]; then
  echo "== installing Debian's gcc and python3-dev"
  apt_install gcc python3-dev
fi

echo "== installing stream-fm[test] into $venv"
"$venv/bin/python" -m pip install --quiet -e "$repo[test]"

cd "$repo"
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

# A real Prometheus (with promtool) for the metrics tests: Debian's package.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "== installing Debian's prometheus package"
  apt_install prometheus
fi

# A real Kafka broker for the integration tests, from the project's own script (Maven Central jars).
# Stopped afterwards if this run started it.
kafka="$repo/deploy/kafka/kafka-local.sh"
if "$kafka" status >/dev/null 2>&1; then
  started_kafka=""
else
  echo "== starting the local Kafka broker"
  started_kafka=1
fi
# its stdout is the bootstrap address alone (the script's contract); anything else is a bug there
STREAM_FM_TEST_KAFKA=$("$kafka" start)
if [[ ! "$STREAM_FM_TEST_KAFKA" =~ ^[A-Za-z0-9.:_-]+:[0-9]+$ ]]; then
  echo "kafka-local.sh start printed $(printf %q "$STREAM_FM_TEST_KAFKA"), not HOST:PORT" >&2
  exit 1
fi
export STREAM_FM_TEST_KAFKA
stop_kafka() {
  if [ -n "$started_kafka" ]; then
    echo "== stopping the local Kafka broker"
    "$kafka" stop || true
  fi
}
trap stop_kafka EXIT

echo "== pytest (Kafka at $STREAM_FM_TEST_KAFKA)"
"$venv/bin/python" -m pytest "$@"
