#!/usr/bin/env bash
# A local run from a fresh clone, until Ctrl-C: runs scripts/setup.sh when it has not been run,
# builds the release binaries when they are missing, uses the Postgres at DATABASE_URL and the
# Redis at REDIS_URL or, when nothing answers there (on this machine), starts private ones with
# their data under .local/, then starts the coordinator and one worker, and prints the web UI's
# address and a grpcurl line to try. Ctrl-C (or SIGTERM) stops what this script started and
# nothing else: the worker, the coordinator, and the private Postgres and Redis if it started them.
#
# Environment (each optional):
#   DATABASE_URL            Postgres (default postgres://postgres@127.0.0.1:5432/trainq)
#   REDIS_URL               Redis (default redis://127.0.0.1:6379)
#   TRAINQ_LISTEN           the coordinator's gRPC address (default 0.0.0.0:50051)
#   TRAINQ_METRICS_LISTEN   the coordinator's Prometheus address (default 0.0.0.0:9091, or off)
#   TRAINQ_HTTP_LISTEN      the coordinator's web UI address (default 0.0.0.0:8080)
#   TRAINQ_WORKER_METRICS_LISTEN  the worker's Prometheus address (default 0.0.0.0:9092)
#   TRAINQ_DATA_DIR         the worker's data sets (default ./data: MNIST is downloaded into
#                           data/mnist on first use; without network the worker says which files
#                           to put there)
#   TRAINQ_BIN_DIR          take trainq-server and trainq-worker from this folder: nothing is set
#                           up or built (default: target/release, built when missing)
#   TRAINQ_LOCAL_DIR        the private servers' data (default .local in the repository)
#   TRAINQ_PG_BIN           the folder of initdb and pg_ctl (default: the PATH, then the newest
#                           /usr/lib/postgresql/*/bin)
#   TRAINQ_REDIS_SERVER     the redis-server binary (default: the PATH)
# Every other setting of the two binaries passes through the environment as well (TRAINQ_DEVICE,
# TRAINQ_SLOTS, TRAINQ_CLIENT_TOKENS, ...); see `trainq-server --help` and `trainq-worker --help`.
set -euo pipefail
start_dir="$PWD"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

log() { printf '[run-local] %s\n' "$*"; }
die() {
  printf '[run-local] %s\n' "$*" >&2
  exit 1
}

# What this script started, for the clean-up. Empty: not started (or not by us).
server_pid=""
worker_pid=""
redis_pid=""
pg_started=""
stopping=""
spawned=""

# SIGTERM, up to `grace` seconds for the exit, then SIGKILL.
stop_pid() {
  local name=$1 pid=$2 grace=$3 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name did not stop within $grace s of SIGTERM: killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  [ -z "$stopping" ] || return 0
  stopping=1
  set +e
  # A second Ctrl-C must not cut the clean-up short and leave a private server behind.
  trap '' INT TERM
  # The worker first: it hands its running jobs back to the coordinator as it stops.
  stop_pid worker "$worker_pid" 20
  stop_pid coordinator "$server_pid" 10
  if [ -n "$pg_started" ]; then
    log "stopping the private Postgres"
    pg_run "$pg_bin/pg_ctl" -D "$pg_data" -w -t 30 -m fast stop >/dev/null ||
      log "pg_ctl stop failed: see $local_dir/postgres.log"
  fi
  stop_pid "the private Redis" "$redis_pid" 5
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background in a process group of its own, its pid in $spawned. Ctrl-C at
# the terminal then reaches this script alone, which stops the rest in order: the worker while
# the coordinator still runs to take back its jobs, and the servers after the coordinator.
spawn() {
  set -m
  "$@" &
  spawned=$!
  set +m
}

# Whether something accepts TCP connections at host $1, port $2 (at most 3 s to find out).
accepts() {
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# A loopback port nothing listens on. Below Linux's ephemeral range (32768 and up), so that an
# outgoing connection does not hold it.
free_port() {
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 12000))
    if ! accepts 127.0.0.1 "$port"; then
      echo "$port"
      return 0
    fi
  done
  die "found no free port between 20000 and 32000"
}

