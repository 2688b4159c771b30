import { randomUUID } from 'node:crypto';
import { problemType, scopedKey, type IdempotencyErrorCode, type IdempotencyStore, type ProblemDetails } from '@idemkit/core';
import { expect, it } from 'vitest';
import type { ExecutionCounter, StartApp, StartAppInput, TestIdempotencyOptions } from './contract.js';
import { send, type Reply, type SendOptions } from './http.js';
import type { StoreHarness, StoreName } from './stores.js';

export type Framework = 'express' | 'koa' | 'fastify';

/** A started test app plus shortcuts; closed by the suite after each case. */
export interface RunningApp {
  readonly url: string;
  readonly counter: ExecutionCounter;
  /** How often the handler of `route` ran (0 when never). */
  count(route: string): number;
  send(path: string, options?: SendOptions): Promise<Reply>;
  /** POST with a JSON body. */
  post(path: string, options?: SendOptions): Promise<Reply>;
  /** Let every handler held at `POST /orders?hold=<name>` go on (and any that arrive later). */
  open(name: string): void;
}

/** The app's `hold` gates; all of them open before the app closes, so no handler is left hanging. */
class Gates {
  readonly #gates = new Map<string, { readonly opened: Promise<void>; readonly open: () => void }>();

  #gate(name: string) {
    let gate = this.#gates.get(name);
    if (gate === undefined) {
      let open!: () => void;
      const opened = new Promise<void>((resolve) => (open = resolve));
      gate = { opened, open };
      this.#gates.set(name, gate);
    }
    return gate;
  }

  hold = (name: string): Promise<void> => this.#gate(name).opened;
  open = (name: string): void => this.#gate(name).open();
  openAll(): void {
    for (const gate of this.#gates.values()) gate.open();
  }
}

export interface AppSetup {
  /** Defaults to the harness's store. */
  readonly store?: IdempotencyStore;
  readonly txWork?: StartAppInput['txWork'];
  /** The header the app's custom `getKey` reads (see StartAppInput). */
  readonly keyFrom?: string;
}

/** What every case file gets: naming, the store of this run, and app startup. */
export interface CaseContext {
  readonly framework: Framework;
  readonly storeName: StoreName;
  /** The opened store (valid inside tests). */
  harness(): StoreHarness;
  /** `it` named `<framework> × <store>: <name>`. */
  test(name: string, fn: () => Promise<void>, timeoutMs?: number): void;
  app(options?: TestIdempotencyOptions, setup?: AppSetup): Promise<RunningApp>;
}

/** Quiet by default: the cases provoke store errors and takeovers on purpose. */
export const BASE_OPTIONS: TestIdempotencyOptions = { logger: false };

export function newKey(): string {
  return `k-${randomUUID()}`;
}

/** The identity the store sees for `key` sent without `x-user` (the test app's scope is undefined then). */
export function storeId(key: string, user?: string): string {
  return scopedKey(user, key);
}

export function expectProblem(reply: Reply, status: number, code: IdempotencyErrorCode): ProblemDetails {
  expect(reply.status, reply.text()).toBe(status);
  expect(reply.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const problem = reply.json() as ProblemDetails;
  expect(problem).toMatchObject({ type: problemType(code), status, code });
  expect(typeof problem.title).toBe('string');
  expect(typeof problem.detail).toBe('string');
  // Written by core's problemResponse() (compact JSON, its member order: extensions first), so
  // every binding's bytes match. Rebuilt in that order: parsing alone would keep any order.
  const { type, title, status: problemStatus, detail, code: problemCode, ...extensions } = problem;
  expect(reply.text()).toBe(JSON.stringify({ ...extensions, type, title, status: problemStatus, detail, code: problemCode }));
  // A 410 is the stored marker of an unreplayable response, so it may carry Idempotent-Replayed.
  if (status !== 410) expect(reply.replayed).toBe(false);
  return problem;
}

export function createCaseContext(
  framework: Framework,
  storeName: StoreName,
  startApp: StartApp,
  getHarness: () => StoreHarness,
  track: (close: () => Promise<void>) => void,
): CaseContext {
  return {
    framework,
    storeName,
    harness: getHarness,
    test(name, fn, timeoutMs = 20_000) {
      it(`${framework} × ${storeName}: ${name}`, fn, timeoutMs);
    },
    async app(options = {}, setup = {}) {
      const counter: ExecutionCounter = new Map();
      const gates = new Gates();
      const handle = await startApp({
        store: setup.store ?? getHarness().store,
        options: { ...BASE_OPTIONS, ...options },
        counter,
        hold: gates.hold,
        ...(setup.txWork ? { txWork: setup.txWork } : {}),
        ...(setup.keyFrom === undefined ? {} : { keyFrom: setup.keyFrom }),
      });
      track(() => {
        gates.openAll();
        return handle.close();
      });
      return {
        url: handle.url,
        counter,
        count: (route) => counter.get(route) ?? 0,
        send: (path, o) => send(handle.url, path, o),
        post: (path, o = {}) =>
          send(handle.url, path, { ...(o.json === undefined && o.text === undefined ? { json: {} } : {}), ...o, method: 'POST' }),
        open: gates.open,
      };
    },
  };
}
