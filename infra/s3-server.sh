#!/usr/bin/env bash
# A local S3-compatible server for tests and trying distributed runs: s3s-fs 0.14.1 (Rust,
# from the crate registry; built once into the cache), serving a directory on 127.0.0.1.
# Chosen over moto's server because it checks request signatures against its credentials
# and implements conditional writes (If-None-Match), which the exactly-once protocol uses;
# it is a plain binary with no Python service to keep alive. (Later s3s-fs versions need a
# newer rustc than this project's.)
#
#   infra/s3-server.sh start|stop|restart|env|remove-bucket NAME
#
# `start` (idempotent) prints the endpoint URL; `env` prints the variables that point the
# AWS SDK at it; `remove-bucket` deletes a bucket with the server's own files about its
# objects (kept beside the buckets, one or two per object: a benchmark that left them would
# slow the next one down). Settings: MEDBATCH_S3_PORT (default 9123), MEDBATCH_CACHE.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
ROOT="$CACHE/s3s"
BIN="$ROOT/bin/s3s-fs"
DATA="$ROOT/data"
PORT="${MEDBATCH_S3_PORT:-9123}"
PIDFILE="$ROOT/s3s-fs-$PORT.pid"
LOG="$ROOT/s3s-fs-$PORT.log"
ACCESS_KEY="medbatch-test"
SECRET_KEY="medbatch-test-secret"
ENDPOINT="http://127.0.0.1:$PORT"

install() {
  if [ ! -x "$BIN" ]; then
    echo "building s3s-fs 0.14.1 into $ROOT (once)..." >&2
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$ROOT" >&2
  fi
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

start() {
  install
  if running && answers; then
    echo "$ENDPOINT"
    return
  fi
  mkdir -p "$DATA"
  # The server runs from its own folder: it resolves paths against its working directory,
  # which must outlive the checkout (or test folder) that started it.
  (cd "$ROOT" && exec nohup "$BIN" --host 127.0.0.1 --port "$PORT" --access-key "$ACCESS_KEY" \
    --secret-key "$SECRET_KEY" "$DATA" >"$LOG" 2>&1) &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    answers && break
    sleep 0.1
  done
  answers || { echo "s3s-fs did not start on port $PORT; see $LOG" >&2; exit 1; }
  echo "$ENDPOINT"
}

stop() {
  if running; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    for _ in $(seq 1 50); do running || break; sleep 0.1; done
  fi
  rm -f "$PIDFILE"
}

remove_bucket() {
  local name="$1" encoded
  [ -n "$name" ] && [ "${name#*/}" = "$name" ] && [ "${name#.}" = "$name" ] || { echo "not a bucket name: $name" >&2; exit 2; }
  # s3s-fs names them `.bucket-<name in unpadded URL-safe base64>.object-...`.
  encoded="$(printf %s "$name" | base64 -w0 | tr '+/' '-_' | tr -d '=')"
  rm -rf "${DATA:?}/$name"
  find "$DATA" -maxdepth 1 -name ".bucket-$encoded.*" -delete
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  env)
    echo "AWS_ENDPOINT_URL=$ENDPOINT"
    echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "AWS_REGION=us-east-1"
    ;;
  remove-bucket) remove_bucket "${2:-}" ;;
  *) echo "usage: $0 start|stop|restart|env|remove-bucket NAME" >&2; exit 2 ;;
esac
