#!/usr/bin/env bash
# A scratch database with trainq's migrations and N running jobs, for pgbench of the ReportMetrics statement.
set -euo pipefail
db=trainq_ingest_bench
psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
for f in "$(dirname "$0")"/../../migrations/*.sql; do psql -q -h 127.0.0.1 -U postgres -d $db -v ON_ERROR_STOP=1 -f "$f" >/dev/null; done
psql -q -h 127.0.0.1 -U postgres -d $db -c "INSERT INTO jobs (id, name, kind, spec, state, max_attempts, worker_id, lease_expires_at)
  SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'j', 'mnist_classifier', '{\"mnistClassifier\": {}}', 'running', 3, 'w', now() + interval '1 day'
  FROM generate_series(1, 64) g"
psql -q -h 127.0.0.1 -U postgres -d trainq_ingest_bench -c "CREATE SEQUENCE bench_seq"
