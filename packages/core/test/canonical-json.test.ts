import fc from 'fast-check';
import { configure } from 'safe-stable-stringify';
import { describe, expect, it, vi } from 'vitest';
import { canonicalJson, quote } from '../src/canonical-json.js';
import { defaultFingerprint } from '../src/index.js';

/** The reference: safe-stable-stringify (recursive, fine for small values), which core used before. */
const sortedStringify = configure({ deterministic: true, bigint: true });

describe('canonical JSON', () => {
  it('property: equals sorted-key JSON (the previous implementation) for any JSON value, so fingerprints are unchanged', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        expect(canonicalJson(value)).toBe(sortedStringify(value));
      }),
    );
  });

  it('property: the same text on either side of the depth where the fast path hands over to the iterative writer', () => {
    fc.assert(
      fc.property(fc.jsonValue({ maxDepth: 3 }), fc.integer({ min: 55, max: 75 }), fc.boolean(), (inner, levels, useArrays) => {
        let value: unknown = inner;
        for (let i = 0; i < levels; i++) value = useArrays ? [value, i] : { z: i, a: value, u: undefined };
        expect(canonicalJson(value)).toBe(sortedStringify(value));
      }),
    );
  });

  it('property: keys in code-unit order whatever their number, order and text (both sides of the in-place sort)', () => {
    // Integer-like keys come first from Object.keys ('10' before '9'), and astral characters are
    // two code units: the order must still be Array#sort's.
    const key = fc.oneof(fc.string({ unit: 'binary' }), fc.nat({ max: 200 }).map(String), fc.constantFrom('a', 'B', 'é', '😀', '\uffff'));
    fc.assert(
      fc.property(fc.dictionary(key, fc.integer(), { minKeys: 0, maxKeys: 40 }), (value) => {
        expect(canonicalJson(value)).toBe(sortedStringify(value));
        expect(canonicalJson({ nested: [value] })).toBe(sortedStringify({ nested: [value] }));
      }),
    );
  });

  it('quotes every string as JSON.stringify does: each of the 65 536 code units alone and inside text, and any string of code units (lone surrogates too)', () => {
    for (let c = 0; c <= 0xffff; c++) {
      const unit = String.fromCharCode(c);
      expect(quote(unit)).toBe(JSON.stringify(unit));
      expect(quote(`order ${unit} #1`)).toBe(JSON.stringify(`order ${unit} #1`));
    }
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), fc.string({ unit: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)) }), (text, units) => {
        expect(quote(text)).toBe(JSON.stringify(text));
        expect(quote(units)).toBe(JSON.stringify(units));
        expect(canonicalJson({ [units]: text })).toBe(sortedStringify({ [units]: text }));
      }),
    );
  });

  it('follows JSON.stringify for the values it treats specially', () => {
    expect(canonicalJson({ b: undefined, a: () => 1, c: Symbol('x'), d: [undefined, NaN, Infinity] })).toBe('{"d":[null,null,null]}');
    expect(canonicalJson({ when: new Date(0), n: 10n })).toBe('{"n":10,"when":"1970-01-01T00:00:00.000Z"}');
    expect(canonicalJson([])).toBe('[]');
    expect(canonicalJson({})).toBe('{}');
    expect(canonicalJson('x')).toBe('"x"');
  });

  it('writes a null-prototype object (urlencoded and query parsers make them) as the plain one, its own toJSON applied', () => {
    const bare = Object.assign(Object.create(null) as Record<string, unknown>, { b: 1, a: [Object.assign(Object.create(null) as object, { c: 'x' })] });
    expect(canonicalJson(bare)).toBe('{"a":[{"c":"x"}],"b":1}');
    expect(canonicalJson(Object.assign(Object.create(null) as object, { toJSON: () => 'as text' }))).toBe('"as text"');
  });

  it('writes a boxed number, string, boolean or bigint as its value, as JSON.stringify does (every boxed number was {})', () => {
    const boxed = { n: new Number(100), s: new String('ab'), t: [new Boolean(false)], b: Object(7n) as object };
    expect(canonicalJson(boxed)).toBe('{"b":7,"n":100,"s":"ab","t":[false]}');
    expect(canonicalJson(new Number(-0))).toBe(JSON.stringify(new Number(-0)));
    // So a different boxed value is a different request, at any depth (both writers).
    const deep = (v: unknown): unknown => Array.from({ length: 100 }).reduce<unknown>((inner) => [inner], v);
    expect(canonicalJson(deep(new Number(1)))).not.toBe(canonicalJson(deep(new Number(2))));
    expect(defaultFingerprint({ method: 'CALL', path: '/j', body: [{ cents: new Number(100) }] })).not.toBe(
      defaultFingerprint({ method: 'CALL', path: '/j', body: [{ cents: new Number(200) }] }),
    );
  });

  it('writes URLSearchParams, Headers, an Error and a RegExp by their contents (each was {}), at any depth', () => {
    const deep = (v: unknown): unknown => Array.from({ length: 100 }).reduce<unknown>((inner) => [inner], v);
    const pairs: Array<[unknown, unknown]> = [
      [new URLSearchParams('a=1&b=2'), new URLSearchParams('a=1&b=3')],
      [new Headers({ 'x-event': 'paid' }), new Headers({ 'x-event': 'refunded' })],
      [new Error('card declined'), new Error('card expired')],
      [Object.assign(new Error('declined'), { code: 'E1' }), Object.assign(new Error('declined'), { code: 'E2' })],
      [new Error('declined', { cause: 'limit' }), new Error('declined', { cause: 'fraud' })],
      [new Error('declined', { cause: undefined }), new Error('declined')],
      [new AggregateError([1], 'several'), new AggregateError([2], 'several')],
      [/a/, /a/i],
    ];
    for (const [a, b] of pairs) {
      expect(canonicalJson({ v: a })).not.toBe(canonicalJson({ v: b }));
      expect(canonicalJson(deep(a))).not.toBe(canonicalJson(deep(b)));
      expect(canonicalJson({ v: a })).toBe(canonicalJson({ v: a }));
    }
    expect(canonicalJson(new URLSearchParams('b=2&a=1'))).toBe('URLSearchParams[["b","2"],["a","1"]]');
    expect(canonicalJson(new Error('x'))).toBe('Error["Error","x",{}]');
    // Never the text of a JSON value: a string argument cannot pass for one.
    expect(canonicalJson('a=1')).not.toBe(canonicalJson(new URLSearchParams('a=1')));
  });

  it("fingerprints where fetch()'s classes are missing (node --no-experimental-fetch)", async () => {
    const saved = globalThis.Headers;
    Reflect.deleteProperty(globalThis, 'Headers');
    try {
      vi.resetModules();
      const fresh = await import('../src/canonical-json.js');
      // Before: a bare `Headers` reference threw a ReferenceError on every object that is not plain.
      expect(fresh.canonicalJson({ a: new URLSearchParams('a=1'), b: new (class { x = 1 })() })).toBe('{"a":URLSearchParams[["a","1"]],"b":{"x":1}}');
    } finally {
      globalThis.Headers = saved;
      vi.resetModules();
    }
  });

  it('refuses a Blob, FormData, Request, Response, WeakMap or a Promise, whose data JSON cannot see (each was {})', () => {
    const opaque: Array<[unknown, RegExp]> = [
      [new Blob(['a']), /Cannot fingerprint a Blob/],
      [new FormData(), /Cannot fingerprint a FormData/],
      [new Request('http://x.example/'), /Cannot fingerprint a Request/],
      [new Response('a'), /Cannot fingerprint a Response/],
      [new WeakMap(), /Cannot fingerprint a WeakMap/],
      [Promise.resolve(1), /Cannot fingerprint a Promise \(a missing `await`\?\)/],
    ];
    for (const [value, message] of opaque) {
      expect(() => canonicalJson({ v: value })).toThrow(message);
      expect(() => canonicalJson(Array.from({ length: 100 }).reduce<unknown>((inner) => [inner], value))).toThrow(message);
    }
  });

  it('writes a Map or Set by its contents (JSON.stringify gives {} for every one), as no JSON value can be written', () => {
    // Before: both were '{}', so idempotent() replayed one Map argument's result for another.
    expect(canonicalJson({ m: new Map([['a', 1]]) })).toBe('{"m":Map[["a",1]]}');
    expect(canonicalJson(new Map([['a', 2]]))).not.toBe(canonicalJson(new Map([['a', 1]])));
    expect(canonicalJson([new Set([1, { b: 2, a: 1 }])])).toBe('[Set[1,{"a":1,"b":2}]]');
    expect(canonicalJson(new Map())).not.toBe(canonicalJson({}));
    // Keys that write alike (two empty objects) in either order: the same Map contents. Was:
    // insertion order decided, so a redelivery that built it the other way was a mismatch.
    expect(canonicalJson(new Map<object, number>([[{}, 2], [{}, 1]]))).toBe(canonicalJson(new Map<object, number>([[{}, 1], [{}, 2]])));
    expect(canonicalJson(new Map<object, number>([[{}, 2], [{}, 1]]))).toBe('Map[[{},1],[{},2]]');
    // The iterative writer (past the fast path's depth) writes the same text.
    let deep: unknown = new Map([['k', new Set(['v'])]]);
    for (let i = 0; i < 70; i++) deep = [deep];
    expect(canonicalJson(deep)).toBe('['.repeat(70) + 'Map[["k",Set["v"]]]' + ']'.repeat(70));
    const loop = new Map<string, unknown>();
    loop.set('self', loop);
    expect(() => canonicalJson(loop)).toThrow(/contains itself/);
    const shared = new Set([1]);
    expect(canonicalJson([shared, shared])).toBe('[Set[1],Set[1]]');
    // Like an object's keys, the order they were built in does not count.
    expect(canonicalJson(new Set(['b', 'a', 3]))).toBe(canonicalJson(new Set([3, 'a', 'b'])));
    expect(canonicalJson(new Map([['b', 2], ['a', 1]]))).toBe('Map[["a",1],["b",2]]');
    const inner = new Set<unknown>();
    inner.add(inner);
    expect(() => canonicalJson(new Map([[inner, 1]]))).toThrow(/contains itself/);
  });

  it('handles a body nested 200 000 levels deep without recursion', () => {
    const depth = 200_000;
    const text = '['.repeat(depth) + ']'.repeat(depth);
    const deepArray: unknown = JSON.parse(text);
    expect(canonicalJson(deepArray)).toBe(text);
    let deepObject: unknown = 1;
    for (let i = 0; i < depth; i++) deepObject = { k: deepObject };
    expect(defaultFingerprint({ method: 'POST', path: '/', body: deepObject })).toMatch(/^sha256:/);
  });

  it('refuses a value that contains itself, but allows shared siblings', () => {
    const shared = { x: 1 };
    expect(canonicalJson([shared, shared])).toBe('[{"x":1},{"x":1}]');
    const loop: Record<string, unknown> = {};
    loop.self = loop;
    expect(() => canonicalJson(loop)).toThrow(/contains itself/);
  });

  it('refuses a toJSON that returns a new object holding `this` (it used to loop until memory ran out), but allows a toJSON object twice side by side', () => {
    class Entity {
      constructor(readonly id: number) {}
      toJSON(): unknown {
        return { id: this.id, entity: this };
      }
    }
    expect(() => canonicalJson({ order: new Entity(1) })).toThrow(/contains itself/);
    class Money {
      constructor(readonly cents: number) {}
      toJSON(): unknown {
        return { cents: this.cents };
      }
    }
    const price = new Money(5);
    expect(canonicalJson([price, { p: price }])).toBe(JSON.stringify([price, { p: price }]));
  });
});

