#!/usr/bin/env bash
# Runs one bench binary of the tests crate against two builds of the coordinator, taking turns
# (A, B, A, B, ...), so that whatever else the machine does falls on both alike: the way to
# measure a coordinator change against the commit before it. The tests crate's benches start
# the `trainq-server` found beside themselves, so each turn copies that build there first; the
# newer one (B) is put back at the end.
# Usage: bench/alternate-coordinators.sh OLD_SERVER NEW_SERVER ROUNDS BENCH [ARGS...]
#   e.g. bench/alternate-coordinators.sh /tmp/server-old target/release/trainq-server 3 \
#        target/release/trainq-latency 40 0
# Prints each run's output under a "== round N old|new" line; take the medians per side.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
old="$(readlink -f "$1")" new="$(readlink -f "$2")" rounds="$3" bench="$4"
shift 4
dir="$(dirname "$(readlink -f "$bench")")"
keep="$(mktemp)"
cp "$new" "$keep"
trap 'cp "$keep" "$dir/trainq-server"; rm -f "$keep"' EXIT
for round in $(seq "$rounds"); do
  for side in old new; do
    if [ "$side" = old ]; then src="$old"; else src="$keep"; fi
    cp "$src" "$dir/trainq-server"
    echo "== round $round $side"
    "$bench" "$@"
  done
done