# "host port" of a URL (scheme://[user[:password]@]host[:port][/path][?query]), with default
# port $2; an IPv6 host without its brackets.
url_host_port() {
  local rest=${1#*://} host port
  rest=${rest%%[/?]*}
  rest=${rest##*@}
  if [[ $rest == \[* ]]; then
    host=${rest%%]*}
    host=${host#[}
    port=${rest#*]}
    port=${port#:}
  elif [[ $rest == *:* ]]; then
    host=${rest%:*}
    port=${rest##*:}
  else
    host=$rest
    port=""
  fi
  echo "${host:-127.0.0.1} ${port:-$2}"
}

# "host port" to connect to for a listen address (HOST:PORT): a wildcard host is this machine.
connect_host_port() {
  local host=${1%:*} port=${1##*:}
  host=${host#[}
  host=${host%]}
  case "$host" in "" | 0.0.0.0 | ::) host=127.0.0.1 ;; esac
  echo "$host $port"
}

# host:port as an address for a client (IPv6 in brackets).
address() {
  if [[ $1 == *:* ]]; then echo "[$1]:$2"; else echo "$1:$2"; fi
}

is_loopback() {
  case "$1" in 127.* | localhost | ::1) return 0 ;; *) return 1 ;; esac
}

# ---- binaries ---------------------------------------------------------------------------------

if [ -n "${TRAINQ_BIN_DIR:-}" ]; then
  bin_dir="$TRAINQ_BIN_DIR"
else
  # The same check as scripts/test.sh: the worker links libtorch, which setup.sh provides.
  if [ ! -e .tools/libtorch ] && [ -z "${LIBTORCH:-}" ]; then
    log "libtorch not set up yet: running scripts/setup.sh"
    scripts/setup.sh
  fi
  bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
  if [ ! -x "$bin_dir/trainq-server" ] || [ ! -x "$bin_dir/trainq-worker" ]; then
    log "building the release binaries trainq-server and trainq-worker"
    cargo build --release -p server -p worker --bins
  fi
fi
for binary in trainq-server trainq-worker; do
  [ -x "$bin_dir/$binary" ] || die "$bin_dir/$binary is missing"
done

local_dir="${TRAINQ_LOCAL_DIR:-$root/.local}"
mkdir -p "$local_dir"
local_dir="$(cd "$local_dir" && pwd)"

# ---- Postgres ---------------------------------------------------------------------------------

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/trainq}"
pg_bin=""
pg_data="$local_dir/postgres"

# 0: a server accepts connections at URL $1; 1: one is there but not accepting yet (starting up);
# 2: nothing answers; 3: the URL is not understood. pg_isready's codes.
pg_state() {
  if command -v pg_isready >/dev/null; then
    local rc=0
    pg_isready -q -t 3 -d "$1" || rc=$?
    return "$rc"
  fi
  local host port
  read -r host port <<<"$(url_host_port "$1" 5432)"
  accepts "$host" "$port" || return 2
}

find_pg_bin() {
  if [ -n "${TRAINQ_PG_BIN:-}" ]; then
    [ -x "$TRAINQ_PG_BIN/initdb" ] || die "no initdb in TRAINQ_PG_BIN=$TRAINQ_PG_BIN"
    echo "$TRAINQ_PG_BIN"
  elif command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v initdb)"
  else
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
      die "initdb not found: a private Postgres needs the PostgreSQL server binaries (Debian/Ubuntu: \
apt-get install postgresql), or set TRAINQ_PG_BIN to the folder of initdb and pg_ctl"
    fi
    echo "$dir"
  fi
}

# initdb and postgres refuse to run as root: then they run as the `postgres` user. From /, a
# folder that user may enter whatever the caller's is.
pg_run() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && "$@")
  fi
}

