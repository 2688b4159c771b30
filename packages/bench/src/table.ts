import type { CrashRow, HttpRow } from './results.js';
import type { RaceResult } from './race.js';
import type { StoreBenchResult } from './store-bench.js';

const int = (n: number): string => Math.round(n).toLocaleString('en-US');
const ms = (n: number): string => (n >= 10 ? n.toFixed(0) : n.toFixed(1));

export function raceCell(race: RaceResult | null): string {
  if (race === null) return '–';
  const verdict = race.handlerRuns === 1 ? 'once' : `**${race.handlerRuns}×**`;
  const statuses = Object.entries(race.statuses)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([status, count]) => `${count}×${status}`)
    .join(' ');
  return `${verdict} (${statuses})`;
}

/** Markdown table of the HTTP runs (it reads as plain text in a terminal too). */
export function httpTable(rows: readonly HttpRow[]): string {
  const head = ['framework', 'library', 'store', 'path', 'req/s', 'p50 ms', 'p99 ms', '× bare', 'CPU µs/req', 'Redis µs/req', 'RT/req', 'race: handler ran'];
  const lines = rows.map((row) => [
    row.framework,
    row.library,
    row.store ?? '–',
    row.path,
    int(row.rps),
    ms(row.p50),
    ms(row.p99),
    row.ratio === null ? '1.00' : row.ratio.toFixed(2),
    row.serverCpuPerRequest.toFixed(0),
    row.redisCpuPerRequest === null ? '–' : row.redisCpuPerRequest.toFixed(0),
    row.roundTripsPerRequest === null ? '–' : row.roundTripsPerRequest.toFixed(2),
    raceCell(row.race),
  ]);
  return markdown(head, lines, [4, 5, 6, 7, 8, 9, 10]);
}

const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;

/** Until when after the kill the retries got 409 (times count from the kill, start-up included). */
function blockedCell(row: CrashRow): string {
  const lease = row.leaseMs === null ? '' : ` (lease ${seconds(row.leaseMs)})`;
  if (row.blockedMs === null) return `still at ${seconds(row.retriedMs)} (gave up)`;
  if (row.blockedMs === 0) return `none: the restart outlasted the lease${lease}`;
  return `${seconds(row.blockedMs)}${lease}`;
}

/** Markdown table of the crash check: what a retry gets after the process running it died. */
export function crashTable(rows: readonly CrashRow[]): string {
  const head = ['framework', 'library', 'store', 'restart', 'first retry', 'retries got 409 until', 'then', 'later retries', 'dead claim left in the store'];
  const lines = rows.map((row) => {
    const recovered = row.recoveredStatus !== null;
    const runs = row.runsAfterCrash === 1 ? 'once' : `**${row.runsAfterCrash}×**`;
    return [
      row.framework,
      row.library,
      row.store,
      seconds(row.restartMs),
      String(row.firstRetryStatus),
      blockedCell(row),
      recovered ? `${row.recoveredStatus}, handler ran ${runs}` : '–',
      row.replaysIdentical === null ? '–' : row.replaysIdentical ? 'replayed, identical' : '**differed**',
      recovered ? '–' : row.stillHeldMs === null ? 'unknown' : seconds(row.stillHeldMs),
    ];
  });
  return markdown(head, lines);
}

export function storeTable(results: readonly StoreBenchResult[]): string {
  const head = ['store', 'begin+complete /s', 'pair p50 ms', 'pair p99 ms', 'RT per pair', 'replay begins /s', 'RT per replay'];
  const lines = results.map((r) => [
    r.store,
    int(r.pairsPerSec),
    ms(r.pairP50),
    ms(r.pairP99),
    r.roundTripsPerPair.toFixed(2),
    int(r.replaysPerSec),
    r.roundTripsPerReplay.toFixed(2),
  ]);
  return markdown(head, lines, [1, 2, 3, 4, 5, 6]);
}

export function markdown(head: readonly string[], rows: readonly (readonly string[])[], rightAligned: readonly number[] = []): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => (row[i] ?? '').length)));
  const cell = (text: string, i: number): string => (rightAligned.includes(i) ? text.padStart(widths[i] ?? 0) : text.padEnd(widths[i] ?? 0));
  const line = (cells: readonly string[]): string => `| ${cells.map(cell).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (rightAligned.includes(i) ? `${'-'.repeat(w + 1)}:` : '-'.repeat(w + 2))).join('|')}|`;
  return [line(head), rule, ...rows.map(line)].join('\n');
}
