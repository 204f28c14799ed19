#!/usr/bin/env bash
# The project's test command: builds every binary, then runs every test of the workspace (unit,
# store and dispatch tests against the real Postgres and Redis, and the system tests that start
# the real coordinator and worker binaries and use the real grpcurl).
# Needs: scripts/setup.sh done once; Postgres on 127.0.0.1:5432 (trust auth) and Redis on
# 127.0.0.1:6379 running. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ ! -e .tools/libtorch ] && [ -z "${LIBTORCH:-}" ]; then
  echo "libtorch not set up: run scripts/setup.sh first" >&2
  exit 1
fi
# #[sqlx::test] makes a fresh database per store test through this server.
export DATABASE_URL="${TRAINQ_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# Tests that train use one libtorch thread each; cargo runs test binaries one after another.
t0=$(date +%s)
cargo build --workspace --bins
t1=$(date +%s)
echo "[test.sh] build: $((t1 - t0)) s"
cargo test --workspace "$@"
t2=$(date +%s)
echo "[test.sh] tests: $((t2 - t1)) s"
