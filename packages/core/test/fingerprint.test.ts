import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { canonicalBody, ConfigurationError, defaultFingerprint, isMultipart, upperMethod, uploadedFileDigests } from '../src/index.js';

const fp = (body: unknown, method = 'POST', path = '/orders') => defaultFingerprint({ method, path, body });

/** Shuffle an object's keys, recursively. */
function reorder(value: unknown, seed: number): unknown {
  if (Array.isArray(value)) return value.map((v) => reorder(v, seed));
  if (value === null || typeof value !== 'object') return value;
  const entries = Object.entries(value);
  entries.sort(() => (seed % 2 === 0 ? 1 : -1));
  return Object.fromEntries(entries.reverse().map(([k, v]) => [k, reorder(v, seed + 1)]));
}

describe('fingerprint', () => {
  it('covers method, path with query, and body', () => {
    const base = fp({ a: 1 });
    expect(fp({ a: 1 }, 'PATCH')).not.toBe(base);
    expect(fp({ a: 1 }, 'POST', '/orders?x=1')).not.toBe(base);
    expect(fp({ a: 2 })).not.toBe(base);
    expect(fp({ a: 1 })).toBe(base);
    expect(base).toMatch(/^sha256:[\w-]{43}$/);
  });

  it('is the SHA-256 of method, NUL, path, NUL, canonical body (stable across versions)', () => {
    const expected = createHash('sha256').update('POST\0/orders?x=1\0{"a":1,"b":[2]}').digest('base64url');
    expect(fp({ b: [2], a: 1 }, 'post', '/orders?x=1')).toBe(`sha256:${expected}`);
    expect(fp('{"a":1,"b":[2]}', 'POST', '/orders?x=1')).toBe(`sha256:${expected}`);
    expect(fp(Buffer.from('{"a":1,"b":[2]}'), 'POST', '/orders?x=1')).toBe(`sha256:${expected}`);
  });

  // Was: both hashed as UTF-8, where every lone surrogate is U+FFFD, so the second body was
  // replayed the first one's answer instead of a 422.
  it('tells apart text bodies that differ only in a lone surrogate (UTF-16 text as iconv decodes it)', () => {
    const utf16 = (...bytes: number[]) => Buffer.from(bytes).toString('utf16le');
    const a = utf16(0x00, 0xd8, 0x41, 0x00); // '\ud800A'
    const b = utf16(0x01, 0xd8, 0x41, 0x00); // '\ud801A'
    expect((a as string & { isWellFormed(): boolean }).isWellFormed()).toBe(false);
    expect(fp(a)).not.toBe(fp(b));
    expect(fp(a)).toBe(fp(utf16(0x00, 0xd8, 0x41, 0x00)));
    expect(fp(a)).not.toBe(fp('\ufffdA'));
    // Well-formed text keeps the fingerprint it always had.
    expect(fp('h\u00e9llo \ud83d\ude00')).toBe(fp(Buffer.from('h\u00e9llo \ud83d\ude00')));
  });

  // Was: a request sent through a proxy in absolute form, then retried directly, got 422.
  it('takes a request target in absolute form as its path and query', () => {
    expect(fp({ a: 1 }, 'POST', 'http://shop.example/orders?x=1')).toBe(fp({ a: 1 }, 'POST', '/orders?x=1'));
    expect(fp({ a: 1 }, 'POST', 'HTTPS://shop.example:8443/orders')).toBe(fp({ a: 1 }, 'POST', '/orders'));
    expect(fp({ a: 1 }, 'POST', 'http://shop.example')).toBe(fp({ a: 1 }, 'POST', '/'));
    expect(fp({ a: 1 }, 'POST', 'http://shop.example?x=1')).toBe(fp({ a: 1 }, 'POST', '/?x=1'));
    // An origin-form path is never cut, whatever it holds.
    expect(fp({ a: 1 }, 'POST', '//shop.example/orders')).not.toBe(fp({ a: 1 }, 'POST', '/orders'));
    expect(fp({ a: 1 }, 'POST', '/http://shop.example/orders')).not.toBe(fp({ a: 1 }, 'POST', '/orders'));
  });

  it('refuses a body that is an unread stream with an error naming the fix (it used to say "contains itself")', () => {
    for (const stream of [Readable.from(['{"a":1}']), new ReadableStream()]) {
      expect(() => fp(stream)).toThrow(ConfigurationError);
      expect(() => fp(stream)).toThrow(/stream nothing has read.*parseAs: 'buffer'.*`fingerprint` function/);
    }
  });

  it('hashes raw bytes and strings as they are, and no body as empty', () => {
    expect(fp(new Uint8Array([1, 2, 3]))).toBe(fp(Buffer.from([1, 2, 3])));
    expect(canonicalBody(undefined)).toBe('');
    expect(canonicalBody(null)).toBe('');
    expect(canonicalBody('text')).toBe('text');
    expect(canonicalBody({ b: 1, a: 2 })).toBe('{"a":2,"b":1}');
    expect(canonicalBody({ n: 10n })).toBe('{"n":10}');
  });

  it('property: key order never changes the fingerprint', () => {
    fc.assert(
      fc.property(fc.jsonValue(), fc.nat(), (value, seed) => {
        expect(fp(reorder(value, seed))).toBe(fp(value));
      }),
    );
  });

  it('property: any change of a value changes the fingerprint', () => {
    fc.assert(
      fc.property(fc.dictionary(fc.string(), fc.string()), fc.string(), fc.string(), fc.string(), (obj, key, v1, v2) => {
        fc.pre(v1 !== v2);
        expect(fp({ ...obj, [key]: v1 })).not.toBe(fp({ ...obj, [key]: v2 }));
      }),
    );
  });

  it('property: any byte change of a raw body changes the fingerprint', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 256 }), fc.nat(), fc.integer({ min: 1, max: 255 }), (bytes, at, delta) => {
        const changed = Uint8Array.from(bytes);
        const i = at % bytes.length;
        changed[i] = (changed[i]! + delta) % 256;
        expect(fp(changed)).not.toBe(fp(bytes));
      }),
    );
  });
});

