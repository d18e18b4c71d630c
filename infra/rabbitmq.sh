#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 (guest/guest), starting the local
# one (`rabbitmq-server -detached`) when it is down. Prints the AMQP URL on stdout.
set -euo pipefail

URL="${MEDBATCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

up() { rabbitmqctl -q status >/dev/null 2>&1; }

if ! up; then
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq-server not found: install RabbitMQ" >&2; exit 1; }
  echo "starting RabbitMQ (rabbitmq-server -detached)..." >&2
  rabbitmq-server -detached >&2 || true
  for _ in $(seq 1 60); do
    up && break
    sleep 1
  done
  up || { echo "RabbitMQ did not come up within 60 s" >&2; exit 1; }
  rabbitmqctl -q await_startup >&2 || true
fi
# A broker short of disk or memory blocks every publisher until the alarm clears: runs would
# hang waiting for jobs, so say so plainly.
if alarms="$(rabbitmq-diagnostics -q alarms 2>/dev/null)" && [ -n "$(printf '%s' "$alarms" | tr -d '[:space:]')" ] \
  && ! printf '%s' "$alarms" | grep -qi "no alarms"; then
  echo "RabbitMQ reports resource alarms; publishers are blocked until they clear (free disk or memory on the broker):" >&2
  printf '%s\n' "$alarms" >&2
  exit 1
fi
echo "$URL"
