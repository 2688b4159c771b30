import {
  ConfigurationError,
  createIdempotencyEngine,
  isMultipart,
  mayHaveKey,
  optionalFunction,
  problemResponse,
  readsBody,
  requestCarriesBody,
  responseHeaders,
  snapshotHeaders,
  toStoredHeaders,
  unreadBodyKeyWarning,
  unreadBodyMayHoldKey,
  upperMethod,
  whenSocketCloses,
  type Decision,
  type IdempotencyContext,
  type IdempotencyEngine,
  type IncomingRequest,
  type Lease,
} from '@idemkit/core';
import type {
  FastifyInstance,
  FastifyPluginAsync,
  FastifyReply,
  FastifyRequest,
  RouteOptions,
} from 'fastify';
import fp from 'fastify-plugin';
import type { Socket } from 'node:net';
import { payloadBytes, payloadStatus, replayOf, restoreReplay, sendReplay, sendStored, storedReplay, type Replayed } from './capture.js';
import { mergeRouteOptions, type FastifyIdempotencyOptions, type RouteIdempotencyConfig } from './options.js';
import { watchAnswered, watchSends, whoSent, type LateSends } from './stand-in.js';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Per-route overrides of the plugin options, or `false` to leave this route alone. */
    idempotency?: RouteIdempotencyConfig;
  }
  interface FastifyRequest {
    /** The running key (and transaction client) while this request holds a lease, else null. */
    idempotency: IdempotencyContext | null;
  }
}

/** Per-request lease state; lives under a symbol so nothing else can settle our lease. */
interface LeaseState {
  readonly lease: Lease;
  /** Kept so the raw response's 'close' can tell a hijacked reply (sent, yet never through onSend). */
  readonly reply: FastifyReply;
  /** The handler (or a hook after ours) failed: its error reply must never be stored. */
  errored: boolean;
  /** The first answer through onSend, being stored; a later send waits for it (see onSend). */
  settling: Promise<unknown> | undefined;
  /** A second answer came through onSend while the first was stored (see onSend). */
  resent: boolean;
  /** The first answer was handed to Fastify and written: later ones are dropped (see onSend). */
  delivered: boolean;
  /** What the route handler returned (its promise, if async): looked at only once the response closed early. */
  handler: unknown;
  /** The route handler has been called. */
  ran: boolean;
  /** The response had closed before the handler ran (the client left during slower hooks). */
  closedEarly: boolean;
  /** Set once the client left with the handler at work: settles the key a lease later (see afterClientLeft). */
  cutShort: ReturnType<typeof setTimeout> | undefined;
  /** The reply's headers when the key was claimed (set by hooks before ours: CORS, a request id); see toStoredHeaders. */
  readonly before: ReturnType<typeof snapshotHeaders>;
}

const kState = Symbol('idemkit.fastify.state');
const kReplayed = Symbol('idemkit.fastify.replayed');
const kProblem = Symbol('idemkit.fastify.problem');

type StatefulRequest = FastifyRequest & { [kState]: LeaseState | null; [kReplayed]: Replayed | null; [kProblem]: Replayed | null };

function stateOf(request: FastifyRequest): LeaseState | null {
  return (request as StatefulRequest)[kState];
}

function toIncoming(request: FastifyRequest, body: unknown = request.body): IncomingRequest {
  return {
    method: upperMethod(request.method),
    path: request.url,
    // Node joins repeated header lines with ", ", and core refuses a bare key with a comma, so
    // two Idempotency-Key lines still get a 400. Not `headersDistinct`: building it copies every
    // header of every request (seen in `pnpm bench`'s profile).
    headers: request.headers,
    // As Fastify parsed it: never parse a second time.
    body,
  };
}

/** A part as `@fastify/multipart` attaches it with `attachFieldsToBody: true`. */
interface MultipartPart {
  readonly type: 'field' | 'file';
  readonly value?: unknown;
  readonly _buf?: unknown;
}

/** A part object of `attachFieldsToBody: true`, which refers back to the body it is in (never a client's JSON field). */
function isPart(value: unknown, body: object): value is MultipartPart {
  const part = value as { type?: unknown; fields?: unknown } | null;
  return typeof part === 'object' && part !== null && (part.type === 'field' || part.type === 'file') && part.fields === body;
}

/**
 * `attachFieldsToBody: true` gives each part as an object that refers back to the whole body
 * (`fields`), which no fingerprint can write: reduced to what `'keyValues'` gives (a field's
 * value, a file's bytes). A file whose bytes went elsewhere (an `onFile` handler) cannot be told
 * apart from another, so it is refused, as a file left for the handler is.
 */
function multipartValues(body: Record<string, unknown>): Record<string, unknown> {
  const one = (part: unknown): unknown => {
    if (!isPart(part, body)) return part;
    if (part.type === 'field') return part.value;
    if (part._buf instanceof Uint8Array) return part._buf;
    throw multipartNotParsed();
  };
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(body)) out[name] = Array.isArray(value) ? value.map(one) : one(value);
  return out;
}

type Done = (error?: Error | null) => void;
type SendDone = (error: Error | null, payload?: unknown) => void;

function multipartNotParsed(): ConfigurationError {
  return new ConfigurationError(
    'ERR_IDEMKIT_BODY_NOT_PARSED',
    'A multipart request reached idempotency without the bytes of its files (left for the handler to read, or taken by an onFile handler), so the fingerprint cannot see them. ' +
      "Register @fastify/multipart with `attachFieldsToBody: 'keyValues'` (or `true`), without an `onFile` handler that takes the bytes elsewhere, so the files are part of request.body; or give this route a `fingerprint` function.",
  );
}

