import { Redis } from 'ioredis';

/**
 * Reads the CPU time a Redis server has used (`INFO cpu`: used_cpu_user + used_cpu_sys, µs), so
 * a run on Redis can say what it cost Redis per request. Redis counts its own time, so this works
 * for a Redis anywhere; it includes every client's commands, so runs must not overlap.
 */
export interface RedisCpu {
  micros(): Promise<number>;
  close(): Promise<void>;
}

export async function redisCpu(url: string): Promise<RedisCpu> {
  const client = new Redis(url, { lazyConnect: true });
  await client.connect();
  return {
    micros: async () => {
      const info = await client.info('cpu');
      const seconds = (name: string): number => {
        const value = new RegExp(`^${name}:([0-9.]+)`, 'm').exec(info)?.[1];
        if (value === undefined) throw new Error(`INFO cpu has no ${name}: ${info}`);
        return Number(value);
      };
      return Math.round((seconds('used_cpu_user') + seconds('used_cpu_sys')) * 1e6);
    },
    close: async () => {
      await client.quit();
    },
  };
}
