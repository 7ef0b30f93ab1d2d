#!/usr/bin/env bash
# A Kafka-protocol broker on loopback for tests and benches: tansu (Rust, from crates.io), built
# once per machine into $TANSU_ROOT. Started and stopped by PID.
#   kafka-broker.sh install | start [memory|sqlite] [extra broker flags] | stop
set -euo pipefail
TANSU_ROOT=${TANSU_ROOT:-/opt/tansu}
TANSU=$TANSU_ROOT/bin/tansu
KAFKA_DIR=${KAFKA_DIR:-/tmp/kafka-local}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_ADVERTISED=${KAFKA_ADVERTISED:-tcp://127.0.0.1:$KAFKA_PORT}
PIDFILE=$KAFKA_DIR/tansu.pid

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "${1:-}" in
install)
  if [ -x "$TANSU" ] && "$TANSU" --version | grep -q '^tansu 0.6.0'; then
    echo "tansu 0.6.0 already installed at $TANSU"; exit 0
  fi
  # dynostore: the memory:// engine; libsql: sqlite:// (persistence, SCRAM users).
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$TANSU_ROOT"
  ;;
start)
  engine=${2:-memory}; shift 2 || shift $#
  mkdir -p "$KAFKA_DIR"
  if port_open "$KAFKA_PORT"; then echo "port $KAFKA_PORT already in use" >&2; exit 1; fi
  case "$engine" in
    memory) url=memory://tansu/ ;;
    sqlite) url=sqlite://tansu.db ;;   # relative to KAFKA_DIR (tansu takes no absolute path here)
    *) echo "engine must be memory or sqlite" >&2; exit 2 ;;
  esac
  # `setsid bash -c 'echo $$ > pidfile; exec tansu'` records the broker's own PID ($! would not).
  # `exec` leaves no shell waiting on the broker, and descriptors above 2 are closed: a process
  # holding the caller's stdout would keep a test harness's pipe open forever.
  (cd "$KAFKA_DIR" && exec setsid bash -c \
      'echo $$ > "$0"; for fd in $(ls /proc/$$/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done; exec "$@"' \
      "$PIDFILE" "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "$KAFKA_ADVERTISED" --storage-engine "$url" --silent "$@" \
      >> "$KAFKA_DIR/tansu.log" 2>&1 < /dev/null) &
  for _ in $(seq 1 100); do
    if [ -s "$PIDFILE" ] && port_open "$KAFKA_PORT"; then
      echo "tansu ($engine) ready on 127.0.0.1:$KAFKA_PORT, pid $(cat "$PIDFILE")"; exit 0
    fi
    sleep 0.1
  done
  echo "tansu did not start; see $KAFKA_DIR/tansu.log" >&2; tail -20 "$KAFKA_DIR/tansu.log" >&2 || true; exit 1
  ;;
stop)
  [ -s "$PIDFILE" ] || { echo "tansu: no pidfile in $KAFKA_DIR"; exit 0; }
  pid=$(cat "$PIDFILE")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$PIDFILE"; echo "tansu pid $pid stopped"
  ;;
*) echo "usage: $0 install | start [memory|sqlite] [broker flags...] | stop" >&2; exit 2 ;;
esac
