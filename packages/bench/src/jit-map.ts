// JIT-compiled JavaScript has no symbols under callgrind: it shows as `???:0x…` addresses. With
// `--perf-basic-prof`, V8 writes each code object's address range and name to
// /tmp/perf-<pid>.map; this puts those names on callgrind's addresses (`instructions --js`).
import { readFileSync, renameSync, rmSync } from 'node:fs';

interface CodeRange {
  readonly start: number;
  readonly end: number;
  readonly name: string;
}

/**
 * The code ranges V8 wrote for process `pid`, oldest first (a range may be reused later). The map
 * is moved to `keepAs` (beside the callgrind file, `--keep`), else deleted.
 */
export function readPerfMap(pid: number, keepAs?: string): CodeRange[] {
  const file = `/tmp/perf-${pid}.map`;
  const ranges: CodeRange[] = [];
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const match = /^([0-9a-f]+) ([0-9a-f]+) (.*)$/.exec(line);
    if (!match) continue;
    const start = parseInt(match[1]!, 16);
    ranges.push({ start, end: start + parseInt(match[2]!, 16), name: match[3]! });
  }
  if (keepAs === undefined) rmSync(file, { force: true });
  else renameSync(file, keepAs);
  return ranges;
}

/**
 * Self instructions per JS function (per request), from `callgrind_annotate --inclusive=no`
 * lines of unnamed code. The newest range holding an address names it: V8 reuses code space,
 * and the counted requests run after the warm-up, on the newest code.
 */
export function jsSelfCost(annotated: string, ranges: readonly CodeRange[], requests: number): Map<string, number> {
  const cost = new Map<string, number>();
  for (const line of annotated.split('\n')) {
    const match = /^\s*([\d,]+) \(.*\?\?\?:0x([0-9a-f]+) \[\?\?\?\]/.exec(line);
    if (!match) continue;
    const n = Number(match[1]!.replaceAll(',', '')) / requests;
    const address = parseInt(match[2]!, 16);
    let name = '(no code range)';
    for (let i = ranges.length - 1; i >= 0; i--) {
      const range = ranges[i]!;
      if (address >= range.start && address < range.end) {
        name = range.name;
        break;
      }
    }
    cost.set(name, (cost.get(name) ?? 0) + n);
  }
  return cost;
}