/**
 * 415, not 500: a route whose content-type parser leaves the payload unread (`done(null)`, to
 * stream it in the handler) has bytes no fingerprint can see, so any two bodies under one key
 * would look alike, and the second would get the first one's answer. As the Express and Koa
 * bindings answer a body no parser read.
 */
function bodyNotParsed(contentType: string | undefined): ConfigurationError {
  const error = new ConfigurationError(
    'ERR_IDEMKIT_BODY_NOT_PARSED',
    `The request has a body (content-type ${JSON.stringify(contentType ?? '')}) that its content-type parser left unread (request.body is undefined), so idempotency cannot fingerprint it. ` +
      "Read it in the parser (addContentTypeParser(type, { parseAs: 'buffer' }, (request, body, done) => done(null, body))), or give this route a `fingerprint` function that does not need the body.",
  );
  return Object.assign(error, { statusCode: 415 });
}

/** A rejection as Fastify's `done` wants it (an Error). */
function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}

/**
 * Hand onSend's result on. A throw from `done` before anything went out (a Response body already
 * read, say) becomes that pass's error, as in Fastify's runner for a promise hook; never an
 * unhandled rejection.
 */
function deliver(reply: FastifyReply, done: SendDone, payload: unknown, error?: unknown): boolean {
  try {
    if (error === undefined) done(null, payload);
    else done(asError(error));
    return error === undefined;
  } catch (thrown) {
    if (!reply.raw.headersSent) done(asError(thrown));
    else reply.log.warn({ err: thrown }, '[idemkit] An answer could not be written: the response had already gone out.');
    return false;
  }
}

/**
 * The hooks a covered route gets; built once per engine, shared by every route using it.
 * Callback-style, not async: a hook with nothing to do (a replay's onSend, every onResponse)
 * then calls `done` at once instead of costing a promise and a microtask hop per request.
 */
