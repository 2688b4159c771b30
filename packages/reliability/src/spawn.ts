import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The fixture server of this package (built by `pnpm build`). */
export const APP = fileURLToPath(new URL('../dist/app.js', import.meta.url));
/** The queue consumer of this package, running one `idempotent()` job (`src/job-worker.ts`). */
export const JOB_WORKER = fileURLToPath(new URL('../dist/job-worker.js', import.meta.url));
/** A one-shot job script: one `idempotent()` call, then it ends by itself (`src/job-once.ts`). */
export const JOB_ONCE = fileURLToPath(new URL('../dist/job-once.js', import.meta.url));
/** The built demo app (`apps/demo`), started as `pnpm demo` does. */
export const DEMO = fileURLToPath(new URL('../../../apps/demo/dist/main.js', import.meta.url));

export interface ServerProcess {
  readonly url: string;
  readonly child: ChildProcess;
  readonly pid: number;
  /** Everything the process wrote to stdout and stderr so far. */
  output(): string;
  /** Parsed stdout lines `KIND {json}` the fixture app writes (RUN, LEASE-LOST, …). */
  events(kind: string): Array<Record<string, unknown>>;
  /** SIGTERM, then SIGKILL after 5 s; resolves once the process is gone. */
  stop(): Promise<void>;
}

/**
 * Start a server script as its own process and wait for its `… on http://127.0.0.1:PORT` line.
 * Generalises `spawnDemo` of apps/demo/test/processes.ts (same contract) so one helper serves both
 * the demo and this package's fixture app; the demo's copy stays the demo's.
 */
export function spawnServer(script: string, env: Record<string, string>, nodeArgs: string[] = [], startMs = 30_000): Promise<ServerProcess> {
  const child = spawn(process.execPath, [...nodeArgs, script], {
    env: { ...process.env, PORT: '0', NODE_ENV: 'test', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr?.on('data', (c: Buffer) => (out += c.toString()));
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const alive = () => child.exitCode === null && child.signalCode === null;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${script} did not start within ${startMs} ms:\n${out}`));
    }, startMs);
    const check = () => {
      const url = /on (http:\/\/127\.0\.0\.1:\d+)/.exec(out)?.[1];
      if (!url) return;
      clearTimeout(timer);
      child.stdout?.off('data', check);
      resolve({
        url,
        child,
        pid: child.pid!,
        output: () => out,
        events: (kind) =>
          out
            .split('\n')
            .filter((l) => l.startsWith(`${kind} `))
            .map((l) => JSON.parse(l.slice(kind.length + 1)) as Record<string, unknown>),
        async stop() {
          if (!alive()) return;
          child.kill('SIGCONT'); // a test may have paused it
          child.kill('SIGTERM');
          const hard = setTimeout(() => alive() && child.kill('SIGKILL'), 5_000);
          await gone;
          clearTimeout(hard);
        },
      });
    };
    child.stdout?.on('data', check);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${script} exited (${code ?? signal}) before listening:\n${out}`));
    });
  });
}

/** Stops every process a test file started, even when the test failed half-way. */
export class ProcessPool {
  readonly #all: ServerProcess[] = [];

  async spawn(script: string, env: Record<string, string>, nodeArgs: string[] = []): Promise<ServerProcess> {
    const p = await spawnServer(script, env, nodeArgs);
    this.#all.push(p);
    return p;
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.#all.splice(0).map((p) => p.stop()));
  }
}
