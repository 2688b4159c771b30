import { responseHeaders, snapshotHeaders, toStoredHeaders, whenSocketCloses, type Lease, type OutgoingHeaderValue, type StoredResponse } from '@idemkit/core';
import { ServerResponse, STATUS_CODES, type OutgoingHttpHeader, type OutgoingHttpHeaders } from 'node:http';
import type { Socket } from 'node:net';

type Callback = (error?: Error | null) => void;

interface EndArgs {
  readonly chunk: unknown;
  readonly encoding: BufferEncoding | undefined;
  readonly callback: Callback | undefined;
}

/** `end()`, `end(cb)`, `end(chunk)`, `end(chunk, cb)`, `end(chunk, encoding)`, `end(chunk, encoding, cb)`. */
function parseEndArgs(args: readonly unknown[]): EndArgs {
  const [first, second, third] = args;
  if (typeof first === 'function') return { chunk: undefined, encoding: undefined, callback: first as Callback };
  if (typeof second === 'function') return { chunk: first, encoding: undefined, callback: second as Callback };
  return {
    chunk: first,
    encoding: typeof second === 'string' ? (second as BufferEncoding) : undefined,
    callback: typeof third === 'function' ? (third as Callback) : undefined,
  };
}

function isChunk(chunk: unknown): boolean {
  return typeof chunk === 'string' || chunk instanceof Uint8Array;
}

/** Node's writeHead would throw: no head yet, and a status outside 100–999. */
function refusedHead(res: ServerResponse): boolean {
  const code = res.statusCode | 0;
  return !res.headersSent && (code < 100 || code > 999);
}

function toBuffer(chunk: unknown, encoding: BufferEncoding | undefined): Buffer {
  if (chunk === undefined || chunk === null) return Buffer.alloc(0);
  if (typeof chunk === 'string') return Buffer.from(chunk, encoding ?? 'utf8');
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  throw new TypeError('[idemkit] res.end() chunk must be a string, Buffer or Uint8Array.');
}

/**
 * Headers passed to `writeHead()` bypass `setHeader()`, so `getHeaders()` would not show them.
 * Apply them first (objects replace, raw arrays append), then let Node write what it holds.
 */
function applyHeaders(res: ServerResponse, headers: OutgoingHttpHeaders | readonly OutgoingHttpHeader[]): void {
  if (!Array.isArray(headers)) {
    for (const [name, value] of Object.entries(headers as OutgoingHttpHeaders)) {
      if (value !== undefined) res.setHeader(name, value);
    }
    return;
  }
  // Node accepts a flat [name, value, name, value, …] list or [name, value] pairs; the names in
  // it replace any set before, and repeated names in it are all kept (as Node's writeHead does).
  const nested = headers.every(Array.isArray);
  if (!nested && headers.length % 2 !== 0) {
    throw Object.assign(new TypeError("The argument 'headers' must be an array of name/value pairs."), { code: 'ERR_INVALID_ARG_VALUE' });
  }
  const pairs: Array<[string, OutgoingHttpHeader]> = nested
    ? (headers as unknown as Array<[string, OutgoingHttpHeader]>)
    : Array.from({ length: headers.length / 2 }, (_, i) => [String(headers[2 * i]), headers[2 * i + 1] as OutgoingHttpHeader]);
  for (const name of new Set(pairs.map(([n]) => n.toLowerCase()))) res.removeHeader(name);
  for (const [name, value] of pairs) res.appendHeader(name, Array.isArray(value) ? value : String(value));
}

/** Whether status or headers moved after end() (checked per request, so it only compares). */
function changedSince(res: ServerResponse, status: number, message: string, headers: OutgoingHttpHeaders): boolean {
  if (res.statusCode !== status || res.statusMessage !== message) return true;
  const names = Object.keys(headers);
  if (res.getHeaderNames().length !== names.length) return true;
  for (const name of names) if (res.getHeader(name) !== headers[name]) return true;
  return false;
}

function restore(res: ServerResponse, status: number, message: string, headers: OutgoingHttpHeaders): void {
  res.statusCode = status;
  res.statusMessage = message;
  for (const name of res.getHeaderNames()) res.removeHeader(name);
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) res.setHeader(name, value);
}

function writeAfterEnd(): Error {
  return Object.assign(new Error('write after end'), { code: 'ERR_STREAM_WRITE_AFTER_END' });
}

const kDictionary = Symbol('idemkit.dictionary');

/**
 * One `name` per process, not per copy of this module: an app that `import`s this package in one
 * file and `require`s it in another (an ESM app with a CommonJS router or error module) runs both
 * builds, `dist/index.js` and `dist/index.cjs`, side by side. Each copy keeping its own maps, a
 * per-route idempotency() of one copy did not see the key the app-wide one of the other had
 * claimed (and answered 409 to its own request), and idempotencyErrorHandler() of one never freed
 * a key the other claimed. Through the global symbol registry both copies find the same map
 * (as the Koa binding's running mark does). Looked up once, at load: nothing per request.
 */