function routeHooks(engine: IdempotencyEngine<FastifyRequest>, options: FastifyIdempotencyOptions) {
  const { onProblem } = options;
  const fingerprintsBody = engine.options.fingerprint === 'default';
  const bodyMatters = readsBody(engine.options);
  /** Said once per engine each: a body left unread by its parser (answered 415), and a keyless one passed through. */
  let warnedUnparsed = false;
  let warnedBodyKey = false;

  function decided(request: FastifyRequest, reply: FastifyReply, decision: Decision, done: Done): void {
    switch (decision.kind) {
      case 'pass':
        return done();
      case 'replay': {
        // Answered here: Fastify expects `done` not to be called once a hook sends the reply.
        // Marked before send(): Fastify runs onSend hooks that call `done` at once (ours, and an
        // app's callback-style ones) inside send() itself, and ours must know it is a replay there.
        const replayed = storedReplay(decision.response);
        (request as StatefulRequest)[kReplayed] = replayed;
        sendReplay(reply, replayed);
        return;
      }
      case 'problem': {
        const sendProblem = (): void => {
          const answer = replayOf(problemResponse(decision.error));
          (request as StatefulRequest)[kProblem] = answer;
          sendStored(reply, answer);
        };
        if (onProblem) {
          // An onProblem that returned without answering would leave the request hanging: the
          // problem goes out as it would without one. Whether it answered is whether it called
          // send() (or hijacked the reply): see watchAnswered.
          const answered = watchAnswered(reply);
          Promise.resolve(onProblem(request, reply, decision.error)).then(
            () => {
              answered.stop();
              if (!answered.any && !reply.sent) sendProblem();
            },
            (error: unknown) => {
              answered.stop();
              done(asError(error));
            },
          );
          return;
        }
        sendProblem();
        return;
      }
      case 'run': {
        const state: LeaseState = {
          lease: decision.lease,
          reply,
          errored: false,
          settling: undefined,
          resent: false,
          delivered: false,
          handler: undefined,
          ran: false,
          closedEarly: false,
          cutShort: undefined,
          before: snapshotHeaders(reply.getHeaders()),
        };
        (request as StatefulRequest)[kState] = state;
        request.idempotency = decision.lease.context;
        // The last word on this lease, whatever happened: Fastify's hooks do not cover every
        // path (a hijacked reply gets no onSend, no onError when its handler throws, and no
        // onResponse if it never ends). Only requests that took a lease pay for the listener.
        // Closed already (the client left during slower hooks before ours): 'close' will not come
        // again, so the lease is looked at once the handler has run (see keepHandlerResult).
        if (reply.raw.closed) state.closedEarly = true;
        else {
          reply.raw.once('close', () => onRawClose(state));
          // Pipelined behind another answer on its connection (it has no socket yet): should the
          // socket die first, Node never closes this response, so the socket's close stands in.
          const socket = request.raw.socket as Socket | null;
          if (reply.raw.socket === null && socket !== null) reply.raw.once('finish', whenSocketCloses(socket, () => onRawClose(state)));
        }
        return done();
      }
    }
  }

  function preHandler(request: FastifyRequest, reply: FastifyReply, done: Done): void {
    // A request decides once, even if a route ended up carrying these hooks twice. A request that
    // failed validation, on a route with `attachValidation`, takes no lease either: its handler
    // answers the 400, and the corrected request with the same key must run.
    if (stateOf(request) !== null || request.validationError !== undefined) return done();
    // @fastify/multipart without `attachFieldsToBody` leaves the files for the handler to stream:
    // the fingerprint would see nothing, and a different upload under the same key would get the
    // first one's answer. Refused (a 500 that names the fix), never guessed.
    let body: unknown = request.body;
    // Without a key the request is not fingerprinted: it gets the SPEC's answer for no key instead
    // (an unread multipart body counts as empty here: a keyless one is told 400, not refused).
    if (fingerprintsBody && isMultipart(request.headers['content-type']) && mayHaveKey(engine.options, request.headers, body ?? {})) {
      if (body === undefined) return done(multipartNotParsed());
      if (typeof body === 'object' && body !== null) {
        try {
          body = multipartValues(body as Record<string, unknown>);
        } catch (error) {
          return done(asError(error));
        }
      }
    }
    // Any other body a content-type parser left unread (`done(null)`: the handler streams
    // `request.raw`): refused for a request that may have a key, never fingerprinted as empty.
    if (body === undefined && bodyMatters && !isMultipart(request.headers['content-type'])) {
      const carriesBody = requestCarriesBody(request.raw);
      if (carriesBody && mayHaveKey(engine.options, request.headers, undefined, carriesBody)) {
        const error = bodyNotParsed(request.headers['content-type']);
        if (!warnedUnparsed) {
          warnedUnparsed = true;
          engine.options.logger?.warn(`${error.message} (Answered 415; warned once.)`);
        }
        return done(error);
      }
      // Keyless and passed through (required: false; a webhook reading its raw body): a key the
      // client put in this unread body is not seen, so say so once.
      if (!warnedBodyKey && unreadBodyMayHoldKey(engine.options, request.headers, body, carriesBody)) {
        warnedBodyKey = true;
        engine.options.logger?.warn(unreadBodyKeyWarning('fastify', request.headers['content-type'], engine.options.bodyField));
      }
    }
    // A timeout (Fastify's `handlerTimeout`, a timer in an onRequest hook) may answer while the
    // key is claimed (a slow store) or, with `concurrency: 'wait'`, while it waits its turn.
    const answered = watchAnswered(reply);
    engine.decide(toIncoming(request, body), request).then(
      (decision) => {
        answered.stop();
        if (answered.any || reply.sent) return answeredMeanwhile(decision);
        try {
          decided(request, reply, decision, done);
        } catch (error) {
          done(asError(error));
        }
      },
      (error: unknown) => {
        answered.stop();
        if (!answered.any && !reply.sent) done(asError(error));
      },
    );
  }

  /**
   * Someone answered while the key was being decided. `done` is not called: Fastify would run the
   * handler behind that answer when it is still in async onSend hooks (`reply.sent` turns true
   * only once the response has ended), and its status would go out on the timeout's body, and
   * be stored with it. That answer goes out as it is (ours lets it through: no lease, no
   * replay), and a key just claimed is given back at once, so the client's retry runs the
   * operation: never held, nor marked, for a handler that never ran.
   */
  function answeredMeanwhile(decision: Decision): void {
    if (decision.kind === 'run') void decision.lease.abandon('client-gone');
  }

  // Runs after the payload is serialised and before a byte is written, so the record is stored
  // before the client can see the answer (and retry): a retry always finds a replay, never a 409.
  // `madeHead`: the HEAD route Fastify made from a GET (`exposeHeadRoutes`), whose own onSend hook
  // after ours sets the Content-Length it goes out with (see headLength); only `onSendMadeHead` says so.
  function onSend(request: FastifyRequest, reply: FastifyReply, payload: unknown, done: SendDone, madeHead = false): void {
    const state = stateOf(request);
    if (state === null) {
      const replayed = (request as StatefulRequest)[kReplayed];
      if (replayed === null) {
        // Our own 400/409/422/503, as app-level hooks left it: the route's hooks get its JSON as text.
        const problem = (request as StatefulRequest)[kProblem];
        if (problem === null || payload !== problem.payload) return done(null, payload);
        // A timeout that fired while an async app-level hook held this answer set its own status.
        if (reply.statusCode !== problem.response.status) reply.code(problem.response.status);
        return done(null, problem.serialised);
      }
      // An app-level onSend hook rewrote a replay. Those hooks ran on the original answer before
      // it was stored, so running them again would apply them twice (a prefix, an envelope):
      // the stored answer goes out as it was. So does one whose status a timeout changed while
      // an async app-level hook held it (Fastify's handlerTimeout is still armed after ours answered).
      if (payload !== replayed.payload || reply.statusCode !== replayed.response.status) restoreReplay(reply, replayed);
      // Fastify gave the replay's Buffer `application/octet-stream`; the answer went out without a type.
      if (replayed.untyped) reply.removeHeader('content-type');
      // The route's own hooks, which run after ours, get a JSON or text body as the string they
      // got on the first request (Fastify's serialised answer), not a Buffer.
      return done(null, replayed.serialised);
    }
    if (state.settling !== undefined) {
      // Sent again while the first answer is stored: an async handler that called reply.send()
      // without `return reply` (Fastify then sends its undefined result as well), sent twice, or
      // threw after sending (the error handler's answer). The first answer, the one stored,
      // goes out; this one is dropped, as Fastify drops a second answer once one went out.
      state.resent = true;
      const later = (): void => {
        // Delivered, yet nothing went out, after an error: a hook after ours failed on the first
        // answer, and this is Fastify's error reply for it; dropping it would hang the client.
        if (!state.delivered || (state.errored && !reply.raw.headersSent)) return void deliver(reply, done, payload);
        reply.log.warn(`[idemkit] A second answer was dropped: the first one went out. Did you forget to "return reply" in the "${request.url}" (${request.method}) route?`);
      };
      state.settling.then(later, later);
      return;
    }
    if (state.lease.settled) return done(null, payload);
    // An answer came: it settles the key, not the timer of a client that left.
    if (state.cutShort !== undefined) clearTimeout(state.cutShort);
    const settling = settle(state, reply, payload, madeHead);
    state.settling = settling;
    settling.then(
      (replaced) => void (state.delivered = deliver(reply, done, replaced)),
      (error: unknown) => void deliver(reply, done, undefined, error),
    );
  }

  /** Settle the lease by one answer: freed if it failed, else stored (or marked) as it allows. */
  function storeAnswer(
    state: LeaseState,
    failed: boolean,
    status: number,
    headers: ReturnType<FastifyReply['getHeaders']>,
    body: Uint8Array | undefined,
    lengthAsSent: boolean,
  ): Promise<unknown> {
    const { lease } = state;
    if (failed) return lease.abandon('handler-threw');
    if (body === undefined) return lease.commitUnbuffered(status, 'not-bufferable');
    if (body.byteLength > engine.options.maxBodyBytes) return lease.commitUnbuffered(status, 'too-large');
    // A 204's, 304's or HEAD's Content-Length is stored as it went out (see settle): no body gives it.
    return lease.commit({ status, headers: toStoredHeaders(headers, state.before, lengthAsSent), body });
  }

  async function settle(state: LeaseState, reply: FastifyReply, payload: unknown, madeHead: boolean): Promise<unknown> {
    const { lease, handler } = state;
    // As it stood when this answer came: a throw after it (send without return) must not turn it into an error.
    const errored = state.errored;
    const status = payloadStatus(payload, reply.statusCode);
    const code = reply.statusCode;
    // Ours alone: a `reply.header('set-cookie', …)` after send() pushes into the live array.
    const headers = detachedHeaders(reply.getHeaders());
    // A 204 goes out without the payload it was sent with (Fastify drops it, its content-type and
    // length too): stored as it went out, as on Express and Koa, so a large one is no 410
    // `too-large`. A 304 goes out without its payload too (Node writes none), but under the
    // Content-Length Fastify works out from it: stored with it, the replay works the same length
    // out again, through the same route hooks (@fastify/compress gzips it and sends that length).
    // One over maxBodyBytes, which made its retries a 410 `too-large`, is stored as it went out
    // from here instead: no body, and that Content-Length (a route hook's rewrite is not seen).
    const bytes = payloadBytes(payload);
    // Any payload but none at all (send(''), an empty Buffer, a stream it never reads): Fastify
    // drops its content-type then as well; only a 204 sent with no payload keeps a content-type
    // the handler set. (A Response brings headers Fastify adds after onSend: left as it was.)
    const dropped = status === 204 && payload !== undefined && payload !== null && (bytes !== undefined || isStream(payload));
    // A 304's stream Fastify pipes, but Node writes no body for a 304: it went out empty (as on
    // Express and Koa), not streamed, so the retry gets it and not a 410.
    const sized = status === 304 && bytes !== undefined && bytes.byteLength > engine.options.maxBodyBytes;
    const body = dropped || sized || (status === 304 && isStream(payload)) ? new Uint8Array(0) : bytes;
    // A HEAD goes out with no body, under the Content-Length Fastify gives it after this hook
    // (see headLength): stored as it went out, and replayed as it is to a HEAD (see restoreReplay).
    // Its payload's bytes are stored as well: a replay sends them through the same route hooks,
    // and a retry of another method its record answers (`fingerprint: false`) gets them.
    const head = reply.request.method === 'HEAD' && status >= 200 && status !== 204 && status !== 304 && bytes !== undefined;
    const stored = dropped
      ? { ...headers, 'content-type': undefined, 'content-length': undefined }
      : sized
        ? { ...headers, 'content-length': sentLength(headers['content-length'], bytes.byteLength, reply.request.method) }
        : head
          ? { ...headers, 'content-length': headLength(headers['content-length'], bytes, madeHead) }
          : headers;
    const lengthAsSent = head || status === 204 || status === 304;
    // Neither bytes nor a stream (an object sent with a content-type Fastify does not serialise,
    // a Response whose body was read): Fastify fails it with a 500, so the key is given back.
    const refused = body === undefined && !isSendable(payload);
    const failed = errored || refused;
    // An answer that gives the key back while the async handler had not settled: a timeout
    // (Fastify's `handlerTimeout`, a timer in a hook) may have answered for it while it works.
    if ((failed || !engine.options.storable(status)) && state.ran && handler !== reply && isThenable(handler)) {
      const sends = watchSends(reply, engine.options.storable, status);
      const sender = await whoSent(handler, reply, sends);
      if (sender !== 'running') sends.stop();
      if (sender === 'running') holdWhileRunning(state, handler, sends, () => storeAnswer(state, failed, status, stored, body, lengthAsSent));
      else if (sender === 'finished') await settleLate(lease, sends);
      if (sender !== 'own') {
        // The handler's own late answer (`reply.code(201).send(order)`) may have set its status
        // and headers meanwhile: this answer goes out as it came.
        if (sends.any) restoreAnswer(reply, status, headers);
        return payload;
      }
    }
    await storeAnswer(state, failed, status, stored, body, lengthAsSent);
    if (failed) return payload;
    // Transactional mode, rolled back: the handler's answer describes writes that never happened.
    const replacement = lease.replacement;
    if (replacement) {
      // The handler's stream never goes out: closed, as Fastify never reads it now (its file
      // descriptor, a cursor, stayed open, and 'close' never came).
      discardStream(payload);
      for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name);
      // Those of hooks that ran before the plugin stay, as on a replay: without CORS's
      // (@fastify/cors, an onRequest hook), a browser's fetch could not read the 503.
      for (const [name, value] of Object.entries(state.before)) if (value !== undefined) reply.header(name, value);
      reply.code(replacement.status);
      for (const [name, value] of responseHeaders(replacement)) reply.header(name, value);
      return Buffer.from(replacement.body.buffer, replacement.body.byteOffset, replacement.body.byteLength);
    }
    // A second answer (or the error handler's, after a throw), or a `reply.code()` /
    // `reply.header()` after send(), set its status and headers meanwhile: this answer goes out as
    // it was stored. (Plain Fastify has written it inside send() by then, so those calls change
    // nothing; here they would have reached the client, and differed from every replay.)
    if (state.resent || state.errored || reply.statusCode !== code || headersChanged(headers, reply.getHeaders())) restoreAnswer(reply, status, headers);
    return payload;
  }

  // The handler threw (or sent an Error): free the key so a retry may run. Fastify's error
  // handler then renders the error as usual, and its reply passes onSend with nothing to store.
  // Synchronous: Fastify counts an async onError as still running while it sends an async
  // handler's undefined result, and that send then throws (a crash). The key is given back
  // before the error's answer goes out: in onSend (settle), or when the response closes.
  function onError(request: FastifyRequest, _reply: FastifyReply, _error: Error, done: Done): void {
    const state = stateOf(request);
    if (state !== null) state.errored = true;
    done();
  }

  // The raw response closed (finished, or its connection went away) with the lease still open.
  // A reply still inside Fastify (not `sent`) keeps its lease even if the client left: the
  // handler's answer is stored in onSend, so the client's retry replays it instead of running
  // the operation a second time. A hijacked reply (`sent` from the start) never reaches onSend:
  // the handler answered past us, or is still at it (the client left while it waits on
  // something), or threw (Fastify only logs that). Which one cannot be told, so it is never run
  // again, as for a stream; a status that is not storable releases the key.
  function onRawClose(state: LeaseState): void {
    const { lease, reply } = state;
    // An answer went through onSend: settle() has the lease, and settles it.
    if (lease.settled || state.settling !== undefined) return;
    if (state.errored) return void lease.abandon('handler-threw');
    if (reply.sent && reply.raw.headersSent) {
      if (engine.options.transactional) return hijackedInTransaction(state);
      return void lease.commitUnbuffered(reply.raw.statusCode, 'not-bufferable');
    }
    // Closed before the handler ran (the client left during a slower hook after ours): what it
    // returns is looked at once it has (see keepHandlerResult).
    if (!state.ran) return void (state.closedEarly = true);
    if (!reply.sent) return afterClientLeft(state);
    hijackedUnanswered(state);
  }

  /**
   * The client left before the answer. The handler's answer is still stored when it comes
   * (onSend), so the retry replays it. But onSend may never come: Fastify sends nothing for an
   * async handler that resolves with nothing once its client is gone, and a handler hung on a call
   * that never returns never answers at all. Either way the lease would be renewed for the life of
   * the process, and every retry answered 409. So the handler gets a lease's time from the
   * client's leave to answer (one that returned `reply` may answer from a timer), and then the key
   * is marked `cut-short` (410, never run again), as on Express and Koa. In transactional mode the
   * lease runs out instead: its transaction is rolled back (a marker would commit the writes of a
   * handler still running) and the key freed. Looked at only here, so requests whose client
   * stays pay nothing for it. Any answer through onSend stops the timer. Fastify sends a value the
   * handler resolves with through onSend (however slow its hooks), so a value stops it too, unless
   * the reply was hijacked meanwhile (Fastify then sends nothing); a throw does not, as the error
   * handler may never answer (the timer then frees the key, as the throw's answer would).
   */
  function afterClientLeft(state: LeaseState): void {
    const { lease, handler, reply } = state;
    // A handler that returned a value that is no promise: Fastify sent it already (onSend).
    if (handler !== undefined && !isThenable(handler)) return;
    if (engine.options.transactional) return lease.letLapse();
    const cutShort = setTimeout(() => {
      if (lease.settled || state.settling !== undefined) return;
      if (state.errored) void lease.abandon('handler-threw');
      else void lease.commitUnbuffered(null, 'cut-short');
    }, engine.options.leaseMs).unref();
    state.cutShort = cutShort;
    // A callback-style handler (it returned nothing, and calls reply.send() from a callback) is
    // watched by the timer alone: its callback may never come either.
    if (handler === undefined) return;
    // `sent` with nothing through onSend: hijacked (before the handler ended, so whichever of
    // Fastify's `then` and this one runs first).
    const hijacked = (): boolean => reply.sent && state.settling === undefined;
    // Promise.resolve: never a thenable's own `then` (a returned `reply` calls back at once once
    // sent, whatever it is given).
    Promise.resolve(handler).then(
      (value) => void (value !== undefined && !hijacked() && clearTimeout(cutShort)),
      () => {
        if (lease.settled || state.settling !== undefined) return;
        // Fastify sends the throw on to the onError hooks, but app-wide ones run before ours and
        // may outlast the lease (an error reporter): the timer must then free the key, as the
        // throw's answer would, not mark it cut-short (410, the retry never runs). Known here.
        if (!reply.sent) return void (state.errored = true);
        // A hijacked reply's throw reaches no onError (Fastify only logs it): it frees the key
        // as any throw does, as for a reply hijacked before the client left.
        clearTimeout(cutShort);
        state.errored = true;
        void lease.abandon('handler-threw');
      },
    );
  }

  /**
   * A hijacked reply closed before its status went out: the handler threw before writing
   * (Fastify only logs that), which frees the key as any throw does; or it is still at it, or
   * answered nothing, which is never run again (`cut-short`). A rejection already there is seen
   * before the check after the close's turn; a handler still pending is not waited for.
   */
  function hijackedUnanswered(state: LeaseState): void {
    const { lease, handler } = state;
    if (engine.options.transactional) return hijackedInTransaction(state);
    if (isThenable(handler)) {
      Promise.resolve(handler).then(undefined, () => {
        state.errored = true;
        void lease.abandon('handler-threw');
      });
    }
    setImmediate(() => {
      // Nothing went out: the raw status is only Node's default 200, so no status is recorded.
      if (!lease.settled) void lease.commitUnbuffered(null, 'cut-short');
    });
  }

  /**
   * Transactional mode, a hijacked reply closed: a marker stored now would commit the transaction
   * while the handler may still be writing in it. So the key (and the transaction) is held until
   * the handler ends, for one lease at most: it threw, the writes are rolled back and the key
   * freed; it finished, its writes commit with the marker its raw answer calls for; the lease ran
   * out first, the transaction is rolled back and the key freed. A handler that is no promise
   * cannot be waited for: its answer, if one went out, settles the key at once, as without
   * transactions; if none did, its lease runs out, with the same rollback.
   */
  function hijackedInTransaction(state: LeaseState): void {
    const { lease, handler, reply } = state;
    const settleByRaw = (): void => {
      const raw = reply.raw;
      void (raw.headersSent ? lease.commitUnbuffered(raw.statusCode, 'not-bufferable') : lease.commitUnbuffered(null, 'cut-short'));
    };
    if (isThenable(handler)) {
      // Not for ever: a handler waiting on its gone client (a 'drain' that never comes) would
      // hold its connection and row locks, and the key, for the life of the process. If it has
      // not ended when the lease runs out, its transaction is rolled back and the key freed.
      lease.letLapse();
      Promise.resolve(handler).then(settleByRaw, () => {
        state.errored = true;
        void lease.abandon('handler-threw');
      });
    } else if (reply.raw.headersSent) settleByRaw();
    else lease.letLapse();
  }

  /**
   * The answer went out while the handler still runs; the key stays held, so a retry gets 409
   * instead of running the operation beside it. Once the handler ends: it threw, the key is freed;
   * it finished with an answer of its own, which could not go out, so the key is marked
   * `cut-short` (never run twice); it had nothing more to say (the answer was its own, sent before
   * it went on working), the key is settled as that answer would have settled it. Renewed
   * meanwhile, as for any handler still at work: one that ends after its lease would have run
   * out must not meet a second run of itself.
   */
  function holdWhileRunning(state: LeaseState, handler: PromiseLike<unknown>, sends: LateSends, store: () => Promise<unknown>): void {
    const { lease } = state;
    Promise.resolve(handler).then(
      (value) => {
        sends.stop();
        if (lease.settled) return;
        // Any send now is the handler's own (Fastify sends nothing for it once an answer went
        // out): a 204 or a redirect has no payload, yet it is an answer all the same.
        if (value !== undefined || sends.any) void settleLate(lease, sends);
        else void store();
      },
      () => {
        sends.stop();
        if (!lease.settled) void lease.abandon('handler-threw');
      },
    );
  }

  // Built once per engine, like the rest: the HEAD routes Fastify made from GET routes get it instead of onSend.
  const onSendMadeHead = (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: SendDone): void => onSend(request, reply, payload, done, true);
  return { preHandler, onSend, onError, onRawClose, onSendMadeHead };
}

