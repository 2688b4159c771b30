// Instructions per request, counted by valgrind's callgrind: a number that other jobs on the
// machine do not move, for changes too small to show through timing noise (see README).
//
//   node dist/instructions.js [--frameworks=fastify,express] [--libraries=bare,probe-store,idemkit]
//        [--paths=new-key,replay] [--warmup=3000] [--requests=1000] [--repeat=1] [--keep] [--js]
//
// Each server runs in one Node process under callgrind with counting off (`--instr-atstart=no`).
// It spawns its own client outside valgrind (children are not traced), which sends `warmup`
// requests one at a time over one keep-alive loopback connection, turns counting on in the server
// (`vgdb instrumentation on`), sends `requests` more and turns it off: startup, module loading and
// the warm-up's JIT tiering are not counted. V8 runs single-threaded with fixed seeds. `--js` adds
// V8's perf map, so the instructions of JIT-compiled JavaScript are named by function.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { request, Agent } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { jsSelfCost, readPerfMap } from './jit-map.js';
import { createOrder, type AppContext, type Counters, type LibrarySetup } from './apps/context.js';
import { BENCH_TTL_MS, ORDER_BODY, REPLAY_KEY, type Framework, type LoadPath } from './config.js';

type Measured = 'bare' | 'probe-hook' | 'probe-store' | 'idemkit';
const SELF = fileURLToPath(import.meta.url);
const NODE_FLAGS = ['--single-threaded', '--predictable-gc-schedule', '--no-memory-reducer', '--hash-seed=1', '--random-seed=1'];

const argv = process.argv.slice(2);
const flag = (name: string): string | undefined => argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const list = <T extends string>(name: string, fallback: readonly T[]): T[] => (flag(name)?.split(',') as T[] | undefined) ?? [...fallback];
/** `--js`: V8 writes a perf map, so the JIT-compiled JavaScript's instructions get function names. */
const JS = argv.includes('--js');
const KEEP = argv.includes('--keep');


/**
 * Tells callgrind in the server process `serverPid` what to do (a vgdb monitor command). vgdb wakes
 * a process blocked in a system call, so this runs while the server waits for the next request.
 */
function monitor(serverPid: number, ...command: string[]): void {
  const run = spawnSync('vgdb', [`--pid=${serverPid}`, ...command], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`vgdb ${command.join(' ')} failed: ${run.stderr}`);
}

/**
 * The client: `warmup` POST /orders one after another on one keep-alive connection, then
 * callgrind's instrumentation on in the server, `count` more, and instrumentation off.
 */
async function client(port: number, path: LoadPath, warmup: number, count: number, serverPid: number): Promise<void> {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  const send = (key: string): Promise<number> =>
    new Promise((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, method: 'POST', path: '/orders', agent, headers: { 'content-type': 'application/json', 'idempotency-key': key } }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end(ORDER_BODY);
    });
  let bad = 0;
  for (let i = 0; i < warmup + count; i++) {
    if (i === warmup) monitor(serverPid, 'instrumentation', 'on');
    const status = await send(path === 'replay' ? REPLAY_KEY : `k-${i}`);
    if (status !== 201) bad++;
  }
  monitor(serverPid, 'instrumentation', 'off');
  agent.destroy();
  if (bad > 0) {
    process.stderr.write(`${bad} answers were not 201\n`);
    process.exitCode = 1;
  }
}

/** One server process (the one under callgrind): answers `count` requests from its client, then exits. */
async function serve(framework: Framework, measured: Measured, path: LoadPath, warmup: number, measuredCount: number): Promise<void> {
  const count = warmup + measuredCount;
  let library: LibrarySetup = { kind: 'bare' };
  if (measured === 'idemkit') {
    const { createMemoryStore } = await import('@idemkit/core');
    library = { kind: 'idemkit', store: createMemoryStore(), ttlMs: BENCH_TTL_MS, leaseMs: undefined, storeTimeoutMs: undefined, localCache: false };
  } else if (measured === 'probe-store') {
    const { AnswerKeeper } = await import('./apps/probes.js');
    library = { kind: 'probe-store', keeper: new AnswerKeeper() };
  } else if (measured === 'probe-hook') library = { kind: 'probe-hook' };
  const counters: Counters = { requests: 0, runs: 0, slowRuns: 0, crashRuns: 0 };
  const context: AppContext = { library, counters, order: (body) => createOrder(counters, body), stats: () => ({ ...counters, roundTrips: 0, inFlight: 0, cpuMicros: 0, kept: 0 }) };
  const { createServer } = await import('node:http');
  let server;
  if (framework === 'fastify') {
    const { fastifyApp } = await import('./apps/fastify-app.js');
    const app = await fastifyApp(context);
    await app.ready();
    server = app.server;
  } else if (framework === 'express') {
    const { expressApp } = await import('./apps/express-app.js');
    server = createServer(expressApp(context));
  } else {
    const { koaApp } = await import('./apps/koa-app.js');
    server = createServer(koaApp(context).callback());
  }
  // Under valgrind on a busy machine the server may not run for seconds: Node's 5 s keep-alive
  // timer would then close the connection under the client's next request.
  server.keepAliveTimeout = 600_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const child = spawn(process.execPath, [SELF, '--client', String(port), path, String(warmup), String(measuredCount), String(process.pid)], { stdio: ['ignore', 'inherit', 'inherit'] });
  const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
  const expectedRuns = path === 'replay' && measured === 'idemkit' ? 1 : count;
  if (code !== 0 || counters.requests !== count || counters.runs !== expectedRuns) {
    process.stderr.write(`client exit ${code}, ${counters.requests} requests, ${counters.runs} handler runs (expected ${count}, ${expectedRuns})\n`);
    process.exit(1);
  }
  process.exit(0);
}

