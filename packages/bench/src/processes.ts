import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { ServerSpec, ServerStats } from './config.js';

// Built next to this file; under vitest (src/*.ts) the built copy in dist/ is the one to run.
const SERVER_JS = fileURLToPath(new URL(import.meta.url.endsWith('.ts') ? '../dist/server.js' : './server.js', import.meta.url));

export interface RunningServer {
  readonly spec: ServerSpec;
  readonly url: string;
  readonly pid: number;
  stats(): Promise<ServerStats>;
  /** Stats once no request is in flight (requests cut off by the end of a run have settled); 5 s at most. */
  settledStats(): Promise<ServerStats>;
  /** SIGTERM, then waits for the exit (the server cleans its store up first). */
  stop(): Promise<void>;
  /** SIGKILL, then waits for the exit: a crash, so nothing is cleaned up. */
  kill(): Promise<void>;
}

/** Starts dist/server.js in its own process and waits for its `READY <port>` line. */
export async function startServer(spec: ServerSpec, nodeArgs: readonly string[] = []): Promise<RunningServer> {
  // An experiment's knob: the server on CPUs of its own, apart from the runner (README, Stop 21).
  const cpus = process.env['IDEMKIT_BENCH_SERVER_CPUS'];
  const argv = [...nodeArgs, SERVER_JS];
  const child: ChildProcess = spawn(cpus ? 'taskset' : process.execPath, cpus ? ['-c', cpus, process.execPath, ...argv] : argv, {
    env: { ...process.env, BENCH_SERVER: JSON.stringify(spec), NODE_ENV: 'production' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server ${label(spec)} not ready in 30 s\n${stderr}`)), 30_000);
    child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
      out += chunk;
      const match = /READY (\d+)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`server ${label(spec)} exited (${code}) before it was ready\n${stderr}`));
    });
  });
  const url = `http://127.0.0.1:${port}`;
  const stats = async (): Promise<ServerStats> => (await (await fetch(`${url}/__stats`)).json()) as ServerStats;
  return {
    spec,
    url,
    pid: child.pid ?? -1,
    stats,
    settledStats: async () => {
      const deadline = Date.now() + 5_000;
      let current = await stats();
      while (current.inFlight > 0 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 20)); // polling a counter, not ordering events
        current = await stats();
      }
      return current;
    },
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const code = await exited;
      if (code !== 0 && code !== null) throw new Error(`server ${label(spec)} exited with ${code}\n${stderr}`);
    },
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

export function label(spec: Pick<ServerSpec, 'framework' | 'library' | 'store'>): string {
  return spec.library === 'bare' ? `${spec.framework}/bare` : `${spec.framework}/${spec.library}/${spec.store}`;
}