export function processWide<T extends object>(name: string, create: () => T): T {
  const registry = globalThis as Record<symbol, unknown>;
  const key = Symbol.for(`idemkit.express.${name}`);
  return (registry[key] ??= create()) as T;
}

/**
 * Express sets the prototype of every `req` and `res` per request (`Object.setPrototypeOf`), after
 * which V8 gives each one a hidden class of its own, so each property added to it copies the
 * object's property descriptors: about 2.7 KB of garbage per add (`--trace-gc-nvp`), and the
 * patches of captureResponse are four adds; and every property read of it misses V8's inline
 * caches (a runtime call each). Adding and deleting a private symbol first switches the object to
 * dictionary properties, where an add is a hash insert and a read a hash lookup. Nothing
 * observable changes: the symbol never stays. The middleware does it to `req` and `res` as soon
 * as a request may be claimed or replayed, so captureResponse finds `res` switched already.
 */
export function toDictionaryProperties(target: object): void {
  const object = target as { [kDictionary]?: true };
  object[kDictionary] = true;
  delete object[kDictionary];
}

/**
 * Capture one response for `lease`, patching `writeHead`, `write`, `flushHeaders` and `end` on
 * this response object only (every Express path — `send`, `json`, `redirect`, `sendStatus`,
 * `sendFile`, a raw `end` — goes through them).
 *
 * - `end(body)` with no `write()` before it: the response is buffered; `lease.commit` is awaited
 *   and only then does the original `end` run, so a client that retries at once gets a replay.
 * - `write()` or `flushHeaders()` first: the handler streams (pipes, SSE). Chunks pass through
 *   as they come, the lease is settled with `commitUnbuffered(status, 'not-bufferable')`, and
 *   the final `end` waits for that.
 * - Bodies over `maxBodyBytes` are still delivered whole; `commit` stores the "too large" marker.
 */