/**
 * The handler answered after a timeout's answer went out, so its own could not: a failure (an
 * Error, a status that is not storable) frees the key as a throw does; anything else marks it
 * `cut-short`, so the operation is never run twice.
 */
function settleLate(lease: Lease, sends: LateSends): Promise<void> {
  return sends.failed ? lease.abandon('handler-threw') : lease.commitUnbuffered(null, 'cut-short');
}

type RouteHooks = ReturnType<typeof routeHooks>;
type HookName = Exclude<keyof RouteHooks, 'onRawClose' | 'onSendMadeHead'>;

/** Keep what the route handler returned on the lease's state (see afterClientLeft); nothing more per request. */
function keepHandlerResult(route: RouteOptions, onRawClose: RouteHooks['onRawClose']): void {
  const handler = route.handler;
  route.handler = function idempotentHandler(this: FastifyInstance, request, reply) {
    let result: unknown;
    try {
      result = handler.call(this, request, reply);
    } catch (error) {
      thrownAfterHijack(request, reply, onRawClose);
      throw error;
    }
    const state = stateOf(request);
    if (state !== null) {
      // A thenable that is not a native promise (a query builder that runs again on every
      // `then`, a Bluebird promise that calls back a turn later) is adopted once, here: Fastify
      // and the plugin then wait on the one native promise.
      if (result !== reply && isThenable(result) && !(result instanceof Promise)) result = Promise.resolve(result);
      state.handler = result;
      state.ran = true;
      if (state.closedEarly) onRawClose(state);
    }
    return result;
  };
}

