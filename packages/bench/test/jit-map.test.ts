import { existsSync, writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { jsSelfCost, readPerfMap } from '../src/jit-map.js';

// What `callgrind_annotate --inclusive=no` prints for unnamed (JIT-compiled) code, and a V8 perf map.
const annotated = `
--------------------------------------------------------------------------------
239,027,153 (100.0%)  PROGRAM TOTALS
--------------------------------------------------------------------------------
4,058,000 ( 1.70%)  ???:sha256_block_data_order_avx2 [/usr/bin/node]
1,374,894 ( 0.58%)  ???:0x000000000d1697c0 [???]
1,000,000 ( 0.42%)  ???:0x000000000d1697f0 [???]
  500,000 ( 0.21%)  ???:0x000000000d200000 [???]
  250,000 ( 0.10%)  ???:0x0000000000000100 [???]
`;

describe('jit-map', () => {
  it('names JIT code by the newest perf-map range holding its address, sums per function and per request, and leaves out native symbols', () => {
    const pid = 900_000_000 + Math.floor(Math.random() * 1_000_000);
    writeFileSync(
      `/tmp/perf-${pid}.map`,
      [
        'd169000 1000 JS:~decide file:///core/dist/index.js:10:1', // an older range, reused below
        'd169700 200 JS:*decide file:///core/dist/index.js:10:1',
        'd200000 10 JS:*fast file:///core/dist/index.js:20:1',
        'not a map line',
      ].join('\n'),
    );
    const ranges = readPerfMap(pid);
    // V8 appends to the map for the life of the process: read once, then removed.
    expect(existsSync(`/tmp/perf-${pid}.map`)).toBe(false);
    const cost = jsSelfCost(annotated, ranges, 1000);
    expect(Object.fromEntries(cost)).toEqual({
      'JS:*decide file:///core/dist/index.js:10:1': 1_374.894 + 1_000,
      'JS:*fast file:///core/dist/index.js:20:1': 500,
      '(no code range)': 250,
    });
  });
});