export function captureResponse(
  res: ServerResponse,
  lease: Lease,
  { transactional, leaseMs, storable }: { transactional: boolean; leaseMs: number; storable: (status: number) => boolean },
  /**
   * Told when the answer turns out to stream (and so will not be stored); `wrapped`: a middleware
   * mounted after this one has replaced our `write` or `end` (as compression() does).
   */
  onStreaming?: (res: ServerResponse, wrapped: boolean) => void,
): void {
  // Set by middleware before this one (CORS, a request id): not stored unless the handler changes them.
  // (`res` has dictionary properties already: the middleware switched it, see toDictionaryProperties.)
  const before = snapshotHeaders(res.getHeaders());
  // Express's send() works a HEAD answer's body out (its Content-Length and ETag come from it),
  // then ends without it: stored as ended, the replay said `Content-Length: 0`. Kept here and
  // stored instead, as Koa and Fastify store it (no replay of a HEAD sends it). Only on HEAD.
  let headBody: Buffer | undefined;
  const expressRes = res as ServerResponse & { req?: { method?: string }; send?: (...args: unknown[]) => unknown };
  if (expressRes.req?.method === 'HEAD' && typeof expressRes.send === 'function') {
    const originalSend = expressRes.send;
    expressRes.send = function send(this: ServerResponse, ...args: unknown[]): unknown {
      // json() and sendStatus() come back here with the string they send.
      const [value] = args;
      headBody = typeof value === 'string' ? Buffer.from(value, 'utf8') : value instanceof Uint8Array ? toBuffer(value, undefined) : undefined;
      return Reflect.apply(originalSend, this, args);
    };
  }
  const originalWriteHead = res.writeHead;
  const originalWrite = res.write;
  const originalEnd = res.end;
  const originalFlushHeaders = res.flushHeaders;
  let mode: 'buffering' | 'streaming' | 'ending' = 'buffering';
  /** Set once the stored answer is being written (Node's end() calls writeHead itself). */
  let delivering = false;
  let settling: Promise<unknown> = Promise.resolve();
  // The response closed with no answer. Nothing tells why, so the likeliest reason decides:
  // - nothing written yet: the client left while the handler works (slowly, or for good: it
  //   stopped on the client's 'close'; or an Express 4 async handler rejected, which Express 4
  //   never catches). The handler gets a lease's time to answer (stored, and replayed to the
  //   retry); then the key is marked `cut-short`: neither held for good nor run a second time.
  // - its head written: the handler most likely threw after writeHead without
  //   idempotencyErrorHandler() (Express's final handler then cuts the connection). The lease is
  //   left to run out, as a crashed holder's: an end() before then is still stored, and after it
  //   the next request takes the key over, as a throw allows.
  // In transactional mode the lease always runs out: the transaction is then rolled back (a
  // marker would commit the writes of a handler that never finished) and its connection returned.
  let closeSeen = false;
  let cutShort: NodeJS.Timeout | undefined;
  const onClose = (): void => {
    if (closeSeen || mode !== 'buffering') return;
    closeSeen = true;
    if (transactional || res.headersSent) return lease.letLapse();
    cutShort = setTimeout(() => {
      if (mode === 'buffering' && !lease.settled) void lease.commitUnbuffered(null, 'cut-short');
    }, leaseMs).unref();
  };
  // Once the handler answers, the timer has nothing left to do: it must not keep the request,
  // the response and the parsed body alive for a whole lease.
  const answered = (): void => clearTimeout(cutShort);
  // Closed already (the client left while the key was being claimed): 'close' will not come again.
  if (res.closed) onClose();
  else {
    res.once('close', onClose);
    // Pipelined behind another answer on its connection (it has no socket yet): should the socket
    // die first, Node never closes this response, so the socket's close stands in.
    const socket = (res as ServerResponse & { req?: { socket?: Socket | null } }).req?.socket;
    if (res.socket === null && socket) res.once('finish', whenSocketCloses(socket, onClose));
  }

  // Our own write and end (set below): one that differs when the answer streams was wrapped later.
  let ours: Pick<ServerResponse, 'write' | 'end' | 'writeHead'> = res;
  /** Set while the head listeners run ahead of the store (see runHeadListeners): pass straight on. */
  let probing = false;
  /**
   * Transactional mode: a streamed answer commits its transaction (with the "not replayable"
   * marker) when it starts, and nothing of it may go out before that commit has settled: should
   * it roll back, the client must get the 503 (or, past a written head, a cut connection), never
   * a whole 2xx for writes that never happened. Writes, flushHeaders and end() wait here.
   */
  let held: Array<{ run: () => unknown; write?: true; callback?: Callback | undefined }> | undefined;
  /** Bytes held; past the response's high-water mark a write says "wait for 'drain'" (a pipe pauses). */
  let heldBytes = 0;
  let owesDrain = false;
  /**
   * The head as it was when the stream started: the one Node would have sent with the first
   * write. Held, it can still change; it is put back before the held bytes go out (and a status
   * changed meanwhile marks the end that follows as another answer's: see `overwritten`).
   */
  let head: { status: number; message: string; headers: OutgoingHttpHeaders } | undefined;
  /** The status of the head writeHead() wrote (Node keeps it; a later `res.statusCode` goes nowhere). */
  let headStatus: number | undefined;
  /** The headers of the head writeHead() wrote, as the handler gave them: before its head listeners ran. */
  let headGiven: ReturnType<typeof snapshotHeaders> | undefined;
  /** Set while `_implicitHeader()` runs (a later end()'s, as express-session's, writing the head for its writes). */
  let implicit = false;
  /** The written head came through `_implicitHeader()`, not from the handler's own writeHead(). */
  let headImplicit = false;
  /** The status the client gets: the written head's, once there is one. */
  const statusOut = (r: ServerResponse): number => (r.headersSent && headStatus !== undefined ? headStatus : r.statusCode);
  /**
   * An answer with a status or a length of its own was ended over the started stream: an error
   * handler's, after the handler threw (its head cannot go out: the stream's went first). Sent,
   * its bytes would end the stream as if it had succeeded, or with a length that does not count
   * the held bytes; so the answer is dropped and the connection cut after the held bytes, as
   * Express cuts it once a head went out. (A status a handler sets between writes counts too.)
   */
  let overwritten = false;
  /** The rolled-back stream was answered with its replacement (or cut): later writes go nowhere. */
  let replaced = false;
  const releaseHeld = (): void => {
    const ops = held ?? [];
    held = undefined;
    // Node's first write or end() writes the head through writeHead, which end() (held) blocks.
    delivering = true;
    try {
      const replacement = lease.replacement;
      if (replacement !== null) {
        replaced = true;
        // Their bytes never go out: each write's and end's callback learns so.
        for (const { callback } of ops) if (callback) process.nextTick(callback, rolledBack());
        if (res.headersSent) res.destroy();
        else sendReplacement(res, replacement, before, originalEnd);
        // A handler awaiting 'drain' goes on (its later writes are dropped), instead of hanging.
        if (owesDrain) res.emit('drain');
        return;
      }
      // Written during the hold (compression() writes it at its first write), it is the stream's
      // own head already (see writeHead).
      if (!res.headersSent && head !== undefined && changedSince(res, head.status, head.message, head.headers)) restore(res, head.status, head.message, head.headers);
      let lastWrite: unknown = true;
      for (const op of ops) {
        const result = op.run();
        if (op.write) lastWrite = result;
      }
      if (overwritten) cutAfterFlush(res);
      // Node emits 'drain' itself after a write that returned false; after end() none is owed.
      else if (owesDrain && lastWrite !== false && mode !== 'ending' && !res.destroyed) res.emit('drain');
    } catch {
      // Never an unhandled rejection from a response that could not be finished: cut it.
      res.destroy();
    }
  };
  const startStreaming = (): void => {
    if (mode !== 'buffering') return;
    mode = 'streaming';
    answered();
    // A streamed not-found no route gave (a catch-all's sendFile('404.html')) frees the key too.
    // After writeHead(202) a status set later goes nowhere: the head's is what the client gets.
    const status = statusOut(res);
    settling = unrouted(res) ? lease.abandon('not-storable') : lease.commitUnbuffered(status, 'not-bufferable');
    // Through a later middleware's end(): express-session's writes the head, then the body in two
    // writes. An end() wrapped later is no sign by itself: a handler that streams with write()
    // or pipe() reaches our write before any head, and its answer is a stream of its own doing.
    // Nor is a head the handler wrote itself (writeHead(200, {...}) and then write(), as an SSE
    // stream does): express-session's end() writes its head through _implicitHeader().
    onStreaming?.(res, res.write !== ours.write || (res.end !== ours.end && res.headersSent && headImplicit));
    if (transactional) {
      held = [];
      head = { status, message: res.statusMessage, headers: res.getHeaders() };
      void settling.then(releaseHeld, releaseHeld);
    }
  };

  res.writeHead = function writeHead(this: ServerResponse, statusCode: number, ...rest: unknown[]): ServerResponse {
    // With what a wrapper mounted later passes on (its reason, its headers): the real head goes
    // past that wrapper (see skipHeadListeners), so this is the only call that gives them.
    if (probing) return Reflect.apply(originalWriteHead, this, [statusCode, ...rest]) as ServerResponse;
    // end() is storing the answer: a writeHead now (an error handler's) would send its status
    // and headers ahead of the stored answer's bytes. Ignored, as the end() after it is.
    if (mode === 'ending' && !delivering && !this.headersSent) return this;
    // A stream held for its commit (transactional): to everyone else its head went out with its
    // first write, as Node sends it, so a head with headers now is refused as Node refuses it
    // (an error handler's, after a throw).
    if (held !== undefined && !delivering && head !== undefined) {
      if (rest.some((a) => typeof a === 'object' && a !== null)) throw headersSentError();
      // The implicit head (Node's, or compression()'s at its first write or end, after it set its
      // encoding headers; it calls writeHead(this.statusCode) whatever that is by then): written
      // with the stream's own status, as Node sent it with the first write.
      this.statusCode = head.status;
      this.statusMessage = head.message;
      const length = head.headers['content-length'];
      const now = this.getHeader('content-length');
      // A status or a length set since the stream started is another answer's (an error
      // handler's, after a throw); a length that is gone was removed by compression() for its gzip.
      if (statusCode !== head.status) overwritten = true;
      if (now !== undefined && now !== length) {
        overwritten = true;
        if (length === undefined) this.removeHeader('content-length');
        else this.setHeader('content-length', length);
      }
      const written = Reflect.apply(originalWriteHead, this, [head.status]) as ServerResponse;
      head = { status: this.statusCode, message: this.statusMessage, headers: this.getHeaders() };
      return written;
    }
    // Node refuses a bad status before it touches a header: so do we (below we set headers first).
    const code = statusCode | 0;
    if (code < 100 || code > 999) return Reflect.apply(originalWriteHead, this, [statusCode, ...rest]) as ServerResponse;
    const reason = typeof rest[0] === 'string' ? rest[0] : undefined;
    // As Node reads them: a reason that is not a string (undefined, null) leaves the headers second.
    const headers = (reason === undefined ? (rest[1] ?? rest[0]) : rest[1]) as OutgoingHttpHeaders | OutgoingHttpHeader[] | undefined;
    if (headers !== undefined && headers !== null && !this.headersSent) applyHeaders(this, headers);
    if (mode === 'buffering' && !this.headersSent) {
      headGiven = snapshotHeaders(this.getHeaders());
      headImplicit = implicit;
    }
    const written = (reason === undefined ? Reflect.apply(originalWriteHead, this, [statusCode]) : Reflect.apply(originalWriteHead, this, [statusCode, reason])) as ServerResponse;
    headStatus = this.statusCode;
    // Nothing of the answer is on the wire while only writeHead() ran (Node sends the head with
    // the first write or end), unless a middleware mounted later wrapped write or end:
    // compression() writes the head at its end() and the body a tick later, through our write.
    // (Node's own end() and write() call writeHead too, once the mode has moved on.)
    if (mode === 'buffering') headOnly.set(this, () => mode === 'buffering' && this.write === ours.write && this.end === ours.end);
    return written;
  } as ServerResponse['writeHead'];

  res.flushHeaders = function flushHeaders(this: ServerResponse): void {
    if (cutAfterFreedHead(this, [])) return;
    if (mode === 'ending' && !delivering) return;
    // Node refuses the head itself: it throws to the caller before anything counts as sent.
    if (mode === 'buffering' && refusedHead(this)) return void originalFlushHeaders.call(this);
    startStreaming();
    if (replaced) return;
    if (held) held.push({ run: () => originalFlushHeaders.call(this) });
    else originalFlushHeaders.call(this);
  };

  res.write = function write(this: ServerResponse, ...args: unknown[]): boolean {
    if (cutAfterFreedHead(this, args)) return false;
    // While end() stores the answer, a write (an error handler's) would go out ahead of it. It is
    // a write after end(), so it fails as Node fails one: false, and the callback gets the error.
    if (mode === 'ending' && !delivering) {
      const callback = args.findLast((a) => typeof a === 'function') as Callback | undefined;
      if (callback) process.nextTick(callback, writeAfterEnd());
      return false;
    }
    // A chunk Node refuses (not a string or bytes), or a status it refuses at the head it writes
    // first: Node throws to the caller, before the answer counts as streamed (else the error
    // handler's answer after the throw went out with no head, and the key stayed on 410).
    if (mode === 'buffering' && (!isChunk(args[0]) || refusedHead(this))) return Reflect.apply(originalWrite, this, args) as boolean;
    // Node drops every write of a 204 or 304: it writes the head (through our writeHead, as a
    // handler's writeHead() does) and calls back. Nothing streams: end() stores the answer as it
    // goes out (empty), as Koa and Fastify do, not a 410; a throw after it is a throw after writeHead().
    // Not in transactional mode: that head would go out before the commit, and a rollback could
    // then only cut the connection; held as a stream, the rollback's 503 goes out instead.
    const bodiless = !transactional && (statusOut(this) === 204 || statusOut(this) === 304);
    if (mode === 'buffering' && bodiless && (!this.headersSent || headOnly.get(this)?.() === true)) return Reflect.apply(originalWrite, this, args) as boolean;
    startStreaming();
    if (held || replaced) {
      const callback = args.findLast((a) => typeof a === 'function') as Callback | undefined;
      if (replaced) {
        // Dropped; true, so a write-until-false loop runs to its end instead of waiting for good.
        if (callback) process.nextTick(callback, rolledBack());
        return true;
      }
      const chunk = args[0];
      // Node refuses a chunk that is not a string or bytes at once, before any head: let it.
      if (typeof chunk !== 'string' && !(chunk instanceof Uint8Array)) return Reflect.apply(originalWrite, this, args) as boolean;
      // Held for the one round trip the commit takes.
      held?.push({ run: () => Reflect.apply(originalWrite, this, args) as boolean, write: true, callback });
      heldBytes += typeof chunk === 'string' ? Buffer.byteLength(chunk) : chunk.byteLength;
      if (heldBytes < this.writableHighWaterMark) return true;
      owesDrain = true;
      return false;
    }
    return Reflect.apply(originalWrite, this, args) as boolean;
  } as ServerResponse['write'];

  res.end = function end(this: ServerResponse, ...args: unknown[]): ServerResponse {
    if (cutAfterFreedHead(this, args)) return this;
    // A second end() while we persist would cut the response short: ignore it, as Node ignores an
    // end after end (whose callback Node calls once the first end has finished).
    if (mode === 'ending') {
      // Finished already: Node's own end() answers (its callback gets ERR_STREAM_ALREADY_FINISHED).
      if (this.writableFinished) return Reflect.apply(originalEnd, this, args) as ServerResponse;
      const { callback } = parseEndArgs(args);
      if (callback) this.once('finish', () => callback());
      return this;
    }
    // Called later, from a promise: Node's own throw there (`res.end(42)` after a write) would be
    // an unhandled rejection that ends the process, so the response is destroyed with it instead.
    const finish = (): void => {
      try {
        Reflect.apply(originalEnd, this, args);
      } catch (error) {
        this.destroy(error instanceof Error ? error : new Error(String(error)));
      }
    };
    if (mode === 'streaming') {
      mode = 'ending';
      if (replaced || held) {
        const { callback } = parseEndArgs(args);
        // After the held writes; a rolled-back stream was answered already, and this end's
        // callback learns that its answer did not go out.
        // Ended with a status or a length of its own: another answer over the stream (an error
        // handler's, after a throw), never sent as the stream's end (see `overwritten`).
        if (held && head !== undefined && (statusOut(this) !== head.status || this.getHeader('content-length') !== head.headers['content-length'])) overwritten = true;
        if (held && !overwritten) held.push({ run: finish, callback });
        else if (callback) process.nextTick(callback, rolledBack());
        return this;
      }
      void settling.then(finish, finish);
      return this;
    }
    // A status Node refuses (`res.statusCode = err.statusCode` that was undefined, or 1000): its
    // end() throws to the caller at once, as without idemkit, so Express answers 500; storing it
    // and throwing later, from a promise, would end the process.
    if (refusedHead(this)) return Reflect.apply(originalEnd, this, args) as ServerResponse;
    mode = 'ending';
    const { chunk, encoding, callback } = parseEndArgs(args);
    let body: Buffer;
    try {
      body = toBuffer(chunk, encoding);
    } catch (error) {
      mode = 'buffering';
      throw error;
    }
    // Cookies that middleware sets as the head is written (express-session's and cookie-session's,
    // through on-headers) came only after the answer was stored, so a replay lacked them: a
    // retried login got its 201 and no session. Their listeners run now, the head unwritten, and
    // the cookies they set are stored; their other headers (compression's) are per delivery, as
    // before. A listener's throw reaches the caller of end(), as Node's own writeHead passes it on.
    // Not in transactional mode: a rollback replaces the answer with the 503, which the listeners
    // must see as they see any answer (compression() run for the handler's answer gzipped the
    // 503's bytes under headers that did not say so, and the client got a broken answer).
    // Written with writeHead() before end(), the head met its listeners then: compression() had
    // set Content-Encoding for the gzip it makes of these bytes, and a replay (bytes stored as
    // given, its own compression() seeing them "already encoded") sent them raw under that header.
    let listened = this.headersSent ? headGiven : undefined;
    let probed = false;
    if (!transactional && !this.headersSent && (this.writeHead !== ours.writeHead || originalWriteHead !== nodeWriteHead)) {
      listened = snapshotHeaders(this.getHeaders());
      probing = true;
      try {
        runHeadListeners(this, body.byteLength);
        probed = true;
      } catch (error) {
        mode = 'buffering';
        throw error;
      } finally {
        probing = false;
      }
    }
    answered();
    const sentHeaders = this.getHeaders();
    const sentMessage = this.statusMessage;
    const storedFrom = listened === undefined ? sentHeaders : { ...listened, 'set-cookie': sentHeaders['set-cookie'] };
    // After writeHead(201) a status set later goes nowhere (the head holds 201): the head's is stored.
    const status = statusOut(this);
    // Stored as it goes out: a 204 or 304 without the bytes given to end() (Node writes none), as
    // on Koa and Fastify, so a large one is no 410 `too-large`. A HEAD that send() ended without its
    // body: that body, if it is the one the length counts (the client still gets none).
    const length = this.getHeader('content-length');
    const stored =
      status === 204 || status === 304
        ? Buffer.alloc(0)
        : headBody !== undefined && body.byteLength === 0 && length !== undefined && Number(length) === headBody.byteLength
          ? headBody
          : body;
    // Its Content-Length too, when it went out with no body: a 204's or 304's (Node sends one the
    // handler set), or a HEAD's (redirect() and sendFile() set the length of a body they never
    // give end()): a replay recomputing it from the empty stored body said none, or `0`.
    const lengthAsSent = status === 204 || status === 304 || expressRes.req?.method === 'HEAD';
    const response = { status, headers: toStoredHeaders(storedFrom, before, lengthAsSent), body: stored };
    const deliver = (): void => {
      delivering = true;
      // While the record is stored, `headersSent` is still false, so an error handler running
      // meanwhile (the handler threw after res.json()) may set a 500 and its own headers, and its
      // own end() is ignored. The client must get the answer that was stored: put it back.
      if (!this.headersSent && changedSince(this, response.status, sentMessage, sentHeaders)) {
        restore(this, response.status, sentMessage, sentHeaders);
      }
      const replacement = lease.replacement;
      // Transactional mode, rolled back: the handler's answer describes writes that never happened.
      if (replacement && this.headersSent) {
        // Its head was written with res.writeHead() before end(): no other status can follow it.
        // Nothing of it is on the wire yet (Node sends the head with the body), so cut the
        // connection rather than answer 2xx for writes that were rolled back; the client retries.
        this.destroy();
        if (callback) process.nextTick(callback, Object.assign(new Error('The response was destroyed: its transaction rolled back.'), { code: 'ERR_STREAM_DESTROYED' }));
        return;
      }
      if (replacement) {
        sendReplacement(this, replacement, before, originalEnd, callback);
        return;
      }
      const endArgs: unknown[] = body.byteLength > 0 ? [body] : [];
      if (callback) endArgs.push(callback);
      if (probed && !this.headersSent) skipHeadListeners(this);
      Reflect.apply(originalEnd, this, endArgs);
    };
    // Persist first, then release the bytes: never fire and forget. An answer no route gave
    // (Express's own 404) is not stored: no handler ran, and the key is freed for the retry.
    const deliverOrDestroy = (): void => {
      try {
        deliver();
      } catch (error) {
        this.destroy(error instanceof Error ? error : new Error(String(error)));
      }
    };
    const settled = unrouted(this, body)
      ? lease.abandon('not-storable')
      : // connect-timeout's 503 answers for a handler that still runs (and may still charge):
        // freeing the key would let the retry run it again beside it, so it is never run again.
        timedOutAnswer(this, response.status, storable)
        ? lease.commitUnbuffered(null, 'cut-short')
        : lease.commit(response);
    void settled.then(deliverOrDestroy, deliverOrDestroy);
    return this;
  } as ServerResponse['end'];
  const target = res as ServerResponse & { _implicitHeader?: () => void };
  const originalImplicitHeader = target._implicitHeader;
  if (typeof originalImplicitHeader === 'function') {
    target._implicitHeader = function _implicitHeader(this: ServerResponse): void {
      implicit = true;
      try {
        originalImplicitHeader.call(this);
      } finally {
        implicit = false;
      }
    };
  }
  ours = { write: res.write, end: res.end, writeHead: res.writeHead };
}

