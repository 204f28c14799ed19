#!/usr/bin/env bash
# pgbench of the ReportMetrics statement (1,000-point batches, 4 clients) on the database
# setup.sh makes: with migration 0010's points trigger and without it, alternating, ROUNDS runs
# of SECS seconds each. Prints points/s per run; take the medians.
#   bench/ingest/setup.sh && bench/ingest/run.sh
set -euo pipefail
cd "$(dirname "$0")"
db=trainq_ingest_bench; secs=${SECS:-15}; rounds=${ROUNDS:-3}
pg() { psql -q -h 127.0.0.1 -U postgres -d $db -c "$1"; }
for r in $(seq 1 "$rounds"); do
  for v in trigger notrigger; do
    [ $v = notrigger ] && pg "ALTER TABLE metric_points DISABLE TRIGGER metric_points_notify_stored"
    tps=$(pgbench -h 127.0.0.1 -U postgres -n -c 4 -j 2 -T "$secs" -f report_metrics.sql $db 2>/dev/null | awk '/^tps/ {print $3}')
    [ $v = notrigger ] && pg "ALTER TABLE metric_points ENABLE TRIGGER metric_points_notify_stored"
    echo "round $r $v points/s $(python3 -c "print(round($tps * 1000))")"
  done
done