/**
 * The handler threw at once, its reply hijacked (`sent`, nothing through onSend or out): Fastify only
 * logs that (no onError), so the throw is recorded here, and frees the key when the response
 * closes, or now if it closed already (the client left during slower hooks). Before, `ran` was
 * never set, so the close only marked the request closed early: the key was renewed for the life
 * of the process, 409 to every retry. A throw Fastify sends on is left to onError, as before.
 */
function thrownAfterHijack(request: FastifyRequest, reply: FastifyReply, onRawClose: RouteHooks['onRawClose']): void {
  const state = stateOf(request);
  // One whose raw answer went out first is settled by that answer when it closes, as an async one's.
  if (state === null || !reply.sent || state.settling !== undefined || reply.raw.headersSent) return;
  state.ran = true;
  state.errored = true;
  if (state.closedEarly) onRawClose(state);
}

/** Put an answer's status and headers back on the reply, after a later answer changed them. */
function restoreAnswer(reply: FastifyReply, status: number, headers: ReturnType<FastifyReply['getHeaders']>): void {
  for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name);
  reply.code(status);
  reply.headers(headers);
}

/**
 * `headers` (a `reply.getHeaders()`) with its arrays copied, so later `reply.header()` calls
 * cannot change it. Fastify builds a new object on every `getHeaders()` call (raw and reply
 * headers spread into one), so only the arrays are shared with the reply: copying them alone
 * spares every new-key request a second copy of the whole object (`snapshotHeaders`).
 */