const nodeWriteHead = ServerResponse.prototype.writeHead;

/**
 * Run the listeners wrapped around `res.writeHead` (on-headers: each runs once, at the first
 * call) without writing the head: Node's writeHead ends in `_storeHeader`, which is what builds
 * the head, so it does nothing for this one call. Node's own checks (the status, the reason
 * phrase) still throw as they would at the real head.
 *
 * `length`: the body's. compression() reads the length its end() notes before the head for a
 * body sent without Content-Length; run from here, before that end(), it saw none and gzipped a
 * body under its threshold. It gets the length as a header for the call, then that is undone.
 */
export function runHeadListeners(res: ServerResponse, length: number): void {
  const target = res as ServerResponse & { _storeHeader?: unknown; _removedContLen?: unknown };
  if (typeof target._storeHeader !== 'function') return;
  const lengthSet = res.getHeader('content-length') === undefined;
  const removedContLen = target._removedContLen;
  if (lengthSet) res.setHeader('content-length', length);
  target._storeHeader = () => undefined;
  try {
    res.writeHead(res.statusCode);
  } finally {
    delete target._storeHeader;
    // Still ours: removed again, and Node told it was never set (else it would not count the body itself).
    if (lengthSet && res.getHeader('content-length') === length) {
      res.removeHeader('content-length');
      target._removedContLen = removedContLen;
    }
  }
}

