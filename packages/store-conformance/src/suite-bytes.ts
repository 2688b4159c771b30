import { randomBytes } from 'node:crypto';
import type { IdempotencyRecord, StoredResponse } from '@idemkit/core';
import { expect } from 'vitest';
import {
  LONG_MS,
  acquire,
  bytes,
  clause,
  completed,
  expectSameResponse,
  mustGet,
  useStore,
  type SuiteContext,
} from './context.js';

/** Every byte value, up and down: not valid UTF-8, contains NUL and 0xFF. */
function allByteValues(): Uint8Array {
  const body = new Uint8Array(512);
  for (let i = 0; i < 256; i++) {
    body[i] = i;
    body[511 - i] = i;
  }
  return body;
}

/** SPEC §3 responses: status, ordered repeated headers and body bytes survive storage exactly. */
export function bytesSuite(ctx: SuiteContext): void {
  const store = useStore(ctx);

  async function roundTrip(response: StoredResponse): Promise<void> {
    const key = ctx.key('bytes');
    await completed(store(), key, response);
    expectSameResponse((await mustGet(store(), key)).response, response);
    const replay = await store().begin(key, 'fp', LONG_MS);
    expect(replay.kind).toBe('existing');
    if (replay.kind === 'existing') expectSameResponse(replay.record.response, response);
  }

  clause('an empty body (0 bytes) with no headers', async () => {
    await roundTrip({ status: 204, headers: [], body: new Uint8Array(0) });
  });

  clause('all byte values 0x00–0xFF (not valid UTF-8)', async () => {
    await roundTrip({ status: 200, headers: [['content-type', 'application/octet-stream']], body: allByteValues() });
  });

  clause('1 MiB of random bytes', async () => {
    await roundTrip({
      status: 200,
      headers: [['content-type', 'application/octet-stream']],
      body: new Uint8Array(randomBytes(1024 * 1024)),
    });
  });

  clause('a body that is a view into a larger buffer stores only its own bytes', async () => {
    const backing = new Uint8Array(randomBytes(4096));
    await roundTrip({ status: 200, headers: [], body: backing.subarray(1000, 1100) });
  });

  clause('repeated headers keep their order; an 8 KiB header value and odd values survive', async () => {
    const big = 'x'.repeat(8 * 1024);
    await roundTrip({
      status: 201,
      headers: [
        ['set-cookie', 'a=1; Path=/; HttpOnly'],
        ['content-type', 'application/json; charset=utf-8'],
        ['set-cookie', 'b=2; Path=/'],
        ['x-big', big],
        ['set-cookie', 'c=3'],
        ['x-empty', ''],
        ['x-quotes', `"double" 'single' \\back, comma; semi = eq`],
        ['link', '</a>; rel="next", </b>; rel="prev"'],
        ['set-cookie', 'a=overwritten-later-in-order'],
        // Names and values exactly as given: no case folding, no trimming.
        ['X-Mixed-Case', '  padded  '],
      ],
      body: new TextEncoder().encode('{"ok":true}'),
    });
  });

  clause('header values with bytes 0x80–0xFF (obs-text, which Node sends as latin1) round-trip as the same characters', async () => {
    // Node accepts header values of U+0000–U+00FF and writes each character as one byte. A store
    // that keeps them as ASCII (high bit lost) or decodes its own UTF-8 as latin1 ("cafÃ©")
    // replays other bytes than the handler sent.
    let everyHigh = '';
    for (let c = 0x80; c <= 0xff; c++) everyHigh += String.fromCharCode(c);
    await roundTrip({
      status: 200,
      headers: [
        ['content-disposition', 'attachment; filename="caf\u00e9 \u00a9 \u00ff.txt"'],
        ['x-obs-text', everyHigh],
      ],
      body: bytes('ok'),
    });
  });

  clause('status codes round-trip', async () => {
    await Promise.all(
      [200, 201, 202, 204, 299, 301, 304, 400, 404, 410, 422, 499].map((status) =>
        roundTrip({ status, headers: [['x-status', String(status)]], body: new TextEncoder().encode(`status ${status}`) }),
      ),
    );
  });

  clause('the store keeps its own copy: changing the body passed to complete afterwards changes nothing', async () => {
    const key = ctx.key('bytes-copy');
    const body = new TextEncoder().encode('original');
    const token = await acquire(store(), key);
    expect(await store().complete(key, token, { status: 200, headers: [], body }, LONG_MS)).toBe(true);
    body.fill(0x21);
    expect(Buffer.from((await mustGet(store(), key)).response?.body ?? []).toString()).toBe('original');
  });

  clause('the store keeps its own copy of the headers too, and what it hands out cannot change a later replay', async () => {
    const key = ctx.key('bytes-copy-headers');
    const headers: Array<[string, string]> = [['content-type', 'text/plain'], ['x-id', '1']];
    const token = await acquire(store(), key);
    expect(await store().complete(key, token, { status: 200, headers, body: bytes('kept') }, LONG_MS)).toBe(true);
    headers.push(['x-added', 'later']);
    headers[1]![1] = 'changed';
    // A caller that changes a record it got (a binding, middleware) must not change the next replay.
    spoil(await mustGet(store(), key));
    const replay = await store().begin(key, 'fp', LONG_MS);
    for (const record of [await mustGet(store(), key), replay.kind === 'existing' ? replay.record : undefined]) {
      expect(record?.response?.headers).toEqual([['content-type', 'text/plain'], ['x-id', '1']]);
      expect(Buffer.from(record?.response?.body ?? []).toString()).toBe('kept');
    }
    // Nor can the record a replaying begin hands out (the engine's replay path).
    if (replay.kind === 'existing') spoil(replay.record);
    const again = await store().begin(key, 'fp', LONG_MS);
    for (const record of [await mustGet(store(), key), again.kind === 'existing' ? again.record : undefined]) {
      expect(record?.response?.headers).toEqual([['content-type', 'text/plain'], ['x-id', '1']]);
      expect(Buffer.from(record?.response?.body ?? []).toString()).toBe('kept');
    }
  });
}

/** What a careless caller does to a record it was handed: overwrite the body, add and change headers. */
function spoil(record: IdempotencyRecord): void {
  try {
    record.response?.body.fill(0x21);
  } catch {
    // a frozen or read-only view
  }
  // The types say read-only; a store may also freeze them (then a change throws, which is fine).
  const handedOut = record.response?.headers as Array<[string, string]> | undefined;
  try {
    handedOut?.push(['x-added', 'by a caller']);
  } catch {
    // a frozen list
  }
  try {
    if (handedOut?.[0]) handedOut[0][1] = 'changed by a caller';
  } catch {
    // a frozen pair
  }
}
