import { createHash } from 'node:crypto';

/**
 * Canonical JSON (sorted object keys, JSON.stringify's value rules) written without recursion.
 * Bodies come from JSON parsers that accept any depth, so a 100 KB body can nest 50 000 levels;
 * a recursive serialiser would overflow the stack on it (found by the reliability suite).
 */

type Frame =
  | { readonly kind: 'array'; readonly items: readonly unknown[]; index: number; readonly self: object; readonly owner: object | undefined }
  | { readonly kind: 'object'; readonly source: Record<string, unknown>; readonly keys: string[]; index: number; wrote: boolean; readonly self: object; readonly owner: object | undefined };

/** A value JSON.stringify leaves out of objects (and writes as null in arrays). */
function isSkipped(value: unknown): boolean {
  return value === undefined || typeof value === 'function' || typeof value === 'symbol';
}

/**
 * Apply `toJSON` (Dates) and unwrap what JSON.stringify unwraps; returns the value to write.
 * Bytes inside a body (an upload as `@fastify/multipart`'s `keyValues` gives it) are written as
 * their SHA-256, not as `Buffer.toJSON()`'s array of numbers: 50 MB of those took 44 s and 3.8 GB.
 */
function prepare(value: unknown): unknown {
  // Most members of a parsed body are strings and numbers: four class checks spared on each.
  if (typeof value !== 'object' || value === null) return value;
  // Nearly every object of a parsed body is a plain object or array (null-prototype ones from
  // urlencoded and query parsers): only toJSON can apply to those, so the class checks below are
  // spared on each.
  const proto: unknown = Object.getPrototypeOf(value);
  if (proto === Object.prototype || proto === Array.prototype || proto === null) {
    return typeof (value as { toJSON?: unknown }).toJSON === 'function' ? (value as { toJSON(): unknown }).toJSON() : value;
  }
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) return `bytes:sha256:${createHash('sha256').update(bytesOf(value)).digest('base64url')}`;
  if (value instanceof Map || value instanceof Set) return tagged(value);
  // Function arguments (`idempotent()`) only, like Maps: JSON writes each of these as `{}`, so a
  // form-encoded webhook passed on as URLSearchParams replayed the first one's result to every other.
  if (value instanceof URLSearchParams || (HEADERS !== undefined && value instanceof HEADERS)) return new Tagged(value.constructor.name, value, [...(value as Iterable<unknown>)]);
  if (value !== null && typeof value === 'object' && typeof (value as { toJSON?: unknown }).toJSON === 'function') {
    return (value as { toJSON(): unknown }).toJSON();
  }
  if (value instanceof Error) return new Tagged('Error', value, errorParts(value));
  if (value instanceof RegExp) return new Tagged('RegExp', value, [value.source, value.flags]);
  refuseOpaque(value);
  // A boxed primitive, unwrapped as JSON.stringify unwraps it: written as an object, every
  // `new Number(n)` was `{}`, so a job called with 100 and then 200 (boxed) replayed the first result.
  if (value instanceof Number || value instanceof String || value instanceof Boolean || value instanceof BigInt) return value.valueOf();
  return value;
}

/**
 * A `Map` or `Set` (JSON.stringify writes `{}` for both, so every Map would fingerprint alike):
 * written as its tag and its entries or values as an array, `Map[["a",1]]`, text no JSON value
 * can be. Only function arguments (`idempotent()`) hold these; parsed bodies never do.
 */
class Tagged {
  constructor(
    readonly tag: string,
    readonly source: object,
    readonly items: unknown[],
  ) {}
}

/** An Error's name, message and enumerable fields, then its `cause` and an AggregateError's `errors` (own, not enumerable). */
function errorParts(error: Error): unknown[] {
  const parts: unknown[] = [error.name, error.message, { ...error }];
  if (Object.hasOwn(error, 'cause')) parts.push('cause', error.cause);
  if (error instanceof AggregateError) parts.push('errors', error.errors);
  return parts;
}

/**
 * Values whose data JSON cannot see and no synchronous code can read (a Blob's bytes), or that
 * are a mistake (a Promise: a missing `await`): written as `{}`, two different ones fingerprinted
 * alike and the second was replayed the first's answer.
 */
