#!/usr/bin/env bash
# Runs the coordinator and one worker against the local Postgres and Redis (the defaults in
# ARCHITECTURE.md's shared contract), until Ctrl-C. Builds release binaries first if they are missing.
# Every setting can be changed through the environment (DATABASE_URL, REDIS_URL, TRAINQ_DATA_DIR,
# TRAINQ_DEVICE, ...); see `trainq-server --help` and `trainq-worker --help`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bin="${CARGO_TARGET_DIR:-$root/target}/release"
if [ ! -x "$bin/trainq-server" ] || [ ! -x "$bin/trainq-worker" ]; then
  cargo build --release --workspace --bins
fi
"$bin/trainq-server" &
server=$!
trap 'kill $server ${worker:-} 2>/dev/null; wait' EXIT INT TERM
# Wait for the gRPC port before starting the worker.
for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null && break
  sleep 0.1
done
"$bin/trainq-worker" &
worker=$!
wait -n