function detachedHeaders(headers: ReturnType<FastifyReply['getHeaders']>): ReturnType<FastifyReply['getHeaders']> {
  const names = Object.keys(headers);
  for (let i = 0; i < names.length; i++) {
    const value = headers[names[i]!];
    if (Array.isArray(value)) headers[names[i]!] = [...(value as readonly string[])];
  }
  return headers;
}

/** Whether the reply's headers differ from `before` (a copy from `detachedHeaders`). */
function headersChanged(before: ReturnType<FastifyReply['getHeaders']>, now: ReturnType<FastifyReply['getHeaders']>): boolean {
  const names = Object.keys(now);
  if (names.length !== Object.keys(before).length) return true;
  for (const name of names) {
    const a = before[name];
    const b = now[name];
    if (a === b) continue;
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length || a.some((v, i) => v !== b[i])) return true;
  }
  return false;
}

/**
 * The Content-Length Fastify sends with a string or Buffer payload of `length` bytes (its
 * onSendEnd): the one set, if it counts those bytes (on a HEAD: any set), else their count.
 */
function sentLength<T>(given: T, length: number, method: string): T | string {
  return given && (method === 'HEAD' || Number(given) === length) ? given : String(length);
}

/**
 * The Content-Length a HEAD's bufferable answer is stored with. On a HEAD route of its own, the one
 * the handler set, whatever the payload (Fastify's onSendEnd keeps a HEAD's); with none, none:
 * Fastify gives the answer the length of the payload it ends with, after the route's own onSend
 * hooks (which run after ours and may rewrite it), and so does a replay that sets none (see
 * restoreReplay), through the same hooks. Storing this payload's length replayed `3` for an
 * answer a route hook made `5`. On the HEAD route Fastify made from a GET route, its own onSend
 * hook (head-route.js), which runs last, sets the payload's length over any the handler set
 * (`0` with none), on a replay as on the first answer.
 */
