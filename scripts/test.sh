#!/usr/bin/env bash
# The project's test command: checks formatting and clippy, builds every binary, then runs every
# test of the workspace (unit, store and dispatch tests against the real Postgres and Redis, and
# the system tests that start the real coordinator and worker binaries and use the real grpcurl).
# Runs scripts/setup.sh first when libtorch is not set up (a fresh clone; it needs Python 3 with
# venv). Needs Postgres on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379 running.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ ! -e .tools/libtorch ] && [ -z "${LIBTORCH:-}" ]; then
  echo "[test.sh] libtorch not set up yet: running scripts/setup.sh" >&2
  scripts/setup.sh
fi
# The test services, one set of variables (the `tests` crate reads them; see tests/src/lib.rs).
export TRAINQ_TEST_DATABASE_URL="${TRAINQ_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export TRAINQ_TEST_REDIS_URL="${TRAINQ_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
# The same servers under the names that #[sqlx::test] (a fresh database per store test) and the
# dispatcher's unit tests read.
export DATABASE_URL="$TRAINQ_TEST_DATABASE_URL"
export REDIS_URL="$TRAINQ_TEST_REDIS_URL"
t0=$(date +%s)
cargo fmt --all --check
t1=$(date +%s)
echo "[test.sh] fmt: $((t1 - t0)) s"
cargo clippy --workspace --all-targets -- -D warnings
t2=$(date +%s)
echo "[test.sh] clippy: $((t2 - t1)) s"
# Tests that train use one libtorch thread each; cargo runs test binaries one after another.
cargo build --workspace --bins
t3=$(date +%s)
echo "[test.sh] build: $((t3 - t2)) s"
cargo test --workspace "$@"
t4=$(date +%s)
echo "[test.sh] tests: $((t4 - t3)) s"