/**
 * After runHeadListeners: the head Node writes next goes past the wrappers around `res.writeHead`,
 * whose listeners ran already. on-headers' run once and then pass on; a wrapper that runs at
 * every call (a middleware's own `res.writeHead = ...`) ran a second time, and a header it
 * appends went out twice. The per-request wrappers are own properties; Node's is inherited.
 */
export function skipHeadListeners(res: ServerResponse): void {
  const wrapped = Object.getOwnPropertyDescriptor(res, 'writeHead');
  if (wrapped === undefined && res.writeHead === nodeWriteHead) return;
  // Node's own, not the inherited one: a wrapper on a prototype (`app.response.writeHead`, an
  // agent's on ServerResponse) ran early too, and a second run doubled what it appends.
  const base = nodeWriteHead;
  res.writeHead = function writeHead(this: ServerResponse, ...args: unknown[]): ServerResponse {
    if (wrapped === undefined) delete (this as Partial<ServerResponse>).writeHead;
    else Object.defineProperty(this, 'writeHead', wrapped);
    return Reflect.apply(base, this, args) as ServerResponse;
  } as ServerResponse['writeHead'];
}

/** Answers whose head the handler wrote with writeHead() while buffered (see onlyHeadWritten). */
const headOnly = processWide('headOnly', () => new WeakMap<ServerResponse, () => boolean>());

