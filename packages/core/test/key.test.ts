import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MAX_KEY_LENGTH, parseKeyHeader, scopedKey, validateKey, mayHaveKey, readsBody, unreadBodyMayHoldKey } from '../src/index.js';

describe('key parsing', () => {
  it('accepts the bare form and the structured-field string form', () => {
    expect(parseKeyHeader('8e03978e-40d5-43e8-bc93-6894a57f9324')).toEqual({ ok: true, key: '8e03978e-40d5-43e8-bc93-6894a57f9324' });
    expect(parseKeyHeader('"8e03978e-40d5"')).toEqual({ ok: true, key: '8e03978e-40d5' });
    expect(parseKeyHeader('"a\\"b\\\\c"')).toEqual({ ok: true, key: 'a"b\\c' });
    expect(parseKeyHeader('  padded  ')).toEqual({ ok: true, key: 'padded' });
    expect(parseKeyHeader('\tpadded\t')).toEqual({ ok: true, key: 'padded' });
  });

  it('reads a header of a long run of inner spaces in linear time (a regex trim took 300 ms for 16 000)', () => {
    const value = `a${' '.repeat(64_000)}b`;
    const started = performance.now();
    for (let i = 0; i < 10; i++) expect(parseKeyHeader(value).ok).toBe(false);
    // 10 × 64 000 characters: well under a millisecond each when linear; seconds each if not.
    expect(performance.now() - started).toBeLessThan(1_000);
  });

  it('strips only spaces and tabs around the value: other whitespace is a non-ASCII key, refused', () => {
    // Node reads header bytes as latin1, so a 0xA0 byte arrives as U+00A0, which trim() would strip.
    for (const odd of ['\u00a0', '\ufeff', '\u2028', '\u3000']) {
      expect(parseKeyHeader(`abc${odd}`).ok).toBe(false);
      expect(parseKeyHeader(`${odd}abc`).ok).toBe(false);
    }
  });

  it('rejects a bare key with a comma (two header lines a proxy joined), but not a quoted one', () => {
    expect(parseKeyHeader('a1, a2').ok).toBe(false);
    expect(parseKeyHeader('a1,a2').ok).toBe(false);
    expect(parseKeyHeader('"a1, a2"')).toEqual({ ok: true, key: 'a1, a2' });
  });

  it('rejects malformed structured-field strings', () => {
    expect(parseKeyHeader('"open').ok).toBe(false);
    expect(parseKeyHeader('"a" "b"').ok).toBe(false);
    expect(parseKeyHeader('""').ok).toBe(false);
  });

  it('enforces 1..255 printable ASCII characters', () => {
    expect(validateKey('a'.repeat(MAX_KEY_LENGTH)).ok).toBe(true);
    expect(validateKey('a'.repeat(MAX_KEY_LENGTH + 1)).ok).toBe(false);
    expect(validateKey('').ok).toBe(false);
    expect(validateKey('tab\there').ok).toBe(false);
    expect(validateKey('del\u007f').ok).toBe(false);
    expect(validateKey('ключ').ok).toBe(false);
  });

  it('property: any printable-ASCII key of 1..255 chars is accepted and survives sf-string quoting', () => {
    const printable = fc.string({ unit: fc.integer({ min: 0x21, max: 0x7e }).map((c) => String.fromCharCode(c)), minLength: 1, maxLength: 255 });
    fc.assert(
      fc.property(printable, (key) => {
        expect(validateKey(key)).toEqual({ ok: true, key });
        const quoted = `"${key.replaceAll('\\', '\\\\').replaceAll('"', '\\"')}"`;
        expect(parseKeyHeader(quoted)).toEqual({ ok: true, key });
        // The bare form too, unless it starts with a quote (then it is read as an sf-string) or has a comma.
        if (!key.startsWith('"') && !key.includes(',')) expect(parseKeyHeader(key)).toEqual({ ok: true, key: key.trim() });
      }),
    );
  });

  it('property: any key with a character outside printable ASCII is rejected', () => {
    const bad = fc.tuple(fc.string({ maxLength: 20 }), fc.oneof(fc.integer({ min: 0, max: 0x1f }), fc.integer({ min: 0x7f, max: 0xffff })), fc.string({ maxLength: 20 }));
    fc.assert(fc.property(bad, ([a, code, b]) => {
      expect(validateKey(a + String.fromCharCode(code) + b).ok).toBe(false);
    }));
  });

  it('property: scoped keys are unambiguous', () => {
    fc.assert(
      fc.property(fc.option(fc.string(), { nil: undefined }), fc.string(), fc.option(fc.string(), { nil: undefined }), fc.string(), (s1, k1, s2, k2) => {
        const same = (s1 || undefined) === (s2 || undefined) && k1 === k2;
        expect(scopedKey(s1, k1) === scopedKey(s2, k2)).toBe(same);
      }),
    );
  });
});

describe('mayHaveKey (which requests are fingerprinted, so need a readable body)', () => {
  const o = { header: 'Idempotency-Key', bodyField: 'idempotencyKey' as const, required: true };
  const json = { 'content-type': 'application/json' };
  it('a key header, a custom getKey, or the key field in a parsed body', () => {
    expect(mayHaveKey(o, { 'idempotency-key': 'k' }, undefined)).toBe(true);
    expect(mayHaveKey({ ...o, getKey: () => 'k' }, {}, undefined)).toBe(true);
    expect(mayHaveKey(o, json, { idempotencyKey: 'k' })).toBe(true);
    expect(mayHaveKey(o, json, { amount: 1 })).toBe(false);
    expect(mayHaveKey({ ...o, bodyField: false }, json, { idempotencyKey: 'k' })).toBe(false);
  });
  it('an unread JSON or form body only with required: a keyless webhook goes through otherwise', () => {
    const unread = { ...json, 'content-length': '24' };
    expect(mayHaveKey(o, unread, undefined)).toBe(true);
    expect(mayHaveKey({ ...o, required: false }, unread, undefined)).toBe(false);
    expect(mayHaveKey(o, { 'content-type': 'application/xml', 'content-length': '8' }, undefined)).toBe(false);
    // No bytes on the wire: nothing unread to hold a key.
    expect(mayHaveKey(o, json, undefined)).toBe(false);
    expect(unreadBodyMayHoldKey(o, unread, undefined)).toBe(true);
    expect(unreadBodyMayHoldKey(o, unread, {})).toBe(false);
    expect(unreadBodyMayHoldKey({ bodyField: false }, unread, undefined)).toBe(false);
  });
  it('readsBody: the default fingerprint or a body key field make the parsed body matter', () => {
    expect(readsBody({ fingerprint: 'default', bodyField: false })).toBe(true);
    expect(readsBody({ fingerprint: false, bodyField: 'idempotencyKey' })).toBe(true);
    expect(readsBody({ fingerprint: false, bodyField: 'idempotencyKey', getKey: () => 'k' })).toBe(false);
    expect(readsBody({ fingerprint: false, bodyField: false })).toBe(false);
  });
});