function headLength<T>(given: T, bytes: Uint8Array, madeHead: boolean): T | string | undefined {
  if (madeHead) return String(bytes.byteLength);
  // Fastify recomputes a falsy one (`0` as a number) as it does none.
  return given || undefined;
}

/**
 * Whether `route` is a HEAD route Fastify made from a GET route (`exposeHeadRoutes`): its onSend
 * hooks end with Fastify's own head-route hook (named so in Fastify 5.0 through 5.12, at least).
 */
function madeHeadRoute(route: RouteOptions, methods: readonly string[]): boolean {
  if (methods.length !== 1 || methods[0] !== 'HEAD') return false;
  const { onSend } = route as { onSend?: unknown };
  const last: unknown = Array.isArray(onSend) ? onSend[onSend.length - 1] : onSend;
  return typeof last === 'function' && last.name === 'headRouteOnSendHandler';
}

/** A Node stream or a web ReadableStream (not a Response). */
function isStream(payload: unknown): boolean {
  if (typeof payload !== 'object' || payload === null) return false;
  const p = payload as { pipe?: unknown; getReader?: unknown };
  return typeof p.pipe === 'function' || typeof p.getReader === 'function';
}

/** Close a stream payload that will not be sent: a Node stream destroyed, a web stream cancelled. */
function discardStream(payload: unknown): void {
  if (!isStream(payload)) return;
  const p = payload as { destroy?: () => void; cancel?: () => Promise<void> };
  if (typeof p.destroy === 'function') p.destroy();
  else if (typeof p.cancel === 'function') p.cancel().catch(() => undefined);
}

/** What Fastify sends as a stream: a Node or web stream, or a Response whose body is unread. */
function isSendable(payload: unknown): boolean {
  if (isStream(payload)) return true;
  return Object.prototype.toString.call(payload) === '[object Response]' && (payload as { bodyUsed?: unknown }).bodyUsed !== true;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof value === 'object' && value !== null && typeof (value as { then?: unknown }).then === 'function';
}

/**
 * Add our hook to the route's own (a function, an array, or nothing). After the others, except
 * `onSend`, which goes first: route-level `onSend` hooks rewrite the payload for one request
 * (`@fastify/compress` turns it into a gzip stream for a client that accepts gzip), so the answer
 * is stored before them and a replay goes through them again, for the retry's own request.
 */
function addHook(route: RouteOptions, name: HookName, hook: RouteHooks[HookName]): void {
  const slot = route as unknown as Record<HookName, unknown>;
  const existing = slot[name];
  const others: unknown[] = Array.isArray(existing) ? existing : typeof existing === 'function' ? [existing] : [];
  slot[name] = name === 'onSend' ? [hook, ...others] : [...others, hook];
}