/**
 * Whether this answer's head was written with `res.writeHead()` and nothing else: not a byte
 * went out, and nothing but the handler (which threw) would write the rest.
 */
export function onlyHeadWritten(res: ServerResponse): boolean {
  return res.headersSent && (headOnly.get(res)?.() ?? false);
}

/** Answers whose key idempotencyErrorHandler() freed while only their head was written. */
const freedAtHead = processWide('freedAtHead', () => new WeakSet<ServerResponse>());

/**
 * The key of this head-only answer is freed (its handler threw): nothing more of it may go out.
 * An error handler mounted later that writes to it anyway (`res.end('error')`, which needs no
 * header) would complete the thrown handler's head, a 201 say, while a retry runs the operation
 * again: the connection is cut instead, as Express's final handler cuts it.
 */
export function cutIfAnsweredLater(res: ServerResponse): void {
  freedAtHead.add(res);
}

/**
 * Whether a write, end or flushHeaders on `res` must cut it (see cutIfAnsweredLater). Its
 * callback, if any, gets the error Node gives a write to a destroyed stream: an error handler
 * awaiting it must not wait for good.
 */
function cutAfterFreedHead(res: ServerResponse, args: readonly unknown[]): boolean {
  if (!freedAtHead.has(res)) return false;
  res.destroy();
  const callback = args.findLast((a) => typeof a === 'function') as Callback | undefined;
  if (callback) process.nextTick(callback, Object.assign(new Error('Cannot call write after a stream was destroyed'), { code: 'ERR_STREAM_DESTROYED' }));
  return true;
}

