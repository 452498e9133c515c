#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x broker (KRaft, combined broker + controller) on 127.0.0.1,
# run from the broker's jars on Maven Central. No docker, no tarball.
#
#   deploy/kafka/kafka-local.sh start    # idempotent; returns once the broker accepts connections
#   deploy/kafka/kafka-local.sh stop     # stops the broker this script started (by pid)
#   deploy/kafka/kafka-local.sh status
#   deploy/kafka/kafka-local.sh reset    # stop, and delete the broker's data
#
# Standard output is a contract that other scripts parse: `start` prints the bootstrap address
# alone (HOST:PORT, one line) and `status` one status line. Everything else (this script's
# messages, Maven's and Java's output) goes to standard error or to a log file.
#
# Environment (defaults in brackets):
#   KAFKA_LOCAL_PORT   client port [9092]; the controller uses the next port
#   KAFKA_LOCAL_HOME   where jars, data, logs and the pid file live [~/.cache/stream-fm/kafka]
#   KAFKA_LOCAL_MAVEN_REPO  Maven's local repository for resolving the jars [Maven's default, ~/.m2/repository]
#   JAVA               the java binary [java]; Kafka 4.x needs Java 17+
set -euo pipefail

# The caller's stdout is kept on fd 3 for the one line this script owes it (`say`); every other
# command writes to stderr, so nothing a tool prints (Maven writes bare ANSI resets to stdout even
# with -Dstyle.color=never) can reach the caller's stdout.
exec 3>&1 1>&2
say() { echo "$@" >&3; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")"
port="${KAFKA_LOCAL_PORT:-9092}"
controller_port="$((port + 1))"
home="${KAFKA_LOCAL_HOME:-$HOME/.cache/stream-fm/kafka}"
lib="$home/$version/lib"
run="$home/run-$port"
pidfile="$run/broker.pid"
logfile="$run/broker.log"
java="${JAVA:-java}"
bootstrap="127.0.0.1:$port"

log() { echo "kafka-local: $*" >&2; }

running() {
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

fetch_jars() {
  if [[ -f "$lib/.complete" ]]; then
    return
  fi
  log "resolving Kafka $version jars from Maven Central into $lib"
  mkdir -p "$(dirname "$lib")"
  local repo_flag=()
  if [[ -n "${KAFKA_LOCAL_MAVEN_REPO:-}" ]]; then
    repo_flag=("-Dmaven.repo.local=$KAFKA_LOCAL_MAVEN_REPO")
  fi
  # into a staging directory, renamed into place when complete: an interrupted download never
  # leaves a half-filled lib that a later start would take for complete
  local staging="$lib.partial-$$"
  rm -rf "$staging"
  mkdir -p "$staging"
  if ! mvn -q -B -Dstyle.color=never "${repo_flag[@]}" -f "$here/pom.xml" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$staging"; then
    rm -rf "$staging"
    log "Maven could not resolve the broker's jars (see above)"
    exit 1
  fi
  touch "$staging/.complete"
  rm -rf "$lib"
  mv "$staging" "$lib"
}

write_config() {
  mkdir -p "$run/data"
  cat >"$run/server.properties" <<EOF
# written by kafka-local.sh: a single node that is both broker and controller
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$run/data
num.partitions=1
# one node: every internal topic has one replica
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# consumers of a fresh group get their partitions at once, not after 3 s
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
message.max.bytes=2097152
EOF
}

start() {
  if running; then
    if port_open; then
      say "$bootstrap"
      return
    fi
  fi
  if port_open; then
    log "port $port is taken by a process this script did not start"
    exit 1
  fi
  fetch_jars
  write_config
  local cp="$lib/*"
  if [[ ! -f "$run/data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$("$java" -cp "$cp" kafka.tools.StorageTool random-uuid)"
    "$java" -cp "$cp" -Dlog4j2.configurationFile="$here/log4j2.xml" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$run/server.properties" >"$run/format.log" 2>&1 || {
      cat "$run/format.log" >&2
      exit 1
    }
  fi
  : >"$logfile"
  # setsid: the broker outlives the shell that started it (a test run, a terminal); 3>&-: it must
  # not hold the caller's stdout open, or a caller reading it to the end would wait forever
  setsid nohup "$java" -Xms256m -Xmx1g -XX:+UseG1GC -cp "$cp" \
    -Dlog4j2.configurationFile="$here/log4j2.xml" \
    kafka.Kafka "$run/server.properties" >"$logfile" 2>&1 </dev/null 3>&- &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + 180))
  until grep -q "Kafka Server started" "$logfile" 2>/dev/null && port_open; do
    if ! running; then
      log "the broker exited during startup; the end of $logfile:"
      tail -n 40 "$logfile" >&2
      rm -f "$pidfile"
      exit 1
    fi
    if ((SECONDS > deadline)); then
      log "the broker did not start within 180 s; the end of $logfile:"
      tail -n 40 "$logfile" >&2
      stop
      exit 1
    fi
    sleep 0.5
  done
  log "broker $version up on $bootstrap (pid $(cat "$pidfile"), log $logfile)"
  say "$bootstrap"
}

stop() {
  if ! running; then
    rm -f "$pidfile"
    log "not running"
    return
  fi
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "broker $pid did not stop in 30 s: killing it"
    kill -KILL "$pid"
  fi
  rm -f "$pidfile"
  log "stopped broker $pid"
}

status() {
  if running && port_open; then
    say "running: $bootstrap (pid $(cat "$pidfile"))"
  else
    say "stopped"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  reset)
    stop
    rm -rf "$run"
    ;;
  *)
    echo "usage: $0 start|stop|status|reset" >&2
    exit 2
    ;;
esac
