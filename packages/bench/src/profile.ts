// `pnpm --filter @idemkit/bench profile`: the hot path under load, profiled. Starts one server with
// `node --cpu-prof`, drives it with autocannon from this process, stops it (the profile is
// written at exit) and prints self time aggregated by function and by package.
import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ordersTable, type Framework, type HandlerKind, type Library, type LoadPath, type ServiceEnv, type StoreName } from './config.js';
import { summarize, type CpuProfile, type ProfileSummary } from './cpuprofile.js';
import { load, primeReplay } from './load.js';
import { ordersTableFor } from './orders-table.js';
import { label, startServer } from './processes.js';
import { acquireServices } from './services.js';
import { markdown } from './table.js';

interface ProfileArgs {
  framework: Framework;
  library: Library;
  store: StoreName;
  path: LoadPath;
  handler: HandlerKind;
  duration: number;
  connections: number;
  top: number;
  /** Summarise this existing .cpuprofile instead of running a server. */
  file: string | null;
  requests: number;
}

function parse(argv: readonly string[]): ProfileArgs {
  const args: ProfileArgs = { framework: 'fastify', library: 'idemkit', store: 'memory', path: 'new-key', handler: 'hello', duration: 10, connections: 10, top: 30, file: null, requests: 0 };
  for (const arg of argv) {
    if (arg === '--') continue;
    const [flag = '', value = ''] = arg.replace(/^--/, '').split('=', 2);
    if (flag === 'duration' || flag === 'connections' || flag === 'top' || flag === 'requests') args[flag] = Number(value);
    else if (flag === 'file') args.file = value;
    else if (flag === 'framework') args.framework = value as Framework;
    else if (flag === 'library') args.library = value as Library;
    else if (flag === 'store') args.store = value as StoreName;
    else if (flag === 'path') args.path = value as LoadPath;
    else if (flag === 'handler') args.handler = value as HandlerKind;
    else throw new Error(`unknown argument ${arg}: --framework= --library= --store= --path=new-key|replay --handler=hello|postgres --duration= --connections= --top=, or --file=X.cpuprofile [--requests=N]`);
  }
  return args;
}

export function renderSummary(title: string, summary: ProfileSummary, top: number, requests: number): string {
  const perRequest = (ms: number): string => ((ms * 1000) / Math.max(1, requests)).toFixed(1);
  const functions = markdown(
    ['self ms', 'self %', 'µs/req', 'total %', 'function', 'where'],
    summary.functions.slice(0, top).map((f) => [f.selfMs.toFixed(0), f.selfPercent.toFixed(1), perRequest(f.selfMs), f.totalPercent.toFixed(1), f.name, f.where]),
    [0, 1, 2, 3],
  );
  // idemkit's own functions by inclusive time: what each step of the engine costs, callees included.
  const ours = markdown(
    ['total ms', 'total %', 'µs/req', 'function', 'where'],
    summary.functions
      .filter((f) => f.owner.startsWith('@idemkit/') && f.owner !== '@idemkit/bench')
      .sort((a, b) => b.totalMs - a.totalMs)
      .slice(0, 20)
      .map((f) => [f.totalMs.toFixed(0), f.totalPercent.toFixed(1), perRequest(f.totalMs), f.name, f.where]),
    [0, 1, 2],
  );
  const owners = markdown(
    ['self ms', 'self %', 'package'],
    summary.owners.slice(0, 15).map((o) => [o.selfMs.toFixed(0), o.selfPercent.toFixed(1), o.owner]),
    [0, 1],
  );
  return [
    `## ${title}`,
    '',
    `Busy ${summary.busyMs.toFixed(0)} ms of ${summary.totalMs.toFixed(0)} ms sampled (the rest idle) for ${requests} requests ` +
      `(warm-up included): ${((summary.busyMs * 1000) / Math.max(1, requests)).toFixed(0)} µs of CPU per request. Percentages are of busy time.`,
    '',
    '### Self time by package',
    '',
    owners,
    '',
    `### Top ${top} functions by self time`,
    '',
    functions,
    '',
    '### idemkit functions by inclusive time (callees included)',
    '',
    ours,
    '',
  ].join('\n');
}

async function main(): Promise<void> {
  const args = parse(process.argv.slice(2));
  if (args.file !== null) {
    const summary = summarize(JSON.parse(readFileSync(args.file, 'utf8')) as CpuProfile);
    process.stdout.write(renderSummary(args.file, summary, args.top, args.requests));
    return;
  }
  const stamp = new Date().toISOString().replaceAll(':', '-').replace(/\..*$/, '');
  const dir = fileURLToPath(new URL(`../bench-results/profile-${stamp}/`, import.meta.url));
  mkdirSync(dir, { recursive: true });
  const needsServices = args.handler === 'postgres' || (args.store !== 'memory' && args.library !== 'bare');
  const services = needsServices ? await acquireServices((l) => process.stderr.write(`[profile] ${l}\n`)) : null;
  const env: ServiceEnv = services?.env ?? {};
  const runId = randomBytes(4).toString('hex');
  const table = ordersTable(`prof_${runId}`);
  const orders = args.handler === 'postgres' ? await ordersTableFor(env, table) : null;
  try {
    const server = await startServer({ framework: args.framework, library: args.library, store: args.store, runId: `prof_${runId}`, env, handler: args.handler, ordersTable: table }, [
      '--cpu-prof',
      `--cpu-prof-dir=${dir}`,
    ]);
    const name = `${label(server.spec)} ${args.path}`;
    let requests = 0;
    try {
      const warm = await load(server.url, args.path, { duration: 2, connections: args.connections }); // warm-up, JIT
      if (args.path === 'replay') await primeReplay(server.url);
      const result = await load(server.url, args.path, { duration: args.duration, connections: args.connections });
      requests = warm.requests + result.requests + 1;
      process.stderr.write(`[profile] ${name}: ${Math.round(result.rps)} req/s, p99 ${result.p99} ms, ${result.non2xx} non-2xx\n`);
    } finally {
      await server.stop();
    }
    const file = readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
    if (!file) throw new Error(`no .cpuprofile written to ${dir}`);
    const summary = summarize(JSON.parse(readFileSync(join(dir, file), 'utf8')) as CpuProfile);
    const text = renderSummary(`${name} (${args.connections} connections, ${args.duration} s + 2 s warm-up, Node ${process.version})`, summary, args.top, requests);
    writeFileSync(join(dir, 'summary.md'), text);
    process.stdout.write(`${text}\nprofile: ${join(dir, file)}\nsummary: ${join(dir, 'summary.md')}\n`);
  } finally {
    await orders?.drop();
    await services?.release();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`[profile] failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
