import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';

const run = promisify(execFile);

/** A free loopback port: bind to 0, read the port, let it go. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

async function ping(port: number): Promise<boolean> {
  const client = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return (await client.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}

async function until(what: string, ms: number, check: () => Promise<boolean>): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`${what} not reached within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A throwaway redis-server of this test on its own loopback port, never the machine's 6379:
 * stopping it is part of the test. No persistence, so a restart comes back empty.
 */
export class ThrowawayRedis {
  readonly #dir = mkdtempSync(join(tmpdir(), 'idemkit-rel-redis-'));
  #pid: number | undefined;

  private constructor(readonly port: number) {}

  static async start(): Promise<ThrowawayRedis> {
    const redis = new ThrowawayRedis(await freePort());
    await redis.up();
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async up(): Promise<void> {
    const pidfile = join(this.#dir, 'redis.pid');
    rmSync(pidfile, { force: true });
    await run('redis-server', [
      '--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--daemonize', 'yes', '--pidfile', pidfile, '--dir', this.#dir, '--logfile', join(this.#dir, 'redis.log'),
    ]);
    await until(`redis-server on ${this.port}`, 10_000, () => ping(this.port));
    this.#pid = Number(readFileSync(pidfile, 'utf8').trim());
  }

  /** SIGKILL: the server vanishes mid-command, as a crash or a network cut would look to the app. */
  async down(): Promise<void> {
    const pid = this.#pid;
    if (pid === undefined) return;
    this.#pid = undefined;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      return; // already gone
    }
    await until(`redis-server ${pid} exit`, 10_000, async () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    });
  }

  async stop(): Promise<void> {
    await this.down();
    rmSync(this.#dir, { recursive: true, force: true });
  }
}