function refuseOpaque(value: object): void {
  const opaque =
    typeof (value as { then?: unknown }).then === 'function'
      ? 'a Promise (a missing `await`?)'
      : value instanceof WeakMap || value instanceof WeakSet || value instanceof WeakRef || value instanceof Blob || OPAQUE_WEB.some((type) => value instanceof type)
        ? withArticle(value.constructor.name)
        : null;
  if (opaque !== null) throw new TypeError(`[idemkit] Cannot fingerprint ${opaque}: JSON sees none of its data, so any two would look alike.`);
}

/** "a Blob", "an Error": a class name as a message says it. */
export function withArticle(name: string): string {
  return `${/^[AEIOU]/.test(name) ? 'an' : 'a'} ${name}`;
}

/** fetch()'s classes, those this runtime has: `node --no-experimental-fetch` leaves them out. */
export function webClass(name: string): Array<abstract new (...args: never[]) => object> {
  const type = (globalThis as Record<string, unknown>)[name];
  return typeof type === 'function' ? [type as abstract new (...args: never[]) => object] : [];
}
const HEADERS = webClass('Headers')[0];
/** The web classes holding data JSON cannot see. */
const OPAQUE_WEB = ['FormData', 'Request', 'Response'].flatMap(webClass);

/** Maps and Sets being written (for their sort), to refuse one that contains itself. */
const writing = new WeakSet<object>();

/**
 * A Map's entries sorted by key, a Set's values sorted, each by its canonical text: like an
 * object's keys, their order of insertion does not count.
 */
function tagged(value: Map<unknown, unknown> | Set<unknown>): Tagged {
  if (writing.has(value)) throw new TypeError('[idemkit] Cannot fingerprint a body that contains itself.');
  writing.add(value);
  try {
    const items = value instanceof Map ? [...value].map((entry) => [canonicalJson(entry[0]), entry] as const) : [...value].map((item) => [canonicalJson(item), item] as const);
    // Two Map keys can write alike (two `{}` objects): their values break the tie, or insertion
    // order decided and the same Map built in another order fingerprinted otherwise. Equal Set
    // items write alike whatever their order. Values are written here only on such a tie.
    items.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : value instanceof Map ? compareText(canonicalJson((a[1] as readonly unknown[])[1]), canonicalJson((b[1] as readonly unknown[])[1])) : 0));
    return new Tagged(value instanceof Map ? 'Map' : 'Set', value, items.map((item) => item[1]));
  } finally {
    writing.delete(value);
  }
}

function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The bytes of any binary value (a typed array of any width, a DataView, an ArrayBuffer). */
function bytesOf(value: ArrayBufferView | ArrayBuffer): Uint8Array {
  return value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
}

/**
 * `JSON.stringify(text)` for a string: the same text. Strings with nothing to escape (no `"`,
 * `\\`, control character or surrogate) are quoted here; JSON.stringify is a runtime call that
 * cost ~850 instructions on every key and value of a body (callgrind, `pnpm bench`).
 */
export function quote(text: string): string {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x20 || c === 0x22 || c === 0x5c || (c >= 0xd800 && c <= 0xdfff)) return JSON.stringify(text);
  }
  return `"${text}"`;
}

/** Small objects are sorted in place by insertion: `Array#sort` allocated ~0.9 KB on every request (seen in `pnpm bench`'s heap profile). */
const INSERTION_SORT_MAX = 16;

/**
 * An object's own enumerable keys in `Array#sort`'s default order (UTF-16 code units, which is
 * what `<` compares on strings; keys are never equal).
 */
function sortedKeys(source: object): string[] {
  const keys = Object.keys(source);
  if (keys.length > INSERTION_SORT_MAX) return keys.sort();
  for (let i = 1; i < keys.length; i++) {
    const key = keys[i]!;
    let j = i - 1;
    while (j >= 0 && keys[j]! > key) {
      keys[j + 1] = keys[j]!;
      j--;
    }
    keys[j + 1] = key;
  }
  return keys;
}

