#!/usr/bin/env bash
# Real test services on a machine without a container engine (SPEC §4): the machine's PostgreSQL
# and Redis, a three-master Redis Cluster and FerretDB (MongoDB wire protocol), all on 127.0.0.1.
#
#   scripts/services.sh up [ENV_FILE]   start what is missing, write TEST_* exports to ENV_FILE
#   scripts/services.sh prepare         only build what `up` needs (FerretDB), start nothing
#   scripts/services.sh down            leave; stop what this script started once nobody uses it
#   scripts/services.sh status          show users and services
#
# A TEST_* variable already set by the caller wins: nothing is started for that service.
# Several runs may share the services (two clones, a CI run and a developer): each `up` registers
# its owner process (IDEMKIT_SERVICES_OWNER, default: the calling shell) under the state dir, and
# `down` stops things only when no live owner is left. It only ever stops processes it started
# itself (pid files in the state dir), so a machine's own servers that were already up stay up.
#
# Knobs: IDEMKIT_SERVICES_DIR (state, default ${TMPDIR:-/tmp}/idemkit-services),
# IDEMKIT_REDIS_CLUSTER_PORTS (default "7101 7102 7103"), IDEMKIT_FERRETDB_PORT (default 27117),
# IDEMKIT_FERRETDB_BIN (default $(go env GOPATH)/bin/idemkit-ferretdb-v1.24.2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${IDEMKIT_SERVICES_DIR:-${TMPDIR:-/tmp}/idemkit-services}"
CLUSTER_PORTS="${IDEMKIT_REDIS_CLUSTER_PORTS:-7101 7102 7103}"
FERRETDB_PORT="${IDEMKIT_FERRETDB_PORT:-27117}"
FERRETDB_VERSION="v1.24.2"
OWNER="${IDEMKIT_SERVICES_OWNER:-$PPID}"
PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_PORT="${IDEMKIT_REDIS_PORT:-6379}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Polls a readiness command (not test ordering: servers have no other way to say they are up).
wait_for() {
  local what="$1" secs="$2"; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "$what not ready after ${secs}s"
    sleep 0.2
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A pid file counts only while its process still runs one of our servers: after a reboot or a
# killed run the number may belong to an unrelated process, which must never be signalled.
# FerretDB is known by the data dir we give it, not by its file name (IDEMKIT_FERRETDB_BIN can
# name any file: such a FerretDB used to outlive `down`).
pid_alive() {
  local pid
  [[ -f "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -e 'redis-server' -e "--sqlite-url=file:$STATE/ferretdb/data/"
}

# Stops the process in a pid file (ours by construction) and waits for it to go.
stop_pidfile() {
  local f="$1" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if pid_alive "$f"; then
    kill "$pid" 2>/dev/null || true
    local end=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------- machine PostgreSQL and Redis
pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

ensure_postgres() {
  command -v pg_isready >/dev/null || die "PostgreSQL client tools are missing; install PostgreSQL or set TEST_POSTGRES_URL"
  if ! pg_ready; then
    local ver
    ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)"
    [[ -n "$ver" ]] || die "no PostgreSQL cluster under /etc/postgresql; set TEST_POSTGRES_URL"
    log "starting the machine's PostgreSQL $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start </dev/null >>"$STATE/postgres-start.log" 2>&1 9>&- ||
      die "pg_ctlcluster failed, see $STATE/postgres-start.log"
    echo "$ver" >"$STATE/postgres.started"
    wait_for PostgreSQL 30 pg_ready
  fi
  if [[ "$(psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -tAc "select 1 from pg_database where datname = 'test'")" != 1 ]]; then
    log "creating database test"
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qc 'create database test' >/dev/null
  fi
  TEST_POSTGRES_URL="postgres://postgres@$PG_HOST:$PG_PORT/test"
}

redis_ready() { [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]; }

ensure_redis() {
  command -v redis-server >/dev/null || die "redis-server is missing; install Redis or set TEST_REDIS_URL"
  if ! redis_ready "$REDIS_PORT"; then
    log "starting the machine's Redis on $REDIS_PORT"
    local dir=/var/lib/redis logfile=/var/log/redis/ci.log
    [[ -d "$dir" && -d "$(dirname "$logfile")" ]] || { dir="$STATE/redis"; logfile="$STATE/redis/redis.log"; mkdir -p "$dir"; }
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$dir" --logfile "$logfile" --pidfile "$STATE/redis.pid" </dev/null 9>&-
    wait_for Redis 20 redis_ready "$REDIS_PORT"
  fi
  TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
}

# ---------------------------------------------------------------- Redis Cluster (3 masters)
cluster_ok() {
  local p
  for p in $CLUSTER_PORTS; do
    redis-cli -h 127.0.0.1 -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

cluster_ours_alive() {
  local p
  for p in $CLUSTER_PORTS; do pid_alive "$STATE/cluster/$p/redis.pid" || return 1; done
}

stop_cluster() {
  local d
  for d in "$STATE"/cluster/*/; do
    [[ -d "$d" ]] && stop_pidfile "$d/redis.pid"
  done
  rm -rf "$STATE/cluster"
}

ensure_cluster() {
  local p nodes=()
  for p in $CLUSTER_PORTS; do nodes+=("127.0.0.1:$p"); done
  if cluster_ours_alive && cluster_ok; then
    log "reusing the Redis Cluster on ${CLUSTER_PORTS// /,}"
  else
    stop_cluster # half-started leftovers of a killed run: start clean
    for p in $CLUSTER_PORTS; do
      port_open "$p" || port_open $((p + 10000)) &&
        die "port $p or $((p + 10000)) is taken by a process this script did not start; set IDEMKIT_REDIS_CLUSTER_PORTS or TEST_REDIS_CLUSTER_NODES"
    done
    log "starting a Redis Cluster on ${CLUSTER_PORTS// /,}"
    for p in $CLUSTER_PORTS; do
      mkdir -p "$STATE/cluster/$p"
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 5000 --dir "$STATE/cluster/$p" --save '' --appendonly no --daemonize yes \
        --pidfile "$STATE/cluster/$p/redis.pid" --logfile "$STATE/cluster/$p/redis.log" </dev/null 9>&-
    done
    for p in $CLUSTER_PORTS; do wait_for "cluster node $p" 20 redis_ready "$p"; done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes </dev/null >"$STATE/cluster/create.log" 2>&1 ||
      die "redis-cli --cluster create failed, see $STATE/cluster/create.log"
    wait_for "Redis Cluster (cluster_state:ok)" 30 cluster_ok
  fi
  TEST_REDIS_CLUSTER_NODES="$(IFS=,; echo "${nodes[*]}")"
}

# ---------------------------------------------------------------- FerretDB (MongoDB wire protocol)
ferretdb_bin() {
  if [[ -n "${IDEMKIT_FERRETDB_BIN:-}" ]]; then echo "$IDEMKIT_FERRETDB_BIN"; return; fi
  command -v go >/dev/null || die "Go is missing: it builds FerretDB for the MongoDB tests; install Go or set TEST_MONGODB_URL"
  echo "$(go env GOPATH)/bin/idemkit-ferretdb-$FERRETDB_VERSION"
}

# `go install .../cmd/ferretdb@v1.24.2` yields a binary that panics at start (missing version.txt),
# so scripts/ferretdb wraps FerretDB's embeddable package; it builds once per machine (minutes cold).
# Its own lock (fd 8), not the state lock: `prepare` builds without registering an owner, and a
# concurrent `up` then waits for that build instead of starting a second one into the same file.
build_ferretdb() {
  local bin="$1"
  [[ -x "$bin" ]] && return 0
  command -v go >/dev/null || die "Go is missing: it builds FerretDB for the MongoDB tests; install Go or set TEST_MONGODB_URL"
  mkdir -p "$(dirname "$bin")"
  exec 8>"$bin.lock"
  flock -w 900 8 || die "another build of $bin held $bin.lock for 15 minutes"
  if [[ ! -x "$bin" ]]; then
    log "building FerretDB $FERRETDB_VERSION into $bin (first time on this machine)"
    (cd "$ROOT/scripts/ferretdb" && go build -trimpath -o "$bin.tmp" .) 8>&- 9>&- || die "building FerretDB failed"
    mv "$bin.tmp" "$bin"
  fi
  exec 8>&-
}

mongo_url() { echo "mongodb://127.0.0.1:$FERRETDB_PORT/"; }

ferretdb_ready() { node "$ROOT/scripts/lib/mongo-ping.mjs" "$(mongo_url)" "$1"; }

ensure_ferretdb() {
  local bin dir="$STATE/ferretdb"
  if pid_alive "$dir/ferretdb.pid" && ferretdb_ready 3000; then
    log "reusing FerretDB on 127.0.0.1:$FERRETDB_PORT"
  else
    stop_pidfile "$dir/ferretdb.pid"
    rm -rf "$dir"
    port_open "$FERRETDB_PORT" &&
      die "port $FERRETDB_PORT is taken by a process this script did not start; set IDEMKIT_FERRETDB_PORT or TEST_MONGODB_URL"
    bin="$(ferretdb_bin)"
    build_ferretdb "$bin"
    mkdir -p "$dir/data"
    log "starting FerretDB $FERRETDB_VERSION (SQLite) on 127.0.0.1:$FERRETDB_PORT"
    # setsid: its own session, so it outlives this script and a Ctrl-C in the caller's terminal.
    DO_NOT_TRACK=1 setsid "$bin" --handler=sqlite --sqlite-url="file:$dir/data/" \
      --listen-addr="127.0.0.1:$FERRETDB_PORT" --debug-addr=- --telemetry=disable --log-level=error \
      </dev/null >"$dir/ferretdb.log" 2>&1 9>&- &
    echo $! >"$dir/ferretdb.pid"
    ferretdb_ready 30000 || die "FerretDB did not answer ping within 30s, see $dir/ferretdb.log"
  fi
  TEST_MONGODB_URL="$(mongo_url)"
}

# ---------------------------------------------------------------- owners
live_owners() {
  local f
  for f in "$STATE"/owners/*; do
    [[ -e "$f" ]] || continue
    if kill -0 "$(basename "$f")" 2>/dev/null; then echo "$(basename "$f")"; else rm -f "$f"; fi
  done
}

stop_all_ours() {
  stop_cluster
  stop_pidfile "$STATE/ferretdb/ferretdb.pid"
  rm -rf "$STATE/ferretdb"
  if [[ -f "$STATE/redis.pid" ]]; then log "stopping the Redis this script started"; stop_pidfile "$STATE/redis.pid"; fi
  if [[ -f "$STATE/postgres.started" ]]; then
    log "stopping the PostgreSQL this script started"
    pg_ctlcluster --skip-systemctl-redirect "$(cat "$STATE/postgres.started")" main stop </dev/null >/dev/null 2>&1 9>&- || true
    rm -f "$STATE/postgres.started"
  fi
}

write_env() {
  local file="$1" v text
  text="# written by scripts/services.sh up; source it"$'\n'
  for v in TEST_POSTGRES_URL TEST_REDIS_URL TEST_REDIS_CLUSTER_NODES TEST_MONGODB_URL; do
    text+="$(printf 'export %s=%q' "$v" "${!v}")"$'\n'
  done
  if [[ -L "$file" || (-e "$file" && ! -f "$file") || "$file" == /dev/* || "$file" == /proc/* ]]; then
    printf '%s' "$text" >"$file" # /dev/stdout, a pipe, a link: write through, never replace it
  else
    mkdir -p "$(dirname "$file")"
    printf '%s' "$text" >"$file.tmp" # tmp + rename: a concurrent `source` never reads half a file
    mv "$file.tmp" "$file"
  fi
}

lock() {
  mkdir -p "$STATE/owners"
  exec 9>"$STATE/lock"
  flock -w 900 9 || die "another services.sh held $STATE/lock for 15 minutes"
}

cmd_up() {
  local env_file="${1:-$STATE/env.sh}"
  lock
  touch "$STATE/owners/$OWNER"
  # Given variables win (SPEC §4): start nothing for them.
  [[ -n "${TEST_POSTGRES_URL:-}" ]] || ensure_postgres
  [[ -n "${TEST_REDIS_URL:-}" ]] || ensure_redis
  [[ -n "${TEST_REDIS_CLUSTER_NODES:-}" ]] || ensure_cluster
  [[ -n "${TEST_MONGODB_URL:-}" ]] || ensure_ferretdb
  write_env "$env_file"
  log "ready; source $env_file"
}

cmd_down() {
  [[ -d "$STATE" ]] || return 0
  lock
  rm -f "$STATE/owners/$OWNER"
  local others
  others="$(live_owners | tr '\n' ' ')"
  if [[ -n "$others" ]]; then
    log "still in use by process(es) $others; leaving services up"
  else
    stop_all_ours
    log "stopped what services.sh had started"
  fi
}

# Build what `up` would otherwise build first (FerretDB), starting nothing: CI runs this in the
# background while it installs and builds, since a cold FerretDB build takes minutes.
cmd_prepare() {
  [[ -n "${TEST_MONGODB_URL:-}" ]] || build_ferretdb "$(ferretdb_bin)"
}

cmd_status() {
  echo "state: $STATE"
  echo "owners: $( [[ -d "$STATE" ]] && live_owners | tr '\n' ' ')"
  pg_ready 2>/dev/null && echo "postgres: up ($PG_HOST:$PG_PORT)" || echo "postgres: down"
  redis_ready "$REDIS_PORT" && echo "redis: up (127.0.0.1:$REDIS_PORT)" || echo "redis: down"
  cluster_ok && echo "redis cluster: ok (${CLUSTER_PORTS// /,})" || echo "redis cluster: not ok"
  port_open "$FERRETDB_PORT" && echo "ferretdb: listening (127.0.0.1:$FERRETDB_PORT)" || echo "ferretdb: down"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  prepare) cmd_prepare ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [ENV_FILE] | prepare | down | status" >&2; exit 2 ;;
esac
