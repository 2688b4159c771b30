#!/usr/bin/env bash
# The project's test command (`pnpm test`): real services up, build, every package's vitest run
# one package at a time (2 cores), then one plain closing line `N passed, N failed`.
# Assumes `pnpm install` was done. Exits non-zero when a test failed or when no test ran.
#
# Knobs: IDEMKIT_TEST_RESULTS_DIR (vitest JSON reports, default .tmp/test-results),
# IDEMKIT_TEST_SKIP_BUILD=1 (the caller just built), plus everything scripts/services.sh reads.
# TEST_* variables that are already set are used as they are (SPEC §4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export TURBO_TELEMETRY_DISABLED=1 DO_NOT_TRACK=1
RESULTS="${IDEMKIT_TEST_RESULTS_DIR:-$ROOT/.tmp/test-results}"
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

echo "node $(node --version); services: postgres=$TEST_POSTGRES_URL redis=$TEST_REDIS_URL cluster=$TEST_REDIS_CLUSTER_NODES mongodb=$TEST_MONGODB_URL"
for dir in packages/* apps/*; do
  [[ -f "$dir/package.json" ]] || continue
  if ! has_tests "$dir"; then
    echo "-- $dir: no test files, skipped"
    continue
  fi
  name="$(basename "$dir")"
  echo "== $dir"
  rc=0
  pnpm --dir "$dir" run test --reporter=default --reporter=json --outputFile.json="$RESULTS/$name.json" || rc=$?
  echo "$rc" >"$RESULTS/$name.rc"
done

node scripts/lib/sum-results.mjs "$RESULTS"