/** Self instructions of V8's garbage collector and of its compilers, told apart by C++ symbol. */
const GC = /Scaveng|Marking|MarkCompact|Sweep|Heap::|heap::|Evacuat|IterateObjectCache|RememberedSet|SlotSet|SizeFromMap|GCTracer|Collector/;
const COMPILER = /compiler::|Maglev|maglev|baseline::|Baseline|interpreter::Bytecode|Parser|Scanner|Zone|Compiler|turboshaft|RegisterAllocator/;

interface Count {
  readonly total: number;
  readonly gc: number;
  readonly compiler: number;
  /** `--js`: self instructions per request of each JIT-compiled JS function. */
  readonly js: Map<string, number> | null;
}

/** Runs one server process under callgrind, counting only the measured requests; its instructions. */
function count(dir: string, framework: Framework, measured: Measured, path: LoadPath, warmup: number, requests: number, tag: string): Count {
  const out = join(dir, `callgrind.${framework}-${measured}-${path}-${tag}.out`);
  const args = ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${out}`, process.execPath, ...NODE_FLAGS, ...(JS ? ['--perf-basic-prof'] : []), SELF, '--serve', framework, measured, path, String(warmup), String(requests)];
  const run = spawnSync('valgrind', args, { encoding: 'utf8', env: { ...process.env, NODE_ENV: 'production' }, maxBuffer: 64 * 1024 * 1024 });
  if (run.status !== 0) throw new Error(`callgrind run failed (${framework} ${measured} ${path}):\n${run.stderr.slice(-2000)}`);
  const annotated = spawnSync('callgrind_annotate', ['--inclusive=no', '--threshold=100', out], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  let total = 0;
  let gc = 0;
  let compiler = 0;
  for (const line of annotated.stdout.split('\n')) {
    const match = /^\s*([\d,]+) \(/.exec(line);
    if (!match?.[1]) continue;
    const n = Number(match[1].replaceAll(',', ''));
    if (line.includes('PROGRAM TOTALS')) total = n;
    else if (GC.test(line)) gc += n;
    else if (COMPILER.test(line)) compiler += n;
  }
  if (total === 0) throw new Error(`no totals in ${out}`);
  // Under valgrind the traced program keeps valgrind's process id, which names V8's perf map.
  const js = JS ? jsSelfCost(annotated.stdout, readPerfMap(run.pid, KEEP ? `${out}.perf-map` : undefined), requests) : null;
  return { total: total / requests, gc: gc / requests, compiler: compiler / requests, js };
}

const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');

/** The JIT-compiled JS functions with the most self instructions per request (`--js`). */
function printJs(js: Map<string, number>): void {
  const sorted = [...js].sort((a, b) => b[1] - a[1]);
  const all = sorted.reduce((sum, [, n]) => sum + n, 0);
  process.stderr.write(`  JIT-compiled JS: ${fmt(all)} per request; the top 40 functions:\n`);
  for (const [name, n] of sorted.slice(0, 40)) process.stderr.write(`  ${fmt(n).padStart(7)}  ${name}\n`);
}

function main(): void {
  const frameworks = list<Framework>('frameworks', ['fastify', 'express']);
  const libraries = list<Measured>('libraries', ['bare', 'probe-store', 'idemkit']);
  const paths = list<LoadPath>('paths', ['new-key', 'replay']);
  const warmup = Number(flag('warmup') ?? 3_000);
  const requests = Number(flag('requests') ?? 1_000);
  const repeat = Number(flag('repeat') ?? 1);
  const dir = mkdtempSync(join(tmpdir(), 'idemkit-instructions-'));
  process.stderr.write(`callgrind outputs in ${dir}; ${warmup} warm-up requests, then ${requests} counted\n`);
  const rows: string[] = [
    '| framework | library | path | instructions/request less JIT and GC | per run | GC per run | JIT compiler per run |',
    '| --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const framework of frameworks) {
    for (const measured of libraries) {
      for (const path of paths) {
        // Bare and the probes have no replay: the same request runs the handler again.
        if (path === 'replay' && measured !== 'idemkit') continue;
        const each: Count[] = [];
        for (let r = 0; r < repeat; r++) {
          const c = count(dir, framework, measured, path, warmup, requests, String(r));
          each.push(c);
          process.stderr.write(`${framework} ${measured} ${path}: ${fmt(c.total - c.gc - c.compiler)} (total ${fmt(c.total)}, GC ${fmt(c.gc)}, JIT ${fmt(c.compiler)})\n`);
          if (c.js) printJs(c.js);
        }
        const rest = each.map((c) => c.total - c.gc - c.compiler);
        const mean = rest.reduce((a, b) => a + b, 0) / rest.length;
        rows.push(`| ${framework} | ${measured} | ${path} | ${fmt(mean)} | ${rest.map(fmt).join(', ')} | ${each.map((c) => fmt(c.gc)).join(', ')} | ${each.map((c) => fmt(c.compiler)).join(', ')} |`);
      }
    }
  }
  process.stdout.write(`${rows.join('\n')}\n`);
  if (!KEEP) rmSync(dir, { recursive: true, force: true });
}

if (argv[0] === '--client') await client(Number(argv[1]), argv[2] as LoadPath, Number(argv[3]), Number(argv[4]), Number(argv[5]));
else if (argv[0] === '--serve') await serve(argv[1] as Framework, argv[2] as Measured, argv[3] as LoadPath, Number(argv[4]), Number(argv[5]));
else main();
