// Sums vitest JSON reports into the one plain line CI reads: `N passed, N failed`.
// Usage: node sum-results.mjs DIR [DIR...]. Each DIR holds, per package run by scripts/test.sh,
// NAME.json (vitest's JSON reporter) and NAME.rc (vitest's exit code). Exit 1 when anything
// failed or no test ran at all, so "0 passed" can never look green.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { stripVTControlCharacters } from 'node:util';

const run = (dir) => dir.split('/').pop();
// Without colour codes, cut to one screen line.
const firstLine = (text) => stripVTControlCharacters(String(text ?? '')).split('\n')[0].slice(0, 300);

let passed = 0;
let failed = 0;
const problems = [];
// Each failed test with its first message line: CI shows only the end of the output, so the names
// must be here, next to the count, not only in the package's log far above.
const failures = [];

for (const dir of process.argv.slice(2)) {
  if (!existsSync(dir)) continue;
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.rc'))) {
    const name = file.slice(0, -3);
    const rc = Number(readFileSync(join(dir, file), 'utf8').trim());
    const reportPath = join(dir, `${name}.json`);
    let pkgPassed = 0;
    let pkgFailed = 0;
    if (existsSync(reportPath)) {
      const r = JSON.parse(readFileSync(reportPath, 'utf8'));
      pkgPassed = r.numPassedTests ?? 0;
      pkgFailed = r.numFailedTests ?? 0;
      // A file that failed to load has no failed test, only a failed suite: count it as one.
      for (const t of r.testResults ?? []) {
        const assertions = t.assertionResults ?? [];
        const file = relative(process.cwd(), t.name ?? '');
        for (const a of assertions.filter((x) => x.status === 'failed')) {
          failures.push(`${run(dir)}/${name}: ${file} > ${a.fullName ?? a.title}\n    ${firstLine(a.failureMessages?.[0])}`);
        }
        if (t.status === 'failed' && !assertions.some((a) => a.status === 'failed')) {
          pkgFailed += 1;
          failures.push(`${run(dir)}/${name}: ${file} (did not load)\n    ${firstLine(t.message)}`);
        }
      }
    }
    // vitest exits non-zero on unhandled errors even when every test passed: count that too.
    if (rc !== 0 && pkgFailed === 0) pkgFailed = 1;
    if (rc !== 0) problems.push(`${run(dir)}/${name} (exit ${rc})`);
    passed += pkgPassed;
    failed += pkgFailed;
  }
}

if (failures.length > 0) console.error(`failed tests:\n  ${failures.join('\n  ')}`);
if (problems.length > 0) console.error(`failing runs: ${problems.join(', ')}`);
if (passed + failed === 0) console.error('no test ran');
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