start_private_postgres() {
  pg_bin=$(find_pg_bin)
  mkdir -p "$pg_data"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 ||
      die "running as root, the private Postgres must run as the postgres user, which does not exist: \
create it (useradd postgres) or run as an ordinary user"
    touch "$local_dir/postgres.log"
    chown postgres: "$pg_data" "$local_dir/postgres.log"
    runuser -u postgres -- test -w "$pg_data" ||
      die "the postgres user cannot reach $pg_data: let it enter the folders above it \
(chmod o+x) or set TRAINQ_LOCAL_DIR elsewhere"
  fi
  if [ ! -e "$pg_data/PG_VERSION" ]; then
    [ -z "$(ls -A "$pg_data")" ] || die "$pg_data is neither empty nor a Postgres data folder"
    log "creating a private Postgres cluster in $pg_data"
    pg_run "$pg_bin/initdb" -D "$pg_data" -U postgres -A trust -E UTF8 >"$local_dir/initdb.log" 2>&1 ||
      die "initdb failed: see $local_dir/initdb.log"
  fi
  local port as_postgres=""
  [ "$(id -u)" != 0 ] || as_postgres="runuser -u postgres -- "
  if pg_run "$pg_bin/pg_ctl" -D "$pg_data" status >/dev/null 2>&1; then
    # A run that was killed (not stopped) left it: use it, but it is not this run's to stop.
    port=$(sed -n 4p "$pg_data/postmaster.pid")
    log "the private Postgres of an earlier run still runs (port $port): using it; it keeps running \
after this script (stop it with: ${as_postgres}$pg_bin/pg_ctl -D $pg_data stop)"
    pg_note="private, left running by an earlier run, data in $pg_data"
  else
    port=$(free_port)
    log "starting a private Postgres on 127.0.0.1:$port (data in $pg_data)"
    # Set first: a start that times out may still leave a server to stop.
    pg_started=1
    # No Unix socket: its default folder may not exist, and a socket path has a length limit.
    pg_run "$pg_bin/pg_ctl" -D "$pg_data" -l "$local_dir/postgres.log" -w -t 60 \
      -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null ||
      die "the private Postgres did not start: see $local_dir/postgres.log"
    pg_note="private, data in $pg_data"
  fi
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/trainq"
}

pg_note="not started by this script"
rc=0
pg_state "$DATABASE_URL" || rc=$?
case $rc in
  0) ;;
  1)
    log "the Postgres at $DATABASE_URL is starting up: waiting for it"
    for _ in $(seq 1 30); do
      rc=0
      pg_state "$DATABASE_URL" || rc=$?
      [ "$rc" != 0 ] || break
      sleep 1
    done
    [ "$rc" = 0 ] || die "the Postgres at $DATABASE_URL does not accept connections"
    ;;
  2)
    read -r pg_host _ <<<"$(url_host_port "$DATABASE_URL" 5432)"
    # A private server stands in for a local one only: a remote one that is down is an error.
    is_loopback "$pg_host" ||
      die "no Postgres answers at $DATABASE_URL: start it, or unset DATABASE_URL for a private one"
    start_private_postgres
    ;;
  *) die "DATABASE_URL=$DATABASE_URL is not a Postgres URL that pg_isready understands" ;;
esac

# ---- Redis ------------------------------------------------------------------------------------

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"

# Whether the Redis at URL $1 answers PING (without redis-cli: whether its port accepts).
redis_answers() {
  if command -v redis-cli >/dev/null; then
    [[ "$(timeout 5 redis-cli -u "$1" ping 2>/dev/null)" == *PONG* ]]
  else
    local host port
    read -r host port <<<"$(url_host_port "$1" 6379)"
    accepts "$host" "$port"
  fi
}

redis_note="not started by this script"
if ! redis_answers "$REDIS_URL"; then
  read -r redis_host redis_port <<<"$(url_host_port "$REDIS_URL" 6379)"
  is_loopback "$redis_host" ||
    die "no Redis answers at $REDIS_URL: start it, or unset REDIS_URL for a private one"
  # Something that listens without answering PING (a password, another service) is not replaced.
  ! accepts "$redis_host" "$redis_port" ||
    die "something listens at $redis_host:$redis_port but does not answer PING as $REDIS_URL"
  redis_server="${TRAINQ_REDIS_SERVER:-$(command -v redis-server || true)}"
  [ -n "$redis_server" ] ||
    die "redis-server not found: a private Redis needs it (Debian/Ubuntu: apt-get install \
redis-server), or set TRAINQ_REDIS_SERVER"
  mkdir -p "$local_dir/redis"
  port=$(free_port)
  log "starting a private Redis on 127.0.0.1:$port"
  # Nothing persisted: the coordinator rebuilds the queues from Postgres.
  spawn "$redis_server" --port "$port" --bind 127.0.0.1 --dir "$local_dir/redis" --save "" \
    --appendonly no --daemonize no --logfile "$local_dir/redis.log"
  redis_pid=$spawned
  REDIS_URL="redis://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    redis_answers "$REDIS_URL" && break
    kill -0 "$redis_pid" 2>/dev/null || die "the private Redis exited at start: see $local_dir/redis.log"
    sleep 0.1
  done
  redis_answers "$REDIS_URL" || die "the private Redis does not answer PING: see $local_dir/redis.log"
  redis_note="private"