/** Write a scalar, or open a container frame; returns the frame to push (if any). */
function open(value: unknown, out: string[], ancestors: Set<object>): Frame | undefined {
  const v = prepare(value);
  if (v === null || isSkipped(v)) {
    out.push('null');
    return undefined;
  }
  switch (typeof v) {
    case 'string':
      out.push(quote(v));
      return undefined;
    case 'number':
      out.push(Number.isFinite(v) ? String(v) : 'null');
      return undefined;
    case 'boolean':
      out.push(v ? 'true' : 'false');
      return undefined;
    case 'bigint':
      out.push(String(v));
      return undefined;
  }
  const obj = v as object;
  // A Tagged is made afresh on every visit: its Map or Set is what repeats in a cycle.
  const self = obj instanceof Tagged ? obj.source : obj;
  // So is what a `toJSON` returns: one that returns a new object holding `this` repeats only in
  // its owner (JSON.stringify overflows the stack on it; unchecked, this loop ran until memory ran out).
  const owner = obj !== value && !(obj instanceof Tagged) && typeof value === 'object' && value !== null ? value : undefined;
  if (ancestors.has(self) || (owner !== undefined && ancestors.has(owner))) throw new TypeError('[idemkit] Cannot fingerprint a body that contains itself.');
  ancestors.add(self);
  if (owner !== undefined) ancestors.add(owner);
  if (obj instanceof Tagged) {
    out.push(`${obj.tag}[`);
    return { kind: 'array', items: obj.items, index: 0, self, owner };
  }
  if (Array.isArray(obj)) {
    out.push('[');
    return { kind: 'array', items: obj, index: 0, self, owner };
  }
  out.push('{');
  const source = obj as Record<string, unknown>;
  return { kind: 'object', source, keys: sortedKeys(source), index: 0, wrote: false, self, owner };
}

/** Nesting the recursive fast path handles; deeper bodies (and cycles) go to the iterative writer. */
const FAST_DEPTH = 64;

/**
 * The same text as `iterative`, written recursively with string concatenation: no frames, no
 * ancestor set, no output array (the profile of `pnpm bench` showed those allocations on every
 * request). Gives up with `undefined` past FAST_DEPTH levels, which also catches any cycle.
 */
function fast(value: unknown, depth: number): string | undefined {
  if (value === null || isSkipped(value)) return 'null';
  switch (typeof value) {
    case 'string':
      return quote(value);
    case 'number':
      return Number.isFinite(value) ? String(value) : 'null';
    case 'boolean':
      return value ? 'true' : 'false';
    case 'bigint':
      return String(value);
  }
  if (depth === FAST_DEPTH) return undefined;
  if (value instanceof Tagged) {
    const items = fast(value.items, depth + 1);
    return items === undefined ? undefined : value.tag + items;
  }
  if (Array.isArray(value)) {
    let text = '[';
    for (let i = 0; i < value.length; i++) {
      const item = fast(prepare(value[i]), depth + 1);
      if (item === undefined) return undefined;
      text += i === 0 ? item : `,${item}`;
    }
    return `${text}]`;
  }
  const source = value as Record<string, unknown>;
  const keys = sortedKeys(source);
  let text = '{';
  for (const key of keys) {
    const member = prepare(source[key]);
    if (isSkipped(member)) continue;
    const item = fast(member, depth + 1);
    if (item === undefined) return undefined;
    text += `${text.length === 1 ? '' : ','}${quote(key)}:${item}`;
  }
  return `${text}}`;
}

/** Canonical JSON text of `value`, at any nesting depth. */
export function canonicalJson(value: unknown): string {
  return fast(prepare(value), 0) ?? iterative(value);
}

function iterative(value: unknown): string {
  const out: string[] = [];
  const ancestors = new Set<object>();
  const stack: Frame[] = [];
  const push = (v: unknown) => {
    const frame = open(v, out, ancestors);
    if (frame) stack.push(frame);
  };
  push(value);
  while (stack.length > 0) {
    const frame = stack[stack.length - 1]!;
    if (frame.kind === 'array') {
      if (frame.index === frame.items.length) {
        out.push(']');
        ancestors.delete(frame.self);
        if (frame.owner !== undefined) ancestors.delete(frame.owner);
        stack.pop();
        continue;
      }
      if (frame.index > 0) out.push(',');
      push(frame.items[frame.index++]);
      continue;
    }
    // Objects: skip members JSON.stringify would leave out.
    while (frame.index < frame.keys.length && isSkipped(prepare(frame.source[frame.keys[frame.index]!]))) frame.index++;
    if (frame.index === frame.keys.length) {
      out.push('}');
      ancestors.delete(frame.self);
      if (frame.owner !== undefined) ancestors.delete(frame.owner);
      stack.pop();
      continue;
    }
    const key = frame.keys[frame.index++]!;
    out.push(`${frame.wrote ? ',' : ''}${quote(key)}:`);
    frame.wrote = true;
    push(frame.source[key]);
  }
  return out.join('');
}