/** Answers idempotencyErrorHandler() saw connect-timeout's own error for (see timedOutAnswer). */
const timeoutAnswers = processWide('timeoutAnswers', () => new WeakSet<ServerResponse>());

export function markTimeoutAnswer(res: ServerResponse): void {
  timeoutAnswers.add(res);
}

/**
 * Whether this answer is connect-timeout's, given for a handler that still runs. Known when its
 * error went through idempotencyErrorHandler(): whatever the error handlers answer for it (a 503,
 * or a 202 "still processing") is not the handler's. Else: with `respond: false` (no listener for
 * its 'timeout' on the request) every answer is the handler's own; with `respond: true` a
 * non-storable one after the deadline is taken for the timeout's.
 */
function timedOutAnswer(res: ServerResponse, status: number, storable: (status: number) => boolean): boolean {
  if (timeoutAnswers.has(res)) return true;
  const req = (res as ServerResponse & { req?: { listenerCount?: (event: string) => number } }).req;
  return timedOut(res) && (req?.listenerCount?.('timeout') ?? 0) > 0 && !storable(status);
}

/** connect-timeout's mark (`req.timedout`): its deadline passed while the handler ran. */
export function timedOut(res: ServerResponse): boolean {
  return (res as ServerResponse & { req?: { timedout?: unknown } }).req?.timedout === true;
}

