#!/usr/bin/env bash
# The project's test command (`pnpm test`): real services up, build, every package's vitest run
# (two at a time, see below), then one plain closing line `N passed, N failed`.
# Assumes `pnpm install` was done. Exits non-zero when a test failed or when no test ran.
#
# Knobs: IDEMKIT_TEST_RESULTS_DIR (vitest JSON reports, default .tmp/test-results),
# IDEMKIT_TEST_SKIP_BUILD=1 (the caller just built), IDEMKIT_TEST_JOBS (packages at a time,
# default 2), IDEMKIT_TEST_LEAVE_OUT (package dirs not to run, space-separated, each named in the
# output), plus everything scripts/services.sh reads.
# TEST_* variables that are already set are used as they are (SPEC §4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export TURBO_TELEMETRY_DISABLED=1 DO_NOT_TRACK=1
RESULTS="${IDEMKIT_TEST_RESULTS_DIR:-$ROOT/.tmp/test-results}"
[[ "${IDEMKIT_TEST_JOBS:-2}" =~ ^[1-9][0-9]*$ ]] ||
  { echo "IDEMKIT_TEST_JOBS must be a whole number >= 1, not '${IDEMKIT_TEST_JOBS}'" >&2; exit 2; }
rm -rf "$RESULTS"
mkdir -p "$RESULTS"

# Services: shared with any other run on this machine; `down` stops them once no run uses them.
export IDEMKIT_SERVICES_OWNER=$$
# down's notes go to a log so that the closing count stays the last line of the output.
trap 'bash "$ROOT/scripts/services.sh" down 2>>"$RESULTS/services-down.log" || true' EXIT
bash scripts/services.sh up "$RESULTS/services.env"
# shellcheck source=/dev/null
source "$RESULTS/services.env"

# The demo's browser test drives Debian's Chromium (no browser download is possible here). Install
# it when missing and we can (root with apt-get, as on this project's machines); otherwise the
# browser test fails and says how to provide it.
if [[ -z "${CHROMIUM_PATH:-}" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the browser test"
    apt-get update -qq </dev/null >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null >/dev/null
  fi
fi

if [[ "${IDEMKIT_TEST_SKIP_BUILD:-}" != 1 ]]; then
  pnpm turbo run build --output-logs=errors-only
fi

# Packages that have a test script and at least one test file; the rest are left out rather than
# passed with --passWithNoTests, so an empty run can't look green.
has_tests() {
  local dir="$1"
  node -e 'process.exit(require(process.argv[1]).scripts?.test ? 0 : 1)' "$ROOT/$dir/package.json" || return 1
  [[ -n "$(find "$dir" \( -name node_modules -o -name dist \) -prune -o -type f \
    \( -name '*.test.ts' -o -name '*.test.mts' -o -name '*.test.js' -o -name '*.test.mjs' -o -name '*.test.tsx' \
       -o -name '*.spec.ts' -o -name '*.spec.js' \) -print -quit)" ]]
}

# Two packages at a time: the suite waits on servers, leases and child processes far more than it
# computes (about a third of two cores when run one by one), and every test file already has its
# own schema / key prefix / database. Packages that start several servers of their own and hold
# them to timing bounds run alone, after the rest. IDEMKIT_TEST_JOBS=1 runs everything in turn.
JOBS="${IDEMKIT_TEST_JOBS:-2}" # checked at the top
ALONE=" packages/reliability apps/demo "
# Longest first, so the last one to start is short (the order only moves the finishing time).
ORDER="packages/fastify packages/mongodb packages/koa packages/express packages/redis packages/postgres"

# One package's vitest run; its output is held back and printed whole when it ends.
run_package() {
  local dir="$1" name rc=0 start=$SECONDS
  name="$(basename "$dir")"
  pnpm --dir "$dir" run test --reporter=default --reporter=json --outputFile.json="$RESULTS/$name.json" \
    >"$RESULTS/$name.log" 2>&1 </dev/null || rc=$?
  echo "$rc" >"$RESULTS/$name.rc"
  { echo "== $dir (exit $rc, $((SECONDS - start)) s)"; cat "$RESULTS/$name.log"; } >"$RESULTS/$name.out"
}

echo "node $(node --version); services: postgres=$TEST_POSTGRES_URL redis=$TEST_REDIS_URL cluster=$TEST_REDIS_CLUSTER_NODES mongodb=$TEST_MONGODB_URL"
pooled=()
alone=()
seen=" "
for dir in $ORDER packages/* apps/*; do
  [[ -f "$dir/package.json" && "$seen" != *" $dir "* ]] || continue
  seen+="$dir "
  if [[ " ${IDEMKIT_TEST_LEAVE_OUT:-} " == *" $dir "* ]]; then
    echo "-- $dir: left out by IDEMKIT_TEST_LEAVE_OUT"
    continue
  fi
  if ! has_tests "$dir"; then
    echo "-- $dir: no test files, skipped"
    continue
  fi
  if [[ "$ALONE" == *" $dir "* ]]; then alone+=("$dir"); else pooled+=("$dir"); fi
done

# Prints each finished package's output as a block, in the order they finish.
flush() {
  local out
  for out in "$RESULTS"/*.out; do
    [[ -e "$out" ]] || continue
    cat "$out"
    rm -f "$out"
  done
}

running=0
for dir in "${pooled[@]}"; do
  if ((running >= JOBS)); then
    wait -n || true
    running=$((running - 1))
    flush
  fi
  run_package "$dir" &
  running=$((running + 1))
done
wait || true
flush
for dir in "${alone[@]}"; do
  run_package "$dir"
  flush
done

node scripts/lib/sum-results.mjs "$RESULTS"
