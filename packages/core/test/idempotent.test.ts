import { describe, expect, it, vi } from 'vitest';
import { ConfigurationError, createIdempotencyEngine, createMemoryStore, FingerprintMismatchError, idempotent, idempotentTransaction, RequestInProgressError, ResponseNotReplayableError, scopedKey, StoreUnavailableError, type IdempotencyStore } from '../src/index.js';

describe('idempotent(fn)', () => {
  it('runs fn once for 100 concurrent calls with one key and gives all of them the same result', async () => {
    const store = createMemoryStore();
    let runs = 0;
    const charge = idempotent(
      async (event: { id: string; amount: number }) => {
        runs++;
        await new Promise((r) => setTimeout(r, 50));
        return { chargeId: `ch_${runs}`, amount: event.amount };
      },
      { store, name: 'charge', key: (event) => event.id },
    );
    const results = await Promise.all(Array.from({ length: 100 }, () => charge({ id: 'evt_1', amount: 42 })));
    expect(runs).toBe(1);
    for (const r of results) expect(r).toEqual({ chargeId: 'ch_1', amount: 42 });
    expect(await charge({ id: 'evt_1', amount: 42 })).toEqual({ chargeId: 'ch_1', amount: 42 });
    expect(runs).toBe(1);
  });

  it("with concurrency: 'conflict', concurrent duplicates get the documented RequestInProgressError", async () => {
    const store = createMemoryStore();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const job = idempotent(async (id: string) => { await gate; return id; }, { store, name: 'job', key: (id) => id, concurrency: 'conflict' });
    const first = job('a');
    await vi.waitFor(async () => expect((await store.get('-:a'))?.state).toBe('in_progress'), { timeout: 10_000 });
    await expect(job('a')).rejects.toBeInstanceOf(RequestInProgressError);
    release();
    expect(await first).toBe('a');
  });

  it('an unset concurrency setting (undefined) keeps the wait default: a duplicate gets the result, not a 409', async () => {
    const store = createMemoryStore();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let runs = 0;
    const concurrency = process.env.IDEMKIT_NEVER_SET as 'wait' | undefined;
    const job = idempotent(async (id: string) => { runs++; await gate; return id; }, { store, name: 'job', key: (id) => id, concurrency });
    const first = job('a');
    await vi.waitFor(async () => expect((await store.get('-:a'))?.state).toBe('in_progress'), { timeout: 10_000 });
    // Before, the spread `undefined` replaced 'wait' and this rejected with RequestInProgressError.
    const second = job('a');
    release();
    expect(await Promise.all([first, second])).toEqual(['a', 'a']);
    expect(runs).toBe(1);
  });

  it('releases the key when fn throws, so a retry runs again', async () => {
    const store = createMemoryStore();
    let calls = 0;
    const flaky = idempotent(async (id: string) => {
      calls++;
      if (calls === 1) throw new Error('payment gateway timeout');
      return `ok:${id}`;
    }, { store, name: 'flaky', key: (id) => id });
    await expect(flaky('m1')).rejects.toThrow('payment gateway timeout');
    expect(await flaky('m1')).toBe('ok:m1');
    expect(await flaky('m1')).toBe('ok:m1');
    expect(calls).toBe(2);
  });

  it('rejects a call whose arguments differ from the first with the same key', async () => {
    const job = idempotent(async (id: string, amount: number) => amount, { store: createMemoryStore(), name: 'amount', key: (id) => id });
    await job('k', 1);
    await expect(job('k', 2)).rejects.toBeInstanceOf(FingerprintMismatchError);
  });

  // Was: the name was cut to its path as a request target is, so both were `/hook` and the second
  // job got the first one's result.
  it('tells apart two jobs whose names differ only before their path (URL-like names)', async () => {
    const store = createMemoryStore();
    const a = idempotent(async (id: string) => `a:${id}`, { store, name: 'https://a.example/hook', key: (id) => id });
    const b = idempotent(async (id: string) => `b:${id}`, { store, name: 'https://b.example/hook', key: (id) => id });
    expect(await a('evt_1')).toBe('a:evt_1');
    await expect(b('evt_1')).rejects.toBeInstanceOf(FingerprintMismatchError);
    expect(await a('evt_1')).toBe('a:evt_1');
  });

  it('tells apart arguments that differ only in a boxed number (each was fingerprinted as {})', async () => {
    let runs = 0;
    const charge = idempotent(
      async (order: { id: string; cents: unknown }) => {
        runs++;
        return { charged: Number(order.cents) };
      },
      { store: createMemoryStore(), name: 'boxed-charge', key: (order) => order.id },
    );
    expect(await charge({ id: 'o1', cents: new Number(100) })).toEqual({ charged: 100 });
    await expect(charge({ id: 'o1', cents: new Number(200) })).rejects.toBeInstanceOf(FingerprintMismatchError);
    // The same value, boxed or not, is the same call (as JSON writes both alike).
    expect(await charge({ id: 'o1', cents: 100 })).toEqual({ charged: 100 });
    expect(runs).toBe(1);
  });

  it('tells apart form-encoded webhooks passed as URLSearchParams, and refuses arguments it cannot see into', async () => {
    let runs = 0;
    const handle = idempotent(async (_id: string, form: URLSearchParams) => `${++runs}:${form.get('Body')}`, {
      store: createMemoryStore(),
      name: 'sms',
      key: (id) => id,
    });
    expect(await handle('SM1', new URLSearchParams('Body=yes'))).toBe('1:yes');
    // Before: every URLSearchParams fingerprinted as {}, so this replayed '1:yes'.
    await expect(handle('SM1', new URLSearchParams('Body=no'))).rejects.toBeInstanceOf(FingerprintMismatchError);
    expect(await handle('SM1', new URLSearchParams('Body=yes'))).toBe('1:yes');
    const upload = idempotent(async (_id: string, _file: Blob) => ++runs, { store: createMemoryStore(), name: 'upload', key: (id) => id, logger: false });
    await expect(upload('f1', new Blob(['a']))).rejects.toThrow(
      '[idemkit] idempotent(): the arguments of "upload" cannot be fingerprinted: they hold a Blob, whose data JSON cannot see, so fn was not run. Pass `fingerprint` with what identifies the work, e.g. `(msg) => msg.id`.',
    );
    expect(runs).toBe(1);
  });

  it('supports undefined results, custom serialisation, scope, custom and disabled fingerprints', async () => {
    const store = createMemoryStore();
    let n = 0;
    const voidJob = idempotent(async (_id: string) => { n++; }, { store, key: (id) => id, name: 'void-job' });
    expect(await voidJob('v')).toBeUndefined();
    expect(await voidJob('v')).toBeUndefined();
    expect(n).toBe(1);

    let dateRuns = 0;
    const dates = idempotent(
      async (_id: string) => {
        dateRuns++;
        return new Date(0);
      },
      {
        store,
        name: 'dates',
        key: (id) => id,
        serialize: (d) => d.toISOString(),
        deserialize: (b) => new Date(Buffer.from(b).toString()),
        scope: () => 'tenant-1',
        fingerprint: (id) => `custom:${id}`,
      },
    );
    expect((await dates('d')).getTime()).toBe(0);
    const replayed = await dates('d');
    expect(replayed).toBeInstanceOf(Date);
    expect(replayed.getTime()).toBe(0);
    expect(dateRuns).toBe(1);
    // Stored under the scope, with the custom fingerprint and the serialised form.
    const record = await store.get(scopedKey('tenant-1', 'd'));
    // The custom fingerprint, prefixed with the job's name.
    expect(record).toMatchObject({ state: 'completed', fingerprint: '5:dates:custom:d' });
    expect(Buffer.from(record?.response?.body ?? []).toString()).toBe('1970-01-01T00:00:00.000Z');

    const loose = idempotent(async (_id: string, x: number) => x, { store, name: 'loose', key: (id) => `loose-${id}`, fingerprint: false });
    expect(await loose('l', 1)).toBe(1);
    expect(await loose('l', 2)).toBe(1);
  });

  it("runs fn without idempotency when the store fails and onStoreError is 'pass'", async () => {
    const broken: IdempotencyStore = Object.assign(createMemoryStore(), { begin: () => Promise.reject(new Error('down')) });
    const job = idempotent(async () => 'ran', { store: broken, name: 'job', key: () => 'k', onStoreError: 'pass', logger: false });
    expect(await job()).toBe('ran');
  });

  it('a result whose completion the store failed: the call resolves once the retried completion stored it, not before', async () => {
    const store = createMemoryStore();
    const events: string[] = [];
    const complete = store.complete.bind(store);
    let failures = 0;
    // Away for the first two attempts (a failover), then back.
    store.complete = (...args) => (failures++ < 2 ? Promise.reject(new Error('failover')) : complete(...args));
    const job = idempotent(async (id: string) => ({ id }), {
      store,
      name: 'job',
      key: (id) => id,
      logger: false,
      onEvent: (e) => void (e.type === 'completed' && events.push(`completed stored=${e.stored}`)),
    });
    expect(await job('blip')).toEqual({ id: 'blip' });
    // By the time the caller has its result (and may ack the message, or exit), the store has it.
    expect(events).toEqual(['completed stored=true']);
    expect((await store.get(scopedKey(undefined, 'blip')))?.state).toBe('completed');
  });

  it('a completion the store keeps failing until the lease runs out: the call still resolves with its result, and says the lease was lost', async () => {
    const store = createMemoryStore();
    const events: string[] = [];
    store.complete = () => Promise.reject(new Error('down'));
    store.renew = () => Promise.reject(new Error('down'));
    const job = idempotent(async (id: string) => ({ id }), { store, name: 'job', key: (id) => id, leaseMs: 200, logger: false, onEvent: (e) => void events.push(e.type) });
    // fn ran: its result is the truth, whether or not it could be stored.
    expect(await job('outage')).toEqual({ id: 'outage' });
    expect(events).toContain('lease-lost');
  });

  describe('a call waiting on a completion the store failed, when the store is closed (a worker shutting down)', () => {
    /** A job on `store` whose completions always fail, and its events as text. */
    const failingJob = (store: IdempotencyStore, onStoreError?: 'pass') => {
      const events: string[] = [];
      let completionFailed!: () => void;
      const failed = new Promise<void>((resolve) => (completionFailed = resolve));
      const logged: string[] = [];
      const job = idempotent(async (id: string) => ({ id }), {
        store,
        name: 'job',
        key: (id) => id,
        onStoreError,
        logger: { warn: () => undefined, error: (message: string) => void logged.push(message) },
        onEvent: (e) => {
          events.push(e.type === 'completed' ? `completed stored=${e.stored}` : e.type === 'store-error' ? `store-error ${e.operation}` : e.type);
          if (e.type === 'store-error' && e.operation === 'complete') completionFailed();
        },
      });
      return { job, events, failed, logged };
    };

    it('settles as soon as close() is called, not when its lease (60 s) runs out, with its result and an event and log that it was not stored', async () => {
      const store = createMemoryStore();
      store.complete = () => Promise.reject(new Error('down'));
      const { job, events, failed, logged } = failingJob(store);
      const call = job('shutdown');
      await failed;
      const closedAt = performance.now();
      await store.close();
      // fn ran: its result is the truth. Before, the call (and the process) waited for about a
      // third of the lease, until a renewal found the record gone.
      expect(await call).toEqual({ id: 'shutdown' });
      expect(performance.now() - closedAt).toBeLessThan(1_000);
      expect(events).toEqual(['executed', 'store-error complete', 'completed stored=false', 'lease-lost']);
      expect(logged.join('\n')).toMatch(/store was closed .* "shutdown" .* not stored/);
    });

    it('settles at once when the store was already closed before its completion failed', async () => {
      const store = createMemoryStore();
      const events: string[] = [];
      const job = idempotent(
        async (id: string) => {
          await store.close();
          // A store that rejects once closed (as Redis's does).
          store.complete = () => Promise.reject(new Error('closed'));
          return { id };
        },
        { store, name: 'closing', key: (id) => id, logger: false, onEvent: (e) => void events.push(e.type) },
      );
      const started = performance.now();
      expect(await job('closed-first')).toEqual({ id: 'closed-first' });
      expect(performance.now() - started).toBeLessThan(1_000);
      expect(events).toEqual(['executed', 'store-error', 'completed', 'lease-lost']);
    });

    it('a store whose close() is a test double (vi.spyOn or vi.fn() made before setup) keeps it one, and closing it still ends the wait', async () => {
      // vi.spyOn before the job is set up (the app under test builds its jobs after the spy).
      const spied = createMemoryStore();
      spied.complete = () => Promise.reject(new Error('down'));
      const spy = vi.spyOn(spied, 'close');
      const first = failingJob(spied);
      const waiting = first.job('spied');
      await first.failed;
      await spied.close();
      expect(await waiting).toEqual({ id: 'spied' });
      expect(first.events).toContain('lease-lost');
      // Before, the store's close was a new function: "is not a spy".
      expect(spied.close).toHaveBeenCalledOnce();
      expect(spy).toHaveBeenCalledOnce();

      // A hand-made store double whose close is a vi.fn(): still mockable after setup.
      const inner = createMemoryStore();
      const double = {
        shared: false,
        begin: inner.begin.bind(inner),
        complete: () => Promise.reject(new Error('down')),
        release: inner.release.bind(inner),
        renew: inner.renew.bind(inner),
        get: inner.get.bind(inner),
        purgeExpired: inner.purgeExpired.bind(inner),
        close: vi.fn(() => Promise.resolve()),
      } satisfies IdempotencyStore;
      const second = failingJob(double);
      // Before: "mockRejectedValueOnce is not a function".
      double.close.mockRejectedValueOnce(new Error('close failed'));
      const pending = second.job('double');
      await second.failed;
      await expect(double.close()).rejects.toThrow('close failed');
      expect(await pending).toEqual({ id: 'double' });
      expect(double.close).toHaveBeenCalledOnce();
      expect(Object.keys(double)).toContain('close');
    });

    it('an attempt in flight when the store is closed is waited for: if it lands, the result is stored', async () => {
      const store = createMemoryStore();
      // A store whose close() leaves its records (a Postgres store on your own pool).
      store.close = () => Promise.resolve();
      const complete = store.complete.bind(store);
      let attempts = 0;
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let secondSent!: () => void;
      const sent = new Promise<void>((resolve) => (secondSent = resolve));
      // The first attempt fails; the second hangs until released, then lands.
      store.complete = (...args) => {
        if (++attempts === 1) return Promise.reject(new Error('blip'));
        secondSent();
        return held.then(() => complete(...args));
      };
      const events: string[] = [];
      const job = idempotent(async (id: string) => ({ id }), {
        store,
        name: 'job',
        key: (id) => id,
        logger: false,
        onEvent: (e) => void events.push(e.type === 'completed' ? `completed stored=${e.stored}` : e.type),
      });
      const call = job('in-flight');
      await sent;
      await store.close();
      release();
      expect(await call).toEqual({ id: 'in-flight' });
      expect(events).toEqual(['executed', 'store-error', 'completed stored=true']);
      expect((await store.get(scopedKey(undefined, 'in-flight')))?.state).toBe('completed');
    });
  });

  it("with onStoreError 'pass', a call whose completion the store failed waits too, so a blip at the end still leaves the result stored", async () => {
    const store = createMemoryStore();
    const complete = store.complete.bind(store);
    let failures = 1;
    store.complete = (...args) => (failures-- > 0 ? Promise.reject(new Error('blip')) : complete(...args));
    const events: string[] = [];
    const job = idempotent(async (id: string) => ({ id }), {
      store,
      name: 'job',
      key: (id) => id,
      onStoreError: 'pass',
      logger: false,
      onEvent: (e) => void events.push(e.type === 'completed' ? `completed stored=${e.stored}` : e.type),
    });
    expect(await job('blip')).toEqual({ id: 'blip' });
    // Stored before the call resolved: a script that exits now leaves nothing for a rerun to run again.
    expect(events).toEqual(['executed', 'store-error', 'completed stored=true']);
    expect((await store.get(scopedKey(undefined, 'blip')))?.state).toBe('completed');
  });

  it('a call whose `key` gives no key is refused before fn runs, in words about the call', async () => {
    let runs = 0;
    const job = idempotent(async (_msg: { id?: string }) => ++runs, { store: createMemoryStore(), name: 'job', key: (msg) => msg.id as string });
    // Before: 'This request needs an idempotency key.'
    await expect(job({})).rejects.toMatchObject({ code: 'ERR_IDEMKIT_KEY_MISSING', message: '`key` returned no key (undefined or null) for this call of "job", so fn was not run.' });
    await expect(job({ id: '' })).rejects.toMatchObject({
      code: 'ERR_IDEMKIT_KEY_INVALID',
      message: '`key` returned an unusable key for this call of "job", so fn was not run: The key is empty.',
    });
    // Before: 'The key must be a string.', with no word of which job or what it got (and numbers are taken).
    for (const id of [{ nested: 1 }, Number.NaN, true]) {
      await expect(job({ id: id as unknown as string })).rejects.toMatchObject({
        code: 'ERR_IDEMKIT_KEY_INVALID',
        message: '`key` returned an unusable key for this call of "job", so fn was not run: The key must be a string, a finite number or a bigint.',
      });
    }
    expect(runs).toBe(0);
  });

  it('a store that fails before fn runs is said for the call, not for a request', async () => {
    const store = createMemoryStore();
    store.begin = () => Promise.reject(new Error('connection refused'));
    let runs = 0;
    const job = idempotent(async (_id: string) => ++runs, { store, name: 'charge', key: (id) => id, logger: false });
    const error = await job('o1').catch((e: unknown) => e);
    // Before: 'The idempotency store is unavailable, so the request was not run. Retry with the same key.'
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect(error).toMatchObject({
      code: 'ERR_IDEMKIT_STORE_UNAVAILABLE',
      message: 'The idempotency store is unavailable, so fn was not run for this call of "charge". Retry the call (redeliver the message) with the same key.',
    });
    expect((error as Error).cause).toMatchObject({ message: 'connection refused' });
    expect(runs).toBe(0);
  });

  it('a numeric key (a database id) is its decimal text: 42 and "42" are one call, run once', async () => {
    let runs = 0;
    const store = createMemoryStore();
    const job = idempotent(async (order: { id: number | bigint | string }) => ({ run: ++runs, id: String(order.id) }), { store, name: 'ship', key: (order) => order.id, fingerprint: false });
    expect(await job({ id: 42 })).toEqual({ run: 1, id: '42' });
    expect(await job({ id: '42' })).toEqual({ run: 1, id: '42' });
    expect(await job({ id: 42n })).toEqual({ run: 1, id: '42' });
    expect((await store.get(scopedKey(undefined, '42')))?.state).toBe('completed');
    expect(runs).toBe(1);
  });

  it('refuses a name stores cannot keep at setup, naming `name`', () => {
    for (const name of ['pay\u0000out', 'pay\ud800']) {
      expect(() => idempotent(async () => 1, { store: createMemoryStore(), name, key: () => 'k', fingerprint: false })).toThrow(/`name` ".*" holds a NUL character or a lone surrogate/);
    }
  });

  it('validates its arguments', () => {
    expect(() => idempotent('nope' as unknown as () => void, { store: createMemoryStore(), key: () => 'k' })).toThrow(/fn/);
    expect(() => idempotent(async () => 1, { store: createMemoryStore() } as never)).toThrow(/key/);
  });

  it('refuses an anonymous fn without `name`: two inline jobs would share one identity on a store', async () => {
    const store = createMemoryStore();
    const ran: string[] = [];
    expect(() => idempotent(async (id: string) => { ran.push(id); }, { store, key: (id) => id })).toThrow(/`fn` has no name.*set `name`/);
    expect(() => idempotent(async (id: string) => { ran.push(id); }, { store, key: (id) => id })).toThrow(ConfigurationError);
    // Bound, an anonymous function is named "bound ": no name either.
    expect(() => idempotent((async (id: string) => { ran.push(id); }).bind(null), { store, key: (id) => id })).toThrow(/`fn` has no name/);
    // With names, two inline jobs meeting on one key are told apart (the second does not get the first's result).
    const charge = idempotent(async (id: string) => { ran.push(`charge ${id}`); return 'charged'; }, { store, name: 'charge', key: (id) => id });
    const mail = idempotent(async (id: string) => { ran.push(`mail ${id}`); return 'mailed'; }, { store, name: 'mail', key: (id) => id });
    expect(await charge('order-42')).toBe('charged');
    await expect(mail('order-42')).rejects.toBeInstanceOf(FingerprintMismatchError);
    expect(ran).toEqual(['charge order-42']);
  });

  it('refuses bad options at setup, before fn can run and settle a key on them', async () => {
    const store = createMemoryStore();
    let runs = 0;
    const fn = async (id: string): Promise<string> => { runs++; return id; };
    const bad: Array<[Record<string, unknown>, RegExp]> = [
      [{ serialize: 'json' }, /`serialize` must be a function/],
      [{ deserialize: 'json' }, /`deserialize` must be a function/],
      [{ scope: 'tenant-a' }, /`scope` must be a function/],
      [{ fingerprint: true }, /`fingerprint` must be a function of the arguments, or false/],
      [{ name: '' }, /`name` must be a non-empty string/],
      [{ name: 42 }, /`name` must be a non-empty string/],
    ];
    for (const [extra, message] of bad) {
      // Before, these were taken: `serialize: 'json'` ran fn, then settled the key for good.
      expect(() => idempotent(fn, { store, key: (id: string) => id, ...extra } as never)).toThrow(ConfigurationError);
      expect(() => idempotent(fn, { store, key: (id: string) => id, ...extra } as never)).toThrow(message);
    }
    expect(runs).toBe(0);
  });

  it('two jobs meeting on one key are told apart by name, also with fingerprint: false or a custom one', async () => {
    const store = createMemoryStore();
    const ran: string[] = [];
    for (const fingerprint of [false, (e: { id: string }) => e.id] as const) {
      const key = (e: { id: string }): string => `${typeof fingerprint}-${e.id}`;
      const charge = idempotent(async (e: { id: string }) => { ran.push('charge'); return { charged: e.id }; }, { store, key, name: 'charge', fingerprint });
      const email = idempotent(async (e: { id: string }) => { ran.push('email'); return { emailed: e.id }; }, { store, key, name: 'email', fingerprint });
      expect(await charge({ id: 'evt_1' })).toEqual({ charged: 'evt_1' });
      // Before: email got `{ charged: 'evt_1' }`, charge's stored result, and never ran.
      await expect(email({ id: 'evt_1' })).rejects.toBeInstanceOf(FingerprintMismatchError);
      expect(await charge({ id: 'evt_1' })).toEqual({ charged: 'evt_1' });
    }
    expect(ran).toEqual(['charge', 'charge']);
  });

  // Was: the route replayed the job's result ({"processed":…}, 200, Idempotent-Replayed) as its
  // own answer and its handler never ran: `fingerprint: false` matched the job's fingerprint too.
  it.each([false, true])('a route with fingerprint: false meeting a job result under its key gets a mismatch, not the job result (localCache: %s)', async (localCache) => {
    const store = createMemoryStore();
    const processEvent = idempotent(async (e: { id: string }) => ({ processed: e.id }), { store, name: 'process-event', key: (e) => e.id, localCache });
    expect(await processEvent({ id: 'evt_1' })).toEqual({ processed: 'evt_1' });
    const route = createIdempotencyEngine({ store, fingerprint: false, logger: false, localCache });
    for (let i = 0; i < 2; i++) {
      const decision = await route.decide({ method: 'POST', path: '/webhooks', headers: { 'idempotency-key': 'evt_1' }, body: { id: 'evt_1' } });
      expect(decision.kind).toBe('problem');
      if (decision.kind === 'problem') expect(decision.error).toBeInstanceOf(FingerprintMismatchError);
    }
    // The job still replays its own result; the route's own records still replay to it.
    expect(await processEvent({ id: 'evt_1' })).toEqual({ processed: 'evt_1' });
    const first = await route.decide({ method: 'POST', path: '/webhooks', headers: { 'idempotency-key': 'evt_2' }, body: {} });
    if (first.kind !== 'run') throw new Error(`expected run, got ${first.kind}`);
    await first.lease.commit({ status: 200, headers: [], body: new TextEncoder().encode('{"received":true}') });
    expect((await route.decide({ method: 'POST', path: '/webhooks', headers: { 'idempotency-key': 'evt_2' }, body: { other: 1 } })).kind).toBe('replay');
  });

  // Was: the route replayed the job's 410 "already ran" marker as its own answer (its result was
  // too large to store, so the marker stood in for it): only a stored result was told apart.
  it.each([false, true])("a route with fingerprint: false meeting a job's 410 marker under its key gets a mismatch, not the 410 (localCache: %s)", async (localCache) => {
    const store = createMemoryStore();
    let runs = 0;
    const ingest = idempotent(async (e: { id: string }) => ({ id: e.id, rows: 'x'.repeat(200), run: ++runs }), { store, name: 'ingest', key: (e) => e.id, maxBodyBytes: 100, logger: false, localCache });
    expect((await ingest({ id: 'evt_1' })).run).toBe(1);
    await expect(ingest({ id: 'evt_1' })).rejects.toBeInstanceOf(ResponseNotReplayableError);
    const route = createIdempotencyEngine({ store, fingerprint: false, logger: false, localCache });
    for (let i = 0; i < 2; i++) {
      const decision = await route.decide({ method: 'POST', path: '/webhooks', headers: { 'idempotency-key': 'evt_1' }, body: { id: 'evt_1' } });
      expect(decision.kind === 'problem' ? decision.error : decision.kind).toBeInstanceOf(FingerprintMismatchError);
    }
    // The job still meets its own marker and is not run again.
    await expect(ingest({ id: 'evt_1' })).rejects.toThrow(/A call of "ingest" with this key already ran, but its serialised result was larger than maxBodyBytes/);
    expect(runs).toBe(1);
  });

  it('rejects, without running fn, a call whose argument cannot be fingerprinted (a toJSON that returns `this` inside a new object): it used to hang the call', async () => {
    class Entity {
      constructor(readonly id: string) {}
      toJSON(): unknown {
        return { id: this.id, self: this };
      }
    }
    let runs = 0;
    const job = idempotent(async (_e: Entity) => ++runs, { store: createMemoryStore(), name: 'job', key: (e) => e.id, logger: false });
    await expect(job(new Entity('e1'))).rejects.toThrow(/cannot be fingerprinted: they contain themselves/);
    expect(runs).toBe(0);
  });

  it('names the job and the way out when its arguments contain themselves (a request, a client), not a request body', async () => {
    const socket: Record<string, unknown> = {};
    const request = { socket, url: '/hook' };
    socket.request = request;
    let runs = 0;
    const job = idempotent(async (_req: typeof request) => ++runs, { store: createMemoryStore(), name: 'hook', key: (r) => r.url, logger: false });
    // Before: '[idemkit] Cannot fingerprint a body that contains itself.'
    await expect(job(request)).rejects.toThrow('[idemkit] idempotent(): the arguments of "hook" cannot be fingerprinted: they contain themselves (a request, a driver client or a logger, say), so fn was not run. Pass `fingerprint` with what identifies the work, e.g. `(msg) => msg.id`.');
    expect(runs).toBe(0);
  });

  it('calls fn with the `this` the wrapper was called with (a method wrapped in place)', async () => {
    class Worker {
      readonly db = { orders: 0 };
      handle = idempotent(
        async function (this: Worker, _id: string): Promise<number> {
          return ++this.db.orders;
        },
        { store: createMemoryStore(), key: (id) => id, name: 'handle' },
      );
    }
    const worker = new Worker();
    // Before: "Cannot read properties of undefined (reading 'db')".
    expect(await worker.handle('m1')).toBe(1);
    expect(await worker.handle('m1')).toBe(1);
    expect(await worker.handle('m2')).toBe(2);
  });

  describe('a result that cannot be stored', () => {
    it('not serialisable (a BigInt): fn runs once, the key is settled, later calls get ResponseNotReplayableError', async () => {
      const store = createMemoryStore();
      let runs = 0;
      const charge = idempotent(async (id: string) => ({ id, amount: BigInt(4200 + runs++) }), { store, name: 'charge', key: (id) => id, leaseMs: 300 });
      await expect(charge('evt_big')).rejects.toThrow(/fn ran, but its result could not be serialised \(Do not know how to serialize a BigInt\)/);
      // Settled, not left in progress (renewing forever, every retry a 409 until the process exits).
      expect((await store.get('-:evt_big'))?.state).toBe('completed');
      const retry = charge('evt_big');
      await expect(retry).rejects.toBeInstanceOf(ResponseNotReplayableError);
      await expect(retry).rejects.toMatchObject({ status: 410, extensions: { reason: 'not-serializable' } });
      await expect(charge('evt_big')).rejects.toThrow('A call of "charge" with this key already ran, but its result could not be serialised, so it was not stored. fn is not run again for this key.');
      expect(runs).toBe(1);
    });

    it.each([
      ['a Map', () => ({ totals: new Map([['eur', 4200]]) })],
      ['a Set', () => new Set(['sku-1'])],
    ])('not serialisable by JSON without loss (%s, which JSON writes as {}): refused, not stored as an empty object', async (_what, result) => {
      const store = createMemoryStore();
      let runs = 0;
      const job = idempotent(async (_id: string) => { runs++; return result(); }, { store, name: 'job', key: (id) => id });
      await expect(job('evt_map')).rejects.toThrow(/fn ran, but its result could not be serialised \(JSON would store a (Map|Set) as \{\}/);
      await expect(job('evt_map')).rejects.toMatchObject({ status: 410, extensions: { reason: 'not-serializable' } });
      expect(runs).toBe(1);
    });

    it.each([
      ['an Error', () => ({ ok: false, error: new Error('card declined') }), /an Error as \{\}/],
      ['a Promise (a missing await)', () => ({ receipt: Promise.resolve('r_1') }), /a Promise \(a missing `await`\?\) as \{\}/],
      ['a WeakMap', () => [new WeakMap()], /a WeakMap as \{\}/],
      ['a RegExp', () => ({ pattern: /sku-\d+/ }), /a RegExp as \{\}/],
      ['an ArrayBuffer', () => ({ pdf: new ArrayBuffer(8) }), /an ArrayBuffer as \{\}/],
      // What a job that calls fetch() has at hand: each keeps its data out of JSON's sight.
      ['fetch() Headers', () => ({ headers: new Headers({ etag: '"v1"' }) }), /a Headers as \{\}/],
      ['URLSearchParams', () => ({ next: new URLSearchParams('page=2') }), /URLSearchParams as \{\}/],
      ['a Blob', () => ({ file: new Blob(['%PDF']) }), /a Blob as \{\}/],
      ['a FormData', () => ({ form: new FormData() }), /a FormData as \{\}/],
      ['a fetch() Response', () => ({ upstream: new Response('ok') }), /a Response as \{\}/],
    ])('holding %s, which JSON writes as {}: refused, not stored as an empty object', async (_what, result, message) => {
      const store = createMemoryStore();
      let runs = 0;
      const job = idempotent(async (_id: string) => { runs++; return result(); }, { store, name: 'job', key: (id) => id });
      // Before, every caller got { ok: false, error: {} }: the error's message and stack gone.
      await expect(job('evt_lossy')).rejects.toThrow(message);
      await expect(job('evt_lossy')).rejects.toMatchObject({ status: 410, extensions: { reason: 'not-serializable' } });
      expect(runs).toBe(1);
    });

    it('an error class with its own toJSON is stored by it', async () => {
      class HttpError extends Error {
        constructor(readonly status: number) { super(`HTTP ${status}`); }
        toJSON() { return { status: this.status, message: this.message }; }
      }
      const job = idempotent(async (_id: string) => ({ ok: false, error: new HttpError(402) }), { store: createMemoryStore(), name: 'job', key: (id) => id });
      const expected = { ok: false, error: { status: 402, message: 'HTTP 402' } };
      expect(await job('evt_tojson')).toEqual(expected);
      expect(await job('evt_tojson')).toEqual(expected);
    });

    it('serialised to nothing (toJSON gives undefined): 3 concurrent calls run fn once', async () => {
      const store = createMemoryStore();
      let runs = 0;
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const job = idempotent(
        async () => {
          runs++;
          await gate;
          return { toJSON: () => undefined };
        },
        { store, name: 'job', key: () => 'evt_void' },
      );
      const calls = Array.from({ length: 3 }, () => job());
      await vi.waitFor(() => expect(runs).toBe(1), { timeout: 10_000 });
      release();
      const settled = await Promise.allSettled(calls);
      expect(runs).toBe(1);
      const reasons = settled.map((r) => (r.status === 'rejected' ? (r.reason as Error).constructor.name : 'fulfilled'));
      expect(reasons.sort()).toEqual(['ResponseNotReplayableError', 'ResponseNotReplayableError', 'TypeError']);
    });

    it('larger than maxBodyBytes: the first call gets its result, the others an error, never the marker as a value', async () => {
      const store = createMemoryStore();
      let runs = 0;
      const logger = { warn: vi.fn(), error: vi.fn() };
      const job = idempotent(async () => ({ run: ++runs, blob: 'x'.repeat(2_000) }), { store, name: 'job', key: () => 'evt_big_result', maxBodyBytes: 1_000, logger });
      expect((await job()).run).toBe(1);
      // Said at once, not first seen as a 410 on a redelivery.
      expect(logger.warn.mock.calls).toEqual([[expect.stringMatching(/^\[idemkit\] idempotent\(\): the result of "job" for key "evt_big_result" is 2019 bytes serialised, over maxBodyBytes \(1000\): it was not stored/)]]);
      await expect(job()).rejects.toMatchObject({ status: 410, extensions: { reason: 'too-large' } });
      // Said for a job, not as the marker's 'The request with this key already ran and answered 200, but its body …'.
      await expect(job()).rejects.toThrow('A call of "job" with this key already ran, but its serialised result was larger than maxBodyBytes, so it was not stored. fn is not run again for this key.');
      expect(runs).toBe(1);
    });
  });
});

// What it does with a store's transactions runs against real Postgres: @idemkit/postgres
// jobs.test.ts and readme.test.ts, and packages/reliability jobs.test.ts. Here, what it refuses at setup.
describe('idempotentTransaction(fn)', () => {
  const fn = async (_tx: unknown, id: string) => id;

  it('refuses a store without transactions at setup, before any call', () => {
    const store = createMemoryStore() as never;
    expect(() => idempotentTransaction(fn, { store, key: (id: string) => id })).toThrow(/needs a store with transactions/);
  });

  it("refuses onStoreError 'pass': fn cannot run outside the store's transaction", () => {
    const store = Object.assign(createMemoryStore(), { beginTransaction: () => Promise.reject(new Error('unused')) });
    expect(() => idempotentTransaction(fn, { store, key: (id: string) => id, onStoreError: 'pass' as never })).toThrow(ConfigurationError);
    expect(() => idempotentTransaction(fn, { store, key: (id: string) => id, onStoreError: 'fail' })).not.toThrow();
  });

  it('names itself in the errors of a bad fn or key', () => {
    const store = Object.assign(createMemoryStore(), { beginTransaction: () => Promise.reject(new Error('unused')) });
    expect(() => idempotentTransaction('nope' as never, { store, key: (id: string) => id })).toThrow(/idempotentTransaction\(fn, options\): `fn`/);
    expect(() => idempotentTransaction(fn, { store } as never)).toThrow(/idempotentTransaction\(fn, options\): `key`/);
  });
});

