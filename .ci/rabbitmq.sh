#!/usr/bin/env bash
# The machine's RabbitMQ (Debian package, node rabbit@localhost, 127.0.0.1:5672), for CI and the
# restart test: `start` starts it when it is down and waits until it is booted; `stop` stops it.
#   rabbitmq.sh start | stop | clean | status
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
running() { as_root rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }

case "${1:-}" in
start)
  if ! running; then
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 120); do
      running && break
      sleep 0.5
    done
  fi
  running || { echo "rabbitmq: did not start (see /var/log/rabbitmq)" >&2; exit 1; }
  # A test run that died mid-way must not leave the broker changed (tests/pika_alarm.rs).
  as_root rabbitmqctl -q set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true
  as_root rabbitmqctl -q eval 'application:set_env(rabbit, max_message_size, 134217728).' >/dev/null 2>&1 || true
  # Booted is not yet listening on every port: wait for the AMQP listener too.
  for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && exit 0
    sleep 0.5
  done
  echo "rabbitmq: running, but nothing listens on 127.0.0.1:5672" >&2; exit 1
  ;;
stop)
  as_root rabbitmqctl stop >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    running || exit 0
    sleep 0.5
  done
  echo "rabbitmq: did not stop" >&2; exit 1
  ;;
clean)
  # Queues and exchanges left by test runs that failed before their cleanup (named q-<pid>_<n>,
  # x-<pid>_<n>); persistent messages in them slow every RabbitMQ restart down.
  for q in $(as_root rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^q-[0-9]+_[0-9]+$' || true); do
    as_root rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  ;;
status)
  running && echo "rabbitmq: running" || { echo "rabbitmq: not running"; exit 1; }
  ;;
*) echo "usage: $0 start | stop | clean | status" >&2; exit 2 ;;
esac