describe('bytes inside a body', () => {
  it('are written as their SHA-256, not as an array of numbers (an upload the size of a file stays a short text)', () => {
    const big = Buffer.alloc(20 * 1024 * 1024, 0x61);
    const text = canonicalJson({ amount: '10', doc: big });
    expect(text.length).toBeLessThan(100);
    expect(text).toMatch(/^\{"amount":"10","doc":"bytes:sha256:[\w-]{43}"\}$/);
    expect(canonicalJson({ doc: Buffer.from('ALICE') })).not.toBe(canonicalJson({ doc: Buffer.from('BOB') }));
    expect(canonicalJson({ doc: new Uint8Array([1, 2]) })).toBe(canonicalJson({ doc: Buffer.from([1, 2]) }));
    // Any binary value is its bytes: not `{"0":1,"1":2}` (a typed array) or `{}` (an ArrayBuffer),
    // which would pass for an object a client sent, or for each other.
    const bytes = new Uint8Array([1, 2, 3, 4]);
    for (const view of [new Uint16Array(bytes.buffer), new DataView(bytes.buffer), bytes.buffer, new Uint8ClampedArray(bytes.buffer)]) {
      expect(canonicalJson({ doc: view })).toBe(canonicalJson({ doc: bytes }));
    }
    expect(canonicalJson({ doc: new ArrayBuffer(2) })).not.toBe(canonicalJson({ doc: {} }));
  });
});