describe('upperMethod', () => {
  it('is toUpperCase() for any method name: upper case as it is, lower, mixed and non-ASCII ones upper-cased', () => {
    for (const name of ['POST', 'PATCH', 'M-SEARCH', 'post', 'Patch', 'pOsT', 'ß', 'straße', 'ı', 'é', '\u0000', '']) {
      expect(upperMethod(name)).toBe(name.toUpperCase());
    }
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (name) => {
        expect(upperMethod(name)).toBe(name.toUpperCase());
      }),
    );
  });

  it('gives a lower-case method the fingerprint of its upper-case form, as before', () => {
    const body = { amount: 10 };
    expect(defaultFingerprint({ method: 'post', path: '/orders', body })).toBe(defaultFingerprint({ method: 'POST', path: '/orders', body }));
  });
});

describe('uploaded files', () => {
  const sha = (text: string) => createHash('sha256').update(text).digest('base64url');
  const request = { method: 'POST', path: '/upload', body: { amount: '10' } };

  it('leave the fingerprint of a request without files as it always was', () => {
    expect(defaultFingerprint({ ...request, files: {} })).toBe(defaultFingerprint(request));
    expect(defaultFingerprint({ ...request, files: undefined })).toBe(defaultFingerprint(request));
    expect(defaultFingerprint({ ...request, files: { doc: [sha('a')] } })).not.toBe(defaultFingerprint(request));
    expect(defaultFingerprint({ ...request, files: { doc: [sha('a')] } })).not.toBe(defaultFingerprint({ ...request, files: { doc: [sha('b')] } }));
    // The field a file came in matters, as a body field's name does.
    expect(defaultFingerprint({ ...request, files: { doc: [sha('a')] } })).not.toBe(defaultFingerprint({ ...request, files: { other: [sha('a')] } }));
  });

  it('are digested from what multer and koa-body leave on the request', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'idemkit-files-'));
    const onDisk = join(dir, 'upload');
    writeFileSync(onDisk, 'on disk');
    // multer, memory storage: req.file
    expect(await uploadedFileDigests({ fieldname: 'doc', buffer: Buffer.from('in memory') })).toEqual({ doc: [sha('in memory')] });
    // multer, disk storage: req.files as an array, and as { field: file[] }
    expect(await uploadedFileDigests([{ fieldname: 'doc', path: onDisk }, { fieldname: 'doc', buffer: Buffer.from('x') }])).toEqual({ doc: [sha('on disk'), sha('x')] });
    expect(await uploadedFileDigests({ doc: [{ fieldname: 'doc', path: onDisk }] })).toEqual({ doc: [sha('on disk')] });
    // koa-body (formidable): { field: file | file[] } with filepath
    expect(await uploadedFileDigests({ doc: { filepath: onDisk }, more: [{ filepath: onDisk }] })).toEqual({ doc: [sha('on disk')], more: [sha('on disk')] });
    // express-fileupload: { field: file } with `data`, or `tempFilePath` (and empty `data`) with useTempFiles
    expect(await uploadedFileDigests({ doc: { name: 'a.txt', data: Buffer.from('in memory'), tempFilePath: '' } })).toEqual({ doc: [sha('in memory')] });
    expect(await uploadedFileDigests({ doc: { name: 'a.txt', data: Buffer.alloc(0), tempFilePath: onDisk } })).toEqual({ doc: [sha('on disk')] });
    expect(await uploadedFileDigests(undefined)).toBeUndefined();
    expect(await uploadedFileDigests({})).toBeUndefined();
    // A file whose bytes cannot be read must not pass for any other.
    await expect(uploadedFileDigests({ doc: { originalFilename: 'a.txt', size: 3 } })).rejects.toThrow(/neither its bytes/);
    // A multer storage engine that keeps no bytes here (S3): req.file has only metadata.
    await expect(uploadedFileDigests({ fieldname: 'doc', originalname: 'a.txt', key: 'uploads/a.txt' })).rejects.toThrow(/pass a `fingerprint`/);
  });

  it('are looked for only in multipart requests', () => {
    expect(isMultipart('multipart/form-data; boundary=X')).toBe(true);
    expect(isMultipart('Multipart/Form-Data; boundary=X')).toBe(true);
    expect(isMultipart('application/json')).toBe(false);
    expect(isMultipart(undefined)).toBe(false);
  });
});