fi

# ---- coordinator and worker -------------------------------------------------------------------

read -r grpc_host grpc_port <<<"$(connect_host_port "${TRAINQ_LISTEN:-0.0.0.0:50051}")"
grpc_addr=$(address "$grpc_host" "$grpc_port")
if accepts "$grpc_host" "$grpc_port"; then
  die "something already listens at $grpc_addr: stop it, or set TRAINQ_LISTEN to another address"
fi
scheme=http
[ -z "${TRAINQ_TLS_CERT:-}" ] || scheme=https

log "starting the coordinator (gRPC at $grpc_addr)"
spawn "$bin_dir/trainq-server"
server_pid=$spawned
# It serves once its database exists and is migrated; the worker needs it up.
for _ in $(seq 1 1200); do
  accepts "$grpc_host" "$grpc_port" && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    status=0
    wait "$server_pid" || status=$?
    server_pid=""
    die "the coordinator exited at start (status $status)"
  fi
  sleep 0.1
done
accepts "$grpc_host" "$grpc_port" || die "the coordinator does not accept connections at $grpc_addr"

log "starting a worker"
# Its own flag for the metrics port: it would otherwise read the coordinator's
# TRAINQ_METRICS_LISTEN and fail to bind the same port.
spawn "$bin_dir/trainq-worker" \
  --coordinator "${TRAINQ_COORDINATOR:-$scheme://$grpc_addr}" \
  --metrics-listen "${TRAINQ_WORKER_METRICS_LISTEN:-0.0.0.0:9092}"
worker_pid=$spawned

read -r http_host http_port <<<"$(connect_host_port "${TRAINQ_HTTP_LISTEN:-0.0.0.0:8080}")"
if command -v grpcurl >/dev/null; then
  grpcurl_cmd=grpcurl
elif [ -x "$root/.tools/grpcurl" ]; then
  # scripts/setup.sh puts it there; a relative path only from the repository itself.
  if [ "$start_dir" = "$root" ]; then grpcurl_cmd=.tools/grpcurl; else grpcurl_cmd="$root/.tools/grpcurl"; fi
else
  grpcurl_cmd=grpcurl
  log "(grpcurl is not installed: scripts/setup.sh puts it in .tools/grpcurl)"
fi
grpcurl_flags=-plaintext
[ "$scheme" = http ] || grpcurl_flags=-insecure
if [ -n "${TRAINQ_CLIENT_TOKENS:-}${TRAINQ_CLIENT_TOKENS_FILE:-}" ]; then
  grpcurl_flags="$grpcurl_flags -H \"authorization: Bearer \$TRAINQ_TOKEN\""
fi
try_spec='{"spec": {"name": "try-mnist", "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.001, "maxTrainExamples": 2000, "maxTestExamples": 500}, "mnistClassifier": {}}}'

log "Postgres:    $DATABASE_URL ($pg_note)"
log "Redis:       $REDIS_URL ($redis_note)"
log "coordinator: $grpc_addr (gRPC)"
metrics="${TRAINQ_METRICS_LISTEN:-0.0.0.0:9091}"
if [ "$metrics" != off ]; then
  read -r metrics_host metrics_port <<<"$(connect_host_port "$metrics")"
  log "metrics:     http://$(address "$metrics_host" "$metrics_port")/metrics"
fi
log "web UI:      http://$(address "$http_host" "$http_port")/"
log "try:         $grpcurl_cmd $grpcurl_flags -d '$try_spec' $grpc_addr trainq.v1.JobService/SubmitJob"
log "Ctrl-C stops the worker and the coordinator (and the private servers this script started)"

# Until Ctrl-C, or until one of them ends (then the rest is stopped too).
status=0
wait -n || status=$?
for pid_name in "$server_pid:coordinator" "$worker_pid:worker" "$redis_pid:private Redis"; do
  pid=${pid_name%%:*}
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    log "the ${pid_name#*:} exited (status $status): stopping the rest"
  fi
done
exit "$status"