function methodsOf(route: RouteOptions): string[] {
  const m = route.method;
  return (Array.isArray(m) ? m : [m]).map((x) => String(x).toUpperCase());
}

interface Attached {
  readonly engine: IdempotencyEngine<FastifyRequest>;
  readonly hooks: RouteHooks;
}

function withHooks(engine: IdempotencyEngine<FastifyRequest>, options: FastifyIdempotencyOptions): Attached {
  return { engine, hooks: routeHooks(engine, options) };
}

const plugin: FastifyPluginAsync<FastifyIdempotencyOptions> = async (fastify: FastifyInstance, options) => {
  // Built (and validated) now, so a bad option fails `register`, not the first request.
  const base = forEngine(options);
  // One engine, and one set of hooks, per distinct option set: the plugin's own, plus one per
  // `config.idempotency` object (routes sharing that object share the engine).
  const shared = withHooks(base, options);
  const perConfig = new WeakMap<object, Attached>();

  fastify.decorateRequest('idempotency', null);
  fastify.decorateRequest(kState, null);
  fastify.decorateRequest(kReplayed, null);
  fastify.decorateRequest(kProblem, null);

  // Every method and URL the onRoute hook below looked at, covered or not.
  const looked = new Map<string, Set<string>>();
  warnRoutesAddedBefore(fastify, base, looked);

  fastify.addHook('onRoute', (route) => {
    const config: unknown = route.config?.idempotency;
    const methods = methodsOf(route);
    // Also under the URL requests report (`path`, as first declared): an onRoute hook before ours
    // may have rewritten `url`.
    const urls = new Set([route.url, (route as { path?: unknown }).path]);
    for (const url of urls) {
      if (typeof url !== 'string') continue;
      const known = looked.get(url) ?? new Set<string>();
      for (const method of methods) known.add(method);
      looked.set(url, known);
    }
    const where = `${methods.join(',')} ${route.url}`;
    const merged = mergeRouteOptions(options, config, where);
    if (merged === null) return;

    let attached = shared;
    if (merged !== options) {
      // Validated here, so a bad override fails at startup even on a route it would not cover.
      const key = config as object;
      attached = perConfig.get(key) ?? withHooks(forRoute(merged, where), merged);
      perConfig.set(key, attached);
    }
    const covered = attached.engine.options.methods;
    if (!methods.some((m) => covered.has(m))) return;
    const { onRawClose, onSendMadeHead, ...hooks } = attached.hooks;
    // Before ours is added: its own onSend hooks, as Fastify made them, tell the route apart.
    if (madeHeadRoute(route, methods)) hooks.onSend = onSendMadeHead;
    for (const name of Object.keys(hooks) as HookName[]) addHook(route, name, hooks[name]);
    keepHandlerResult(route, onRawClose);
  });
};

/**
 * Routes added before the plugin loaded never reach its onRoute hook, and so run unprotected.
 * That is what `app.register(plugin)` without `await`, followed by `app.post(...)`, does: the
 * usual Fastify idiom, and a silent double charge. A context-wide onRequest hook does reach those
 * routes (Fastify adds a plugin's hooks to routes that came before it), so each such route is
 * named once in the log, on its first request with a method the plugin would cover.
 */
function warnRoutesAddedBefore(fastify: FastifyInstance, engine: IdempotencyEngine<FastifyRequest>, looked: Map<string, Set<string>>): void {
  const { methods, logger } = engine.options;
  if (logger === undefined) return;
  fastify.addHook('onRequest', (request, _reply, done) => {
    const { method } = request;
    const { url, config } = request.routeOptions;
    if (url !== undefined && methods.has(method) && looked.get(url)?.has(method) !== true && config.idempotency !== false) {
      const known = looked.get(url) ?? new Set<string>();
      known.add(method);
      looked.set(url, known);
      logger.warn(
        `[idemkit] ${method} ${url} has no idempotency: the route was added before @idemkit/fastify loaded, so retries of it run again. Register the plugin with \`await app.register(...)\` before your routes (or put them in a later \`register\`); to leave a route out on purpose, give it \`config: { idempotency: false }\`. (Warned once per route.)`,
      );
    }
    done();
  });
}

/** A route's own engine; a bad override names the route it is on (there may be hundreds). */
function forRoute(options: FastifyIdempotencyOptions, where: string): IdempotencyEngine<FastifyRequest> {
  try {
    return forEngine(options);
  } catch (error) {
    if (!(error instanceof ConfigurationError)) throw error;
    const reason = error.message.replace(/^\[idemkit\] /, '');
    throw new ConfigurationError(error.code as `ERR_IDEMKIT_${string}`, `Route ${where}: \`config.idempotency\`: ${reason}`);
  }
}

/** The core engine for one option set; binding-only extras are kept out of core's options. */
function forEngine(options: FastifyIdempotencyOptions): IdempotencyEngine<FastifyRequest> {
  const { onProblem, ...core } = options;
  // Checked here, with the rest: a wrong one would turn every problem answer into a 500.
  optionalFunction('onProblem', onProblem);
  return createIdempotencyEngine<FastifyRequest>(core);
}

/**
 * Idempotency-Key support for Fastify 5. Register it (with `await`) before the routes it should
 * cover: it attaches per route through `onRoute`, so routes declared earlier are left alone (and
 * named once in the log on their first request with a covered method).
 *
 * @example
 * await app.register(fastifyIdempotency, { store: createMemoryStore() });
 * app.post('/orders', async (request) => ({ id: randomUUID(), key: request.idempotency?.key }));
 */
export const fastifyIdempotency = fp(plugin, { name: '@idemkit/fastify', fastify: '5.x' });
