/**
 * Issue 10.6: scope isolation. The fixture app scopes keys by the `x-user` header. User B sending
 * user A's key gets its own execution, never A's response — on every store.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { post } from './support/http.js';
import { countRecords, dropNamespace, location, type StoreKind } from '../src/records.js';
import { namespace, serviceUrl } from '../src/services.js';
import { APP, ProcessPool } from '../src/spawn.js';

const pool = new ProcessPool();
afterAll(() => pool.stopAll());

const cases: Array<[StoreKind | 'memory', string]> = [
  ['memory', 'fastify'],
  ['postgres', 'express'],
  ['redis', 'koa'],
  ['redis-cluster', 'fastify'],
  ['mongodb', 'express'],
];

interface Order {
  id: string;
  scope: string | null;
}
const parse = (text: string) => JSON.parse(text) as Order;

describe.each(cases)('scope isolation on %s (%s)', (kind, framework) => {
  it('same key, other user: own execution, own replay, never the other one’s response', async () => {
    const url = kind === 'memory' ? '' : await serviceUrl(kind);
    const ns = namespace(`scope_${kind.replace('-', '_')}`);
    const app = await pool.spawn(APP, { FRAMEWORK: framework, STORE: kind, STORE_URL: url, PREFIX: ns });
    try {
      const key = `${ns}-shared-key`;
      const as = (user: string | undefined, body: unknown = { item: 'book' }) =>
        post(`${app.url}/orders`, body, { 'idempotency-key': key, ...(user === undefined ? {} : { 'x-user': user }) });

      const a1 = await as('alice');
      const b1 = await as('bob');
      const anon1 = await as(undefined);
      for (const r of [a1, b1, anon1]) {
        expect(r.status).toBe(201);
        expect(r.headers.get('idempotent-replayed')).toBeNull();
      }
      expect(parse(a1.text).scope).toBe('alice');
      expect(parse(b1.text).scope).toBe('bob');
      expect(new Set([a1, b1, anon1].map((r) => parse(r.text).id)).size).toBe(3);

      // Each replays its own; a different body under another user's key is no mismatch (422) either.
      for (const [user, first] of [['alice', a1], ['bob', b1], [undefined, anon1]] as const) {
        const again = await as(user);
        expect(again.headers.get('idempotent-replayed')).toBe('true');
        expect(again.text).toBe(first.text);
      }
      const carol = await as('carol', { item: 'something else' });
      expect(carol.status).toBe(201);
      expect(parse(carol.text).scope).toBe('carol');

      // Concurrent: two users hammer the same key at once; one execution each.
      const burst = await Promise.all(Array.from({ length: 20 }, (_, i) => as(i % 2 ? 'dave' : 'erin')));
      const ok = burst.filter((r) => r.status === 201);
      expect(burst.every((r) => r.status === 201 || r.status === 409)).toBe(true);
      for (const r of ok) expect(parse(r.text).scope).toBe(burst.indexOf(r) % 2 ? 'dave' : 'erin');
      expect(new Set(ok.filter((r) => parse(r.text).scope === 'dave').map((r) => parse(r.text).id)).size).toBe(1);
      expect(new Set(ok.filter((r) => parse(r.text).scope === 'erin').map((r) => parse(r.text).id)).size).toBe(1);

      // Scope and key that a naive "scope:key" join would run together: `a:b` + `c` vs `a` + `b:c`.
      const x = await post(`${app.url}/orders`, {}, { 'idempotency-key': `b:c-${ns}`, 'x-user': 'a' });
      const y = await post(`${app.url}/orders`, {}, { 'idempotency-key': `c-${ns}`, 'x-user': 'a:b' });
      expect(y.headers.get('idempotent-replayed')).toBeNull();
      expect(parse(x.text).id).not.toBe(parse(y.text).id);

      const runs = app.events('RUN');
      const runsFor = (scope: string | undefined) => runs.filter((e) => e.key === key && e.scope === scope).length;
      expect([runsFor('alice'), runsFor('bob'), runsFor(undefined), runsFor('carol'), runsFor('dave'), runsFor('erin')]).toEqual([1, 1, 1, 1, 1, 1]);
      if (kind !== 'memory') {
        const records = await countRecords(kind, url, location(kind, ns, 'app'));
        expect(records).toMatchObject({ total: 8, completed: 8, inProgress: 0 });
      }
    } finally {
      await app.stop();
      if (kind !== 'memory') await dropNamespace(kind, url, [`${ns}_keys`], `${ns}:`);
    }
  });
});