/** connect-timeout's own error (`respond: true`): not thrown by the handler, which still runs. */
export function isTimeoutError(err: unknown, res: ServerResponse): boolean {
  const e = err as { code?: unknown; timeout?: unknown } | null;
  return timedOut(res) && typeof e === 'object' && e !== null && e.code === 'ETIMEDOUT' && typeof e.timeout === 'number';
}

/**
 * A 404 or 405 no route gave: with no route matched (Express sets `req.route` when one did), a
 * catch-all middleware's not-found, streamed or not; or the page Express's final handler writes
 * when nothing answered ("Cannot POST /path", under `Content-Security-Policy: default-src
 * 'none'`), told by its body (`body`: the whole answer, when it was not streamed) also after a
 * route that only passed the request on, as `app.all('*', requireAuth)` does. Stored, it would
 * answer the key's retry for the whole TTL, even on an instance that has the route (a rolling
 * deploy) or at the corrected path (then 422). A route's own 404 ("no such order"), and the
 * final handler's page for a route's `next(err)`, are stored as any answer.
 */
function unrouted(res: ServerResponse, body?: Buffer): boolean {
  if (res.statusCode !== 404 && res.statusCode !== 405) return false;
  const req = res.req as { route?: unknown; method?: string } | undefined;
  if (req?.route === undefined) return true;
  return (
    body !== undefined &&
    res.getHeader('content-security-policy') === "default-src 'none'" &&
    body.includes(`<pre>Cannot ${req.method ?? ''} `)
  );
}

/**
 * A rolled-back transactional answer's stand-in (the 503), instead of the handler's own answer.
 * The headers of middleware mounted before idempotency (`before`) stay, as on a replay: without
 * CORS's, a browser's fetch could not read the 503 and its Retry-After.
 */
function sendReplacement(res: ServerResponse, replacement: StoredResponse, before: Readonly<Record<string, OutgoingHeaderValue>>, end: ServerResponse['end'], callback?: Callback): void {
  for (const name of res.getHeaderNames()) res.removeHeader(name);
  for (const [name, value] of Object.entries(before)) if (value !== undefined) res.setHeader(name, value);
  res.statusCode = replacement.status;
  // Not the handler's reason phrase (e.g. "Created") on the replacement's status.
  res.statusMessage = STATUS_CODES[replacement.status] ?? 'unknown';
  for (const [name, value] of responseHeaders(replacement)) res.setHeader(name, value);
  const bytes = Buffer.from(replacement.body.buffer, replacement.body.byteOffset, replacement.body.byteLength);
  Reflect.apply(end, res, callback ? [bytes, callback] : [bytes]);
}

/** Node's error for a head written after the first write. */
function headersSentError(): Error {
  return Object.assign(new Error('Cannot write headers after they are sent to the client'), { code: 'ERR_HTTP_HEADERS_SENT' });
}

/** What a write or end of a rolled-back streamed answer tells its callback. */
function rolledBack(): Error {
  return Object.assign(new Error('The response was replaced: its transaction rolled back.'), { code: 'ERR_STREAM_DESTROYED' });
}

/** Close the connection once what was written has gone out, leaving the answer unfinished. */
function cutAfterFlush(res: ServerResponse): void {
  const socket = res.socket;
  if (socket === null) return void res.destroy();
  // Node 24 keeps a response's writes on the response until the next tick: hand them to the
  // socket first, then end it (which sends them) and close.
  setImmediate(() => socket.end(() => socket.destroy()));
}
