import { resolveMongo, resolvePostgres, resolveRedis, resolveRedisCluster, uniqueSuffix } from '@idemkit/test-services';
import type { StoreKind } from './records.js';

/** The URL (or node list) of a real server for one store kind; fails loudly when it is missing. */
export async function serviceUrl(kind: StoreKind): Promise<string> {
  switch (kind) {
    case 'postgres':
      return (await resolvePostgres()).value;
    case 'redis':
      return (await resolveRedis()).value;
    case 'mongodb':
      return (await resolveMongo()).value;
    case 'redis-cluster':
      return (await resolveRedisCluster()).value.map((n) => `${n.host}:${n.port}`).join(',');
  }
}

/** A namespace valid as a demo DEMO_NAMESPACE, a Postgres table prefix and a Mongo collection prefix. */
export function namespace(tag: string): string {
  return `rel_${tag}_${uniqueSuffix()}`;
}
