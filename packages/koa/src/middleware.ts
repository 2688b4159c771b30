import {
  ConfigurationError,
  createIdempotencyEngine,
  requestCarriesBody,
  problemResponse,
  responseHeaders,
  snapshotHeaders,
  toStoredHeaders,
  isMultipart,
  mayHaveKey,
  optionalFunction,
  readsBody,
  unreadBodyKeyWarning,
  unreadBodyMayHoldKey,
  upperMethod,
  uploadedFileDigests,
  whenSocketCloses,
  type IdempotencyContext,
  type IdempotencyError,
  type IdempotencyOptions,
  type Lease,
  type ResolvedOptions,
} from '@idemkit/core';
import type { Socket } from 'node:net';
import type { Context, Middleware, Next } from 'koa';
import { captureResponse } from './capture.js';
import type { KoaIdempotencyOptions } from './options.js';
import { sendReplay, sendStored } from './send.js';

/** The methods whose bodies @koa/bodyparser and koa-body read unless told otherwise (`parsedMethods`). */
const PARSED_BY_DEFAULT: ReadonlySet<string> = new Set(['POST', 'PUT', 'PATCH']);

/**
 * What `idempotency()` puts on `ctx.state`. Koa's default state type has it already; an app with
 * a state type of its own adds it: `new Koa<AppState & IdempotencyState>()`.
 */
export interface IdempotencyState {
  /**
   * The running key (`key`, `tookOver`, `transaction`) while the handler runs under an
   * idempotency lease, `null` when the request is not covered.
   */
  idempotency?: IdempotencyContext | null;
}

declare module 'koa' {
  interface DefaultState {
    /** Set by `@idemkit/koa`: see {@link IdempotencyState}. */
    idempotency?: IdempotencyState['idempotency'];
  }
}

/**
 * Marks a context whose request already runs under a lease, so an app-wide and a per-route
 * `idempotency()` never claim the same key twice (the second would answer 409 to itself).
 * `Symbol.for` so the ESM and CJS builds agree.
 */
const RUNNING = Symbol.for('@idemkit/koa.running');

/**
 * Koa middleware that makes POST and PATCH safe to retry with an `Idempotency-Key` header.
 * Mount a body parser (e.g. `@koa/bodyparser`) before it: the fingerprint covers the parsed body.
 *
 * @example
 * ```ts
 * const app = new Koa();
 * app.use(bodyParser());
 * app.use(idempotency({ store: createPostgresStore({ pool }) }));
 * app.use(router.routes());
 * ```
 */
export function idempotency(options: KoaIdempotencyOptions): Middleware {
  // `app.use(idempotency)` (or a router's), the factory uncalled: Koa calls it with each request's
  // ctx, so every request failed with "Missing required option `store`", which says nothing of why.
  if (looksLikeContext(options)) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      '`idempotency` was passed to app.use() (or a router) without being called, so Koa called it with the request context. It is a factory: app.use(idempotency({ store })).',
    );
  }
  const onProblem = optionalFunction('onProblem', (options as Partial<KoaIdempotencyOptions> | undefined)?.onProblem);
  const engine = createIdempotencyEngine<Context>(engineOptions(options));
  const resolved = engine.options;
  const bodyMatters = readsBody(resolved);
  let warnedUnparsed = false;
  let warnedBodyKey = false;
  let warnedEncoded = false;
  const runOptions: RunOptions = {
    maxBodyBytes: resolved.maxBodyBytes,
    leaseMs: resolved.leaseMs,
    transactional: resolved.transactional,
    // A compressed stream body: most likely koa-compress mounted after idempotency(), which makes
    // every answer it compresses a stream, not stored, and its retries 410, with nothing in the
    // log to say why (as on Express). Looked at only for a body that is not stored anyway.
    warnEncoded(encoding) {
      if (warnedEncoded) return;
      warnedEncoded = true;
      resolved.logger?.warn(
        `[idemkit] [koa] An answer with Content-Encoding: ${encoding} went out as a stream body, so it is not stored and a retry with its key gets 410. ` +
          'If koa-compress (or other compression) is mounted after idempotency() (in a router, say), mount it before idempotency(): the stored and replayed bytes are then the uncompressed ones. (Warned once.)',
      );
    },
  };

  const answerProblem = async (ctx: Context, error: IdempotencyError): Promise<void> => {
    if (onProblem) {
      // An onProblem that only looks (logs, counts) and answers nothing would leave Koa's own
      // 404 Not Found as the answer to every 400/409/422/503: the problem goes out as it would
      // without one (as on Fastify). It answered if it set a body or a status (Koa marks a status
      // set on purpose, even the 404 it already had), turned Koa's respond() off, or wrote to ctx.res.
      const response = ctx.response as { _explicitStatus?: boolean };
      const before = { body: ctx.body, status: ctx.status, explicit: response._explicitStatus };
      await onProblem(ctx, error);
      const answered =
        ctx.res.headersSent || ctx.res.writableEnded || ctx.respond === false || ctx.body !== before.body || ctx.status !== before.status || response._explicitStatus !== before.explicit;
      if (answered) return;
    }
    const response = problemResponse(error);
    sendStored(ctx, response, responseHeaders(response));
  };

  return async function idempotencyMiddleware(ctx: Context, next: Next): Promise<void> {
    const running = (ctx as unknown as Record<symbol, unknown>)[RUNNING] === true;
    if (running) return next();
    ctx.state.idempotency = null;
    const method = upperMethod(ctx.method);
    if (!resolved.methods.has(method)) return next();

    const body = (ctx.request as { body?: unknown }).body;
    // A body no parser read: `undefined` (no parser, or koa-body for a type it skips), or the `{}`
    // @koa/bodyparser leaves for a type it skips. Fingerprinting either would make every body of
    // that type look alike, and a different request under the same key get the first one's answer.
    // Only a request that may have a key is fingerprinted (see core's mayHaveKey): one without
    // gets the SPEC's answer for that, a webhook reading its raw body itself included.
    // A chunked request that ended with no bytes (`Transfer-Encoding: chunked`, then `0`) carries
    // none either: its parser read it to the end and saw no 'data' (@koa/bodyparser makes `{}` of it).
    // On HTTP/2 a streamed body has no length header at all: see core's requestCarriesBody.
    const carriesBody = requestCarriesBody(ctx.req);
    const unread = body === undefined ? carriesBody : carriesBody && leftUnparsed(ctx, body);
    if (bodyMatters && unread && mayHaveKey(resolved, ctx.req.headers, undefined, carriesBody)) {
      // 415, not 500: koa-body leaves `undefined` for the types it does not parse (octet-stream,
      // XML, multipart unless enabled), so any client could cause 500s. Koa does not log an
      // exposed 4xx, so it is logged here, once: a server with no parser sees it at once.
      const error = Object.assign(
        new ConfigurationError(
          'ERR_IDEMKIT_BODY_NOT_PARSED',
          `ctx.request.body is ${body === undefined ? 'undefined' : '{}'} but the request has a body (content-type ${JSON.stringify(ctx.get('Content-Type'))}) that no body parser read, so idempotency() cannot fingerprint it. ` +
            (isMultipart(ctx.get('Content-Type')) ? 'For uploads, mount the multipart parser (koa-body with `multipart: true`, @koa/multer) before idempotency(). ' : '') +
            // @koa/bodyparser and koa-body read POST, PUT and PATCH bodies only, by default: a
            // DELETE covered through `methods` was told to enable a type that was enabled.
            (PARSED_BY_DEFAULT.has(ctx.method) ? '' : `Body parsers read only POST, PUT and PATCH bodies by default: add ${ctx.method} to @koa/bodyparser's \`parsedMethods\` (koa-body: \`parsedMethods\` too). `) +
            'To accept this type, mount a body parser that reads it (e.g. @koa/bodyparser with the type in `enableTypes`, koa-body with the type enabled, or the raw-body middleware of the @idemkit/koa README) before idempotency().',
        ),
        { status: 415, expose: true },
      );
      if (!warnedUnparsed) {
        warnedUnparsed = true;
        resolved.logger?.warn(`${error.message} (Answered 415; warned once.)`);
      }
      throw error;
    }
    // Keyless and passed through (required: false; a webhook reading its raw body): a key the
    // client put in this unread body is not seen, so say so once.
    if (!warnedBodyKey && unreadBodyMayHoldKey(resolved, ctx.req.headers, body, carriesBody)) {
      warnedBodyKey = true;
      resolved.logger?.warn(unreadBodyKeyWarning('koa', ctx.req.headers['content-type'], resolved.bodyField));
    }
    // Only a keyless request gets this far with a body no parser read (one with a key got the 415).
    if (!warnedUnparsed && resolved.fingerprint === 'default' && body !== undefined && unread) {
      warnedUnparsed = true;
      resolved.logger?.warn(
        `[idemkit] ctx.request.body is {} for a "${ctx.get('Content-Type')}" request body that the body parser did not parse, so the fingerprint cannot see it. Parse such bodies into a Buffer before idempotency() (see the @idemkit/koa README).`,
      );
    }

    // Joined repeated headers, not `headersDistinct` (a copy of every header per request): core
    // refuses a bare key with a comma, so two Idempotency-Key lines still get a 400.
    // Uploaded files koa-body keeps beside the body (`multipart: true`): their bytes are part of
    // the request, so the default fingerprint covers them. Nothing to await without files.
    // Hashed only for a request that may have a key: one without is never fingerprinted.
    // koa-body and @koa/multer's array forms set `files`, @koa/multer's single() sets `file`.
    const files =
      resolved.fingerprint === 'default' && isMultipart(ctx.req.headers['content-type']) && mayHaveKey(resolved, ctx.req.headers, body, carriesBody)
        ? await uploadedFileDigests(uploadedBy(ctx))
        : undefined;
    // A request that carries no bytes has no body, whatever the parser made of it (@koa/bodyparser
    // makes `{}`): as on Express and Fastify, so a retry through another binding on the same store
    // is the same request, not a 422.
    const decision = await engine.decide({ method, path: ctx.originalUrl, headers: ctx.req.headers, body: carriesBody ? body : undefined, files }, ctx);
    switch (decision.kind) {
      case 'pass':
        return next();
      case 'replay':
        return sendReplay(ctx, decision.response);
      case 'problem':
        return answerProblem(ctx, decision.error);
      case 'run':
        // Answered while the key was being claimed (a slow store) or, with `concurrency: 'wait'`,
        // while it waited its turn: a timeout middleware mounted before this one sent its 503. The
        // handler must not run behind an answer already sent, so the key just claimed is given back
        // at once for the client's retry, not marked cut short for good (as Fastify does).
        if (ctx.res.headersSent || ctx.res.writableEnded) {
          await decision.lease.abandon('client-gone');
          return;
        }
        return run(ctx, next, decision.lease, runOptions);
    }
  };
}

/** What run() needs of its middleware: made once per `idempotency()`, not per request. */
interface RunOptions extends Pick<ResolvedOptions, 'maxBodyBytes' | 'leaseMs' | 'transactional'> {
  warnEncoded(encoding: string): void;
}

async function run(ctx: Context, next: Next, lease: Lease, options: RunOptions): Promise<void> {
  (ctx as unknown as Record<symbol, unknown>)[RUNNING] = true;
  ctx.state.idempotency = lease.context;
  // A handler that finishes after its client left (or after a timeout middleware answered for
  // it) is judged as usual once it does. One that has not finished a lease later (hung on a call
  // that never returns: what timeouts are for) would otherwise have its lease renewed for the
  // life of the process, and every retry answered 409: the key is then marked `cut-short` (410,
  // never run again), as on Express and Fastify. In transactional mode the lease runs out
  // instead: its transaction is rolled back (a marker would commit the writes of a handler still
  // running) and the key freed. Only a request whose client left, or that was answered (for it,
  // or raw by the handler itself) while the handler still ran,
  // pays for the timer.
  let clientGone = false;
  // An answer Koa sent while the handler ran (not one the handler wrote itself through ctx.res):
  // a timeout middleware mounted before this one answered for it.
  let answeredForIt = false;
  // Started at most once; `null`: in transactional mode, where the lease is left to run out.
  let cutShort: NodeJS.Timeout | null | undefined;
  // Closed before the answer ended: the client left. (`writableEnded`, not `writableFinished`:
  // Node's HTTP/2 compat response calls a cancelled stream finished.)
  const onClose = (): void => {
    if (ctx.res.writableEnded || clientGone) return;
    clientGone = true;
    if (cutShort === undefined) cutShort = markLater(ctx, lease, options, false);
  };
  // Only an answer that was ended: Node's HTTP/2 compat response also emits 'finish' (before
  // 'close') for a stream its client cancelled, with nothing written. Taken for a timeout's
  // answer, the handler's own answer, finished a moment later, was thrown away (410 cut-short)
  // where HTTP/1.1 stores it for the retry; 'close' then tells the client left.
  const onFinish = (): void => {
    if (!ctx.res.writableEnded) return;
    answeredForIt = ctx.respond !== false;
    // Either way the handler still runs: a timeout's answer, or its own raw answer
    // (`ctx.respond = false`) with work after it. Should it never return, a lease later the key is
    // settled by what went out (raw) or marked cut short (a timeout's), not held for good. Not a
    // raw answer in transactional mode: its client has the handler's own success in hand, and a
    // lapse would roll back the writes it reports (the transaction commits when the handler returns).
    if (cutShort === undefined && (answeredForIt || !options.transactional)) cutShort = markLater(ctx, lease, options, answeredForIt);
  };
  // Closed already (the client left while the key was being claimed): 'close' will not come again.
  if (responseClosed(ctx.res)) onClose();
  else ctx.res.once('close', onClose);
  // Pipelined behind another answer on its connection (no socket yet): should the socket die
  // first, Node never closes this response, and a hung handler would hold its key for good. The
  // socket's close stands in (as in settleWhenClosed); only such requests pay for it.
  const socket = ctx.req.socket as Socket | null;
  const stopWatchingSocket = ctx.res.socket === null && socket ? whenSocketCloses(socket, onClose) : undefined;
  ctx.res.once('finish', onFinish);
  // Set by middleware before this one (CORS, a request id): not stored unless the handler changes them.
  const before = snapshotHeaders(ctx.response.headers);
  try {
    await next();
  } catch (error) {
    // A whole answer of the handler's own already went out through ctx.res before the throw: the
    // operation answered, so it is never run again (as for any answer the binding cannot store).
    // Anything less, or a timeout's answer, frees the key.
    if (ctx.res.writableEnded && !answeredForIt) await lease.commitUnbuffered(ctx.res.statusCode, 'not-bufferable');
    else await lease.abandon(clientGone ? 'client-gone' : 'handler-threw');
    throw error; // Koa's ctx.onerror (or an outer error middleware) renders it unchanged.
  } finally {
    ctx.res.off('close', onClose);
    ctx.res.off('finish', onFinish);
    stopWatchingSocket?.();
    if (cutShort) clearTimeout(cutShort);
  }

  // A whole answer went out while the handler ran (a timeout middleware mounted before this
  // one). The handler has finished, but what it answered cannot be told (Koa ignores a status
  // set after the head went out), so the key is marked cut short: never run a second time.
  if (answeredForIt || (ctx.respond !== false && ctx.res.writableEnded)) {
    await lease.commitUnbuffered(null, 'cut-short');
    return;
  }

  // The handler answers through ctx.res itself (`ctx.respond = false`, a proxy), possibly after
  // it returned: judge that answer by what went out, once it has. Before that, `ctx.status`
  // is Koa's default 404, not the answer.
  if (ctx.respond === false && !ctx.res.writableFinished) {
    settleWhenClosed(ctx, lease);
    return;
  }

  // No route answered: Koa's own 404 (nothing set a body), or @koa/router's allowedMethods() 405.
  // No handler ran, so nothing is stored and the key is freed: stored, that answer would meet the
  // key's retry for the whole TTL, even on an instance that has the route (a rolling deploy) or
  // for the corrected path (then 422). A route's own 404 ("no such order") is stored as any answer,
  // and so is a raw one (`ctx.respond = false`, a proxy's upstream 404): a handler ran and sent it,
  // as one whose raw answer ends after it returned (settleWhenClosed), which is never run again.
  if ((ctx.status === 404 || ctx.status === 405) && ctx.respond !== false && (ctx as { _matchedRoute?: unknown })._matchedRoute === undefined) {
    await lease.abandon('not-storable');
    return;
  }

  try {
    const captured = captureResponse(ctx);
    // Koa answers 500 for it (see captureResponse): the finally below frees the key.
    if (captured.kind === 'unsendable') return;
    if (captured.kind === 'unbuffered') {
      // Koa 3's get() of an unset header is undefined, Koa 2's is '': a plain stream (a download)
      // must not be warned about, nor use up the one warning meant for a compressor mounted after us.
      const encoding = ctx.respond === false || ctx.res.headersSent ? undefined : ctx.response.get('Content-Encoding');
      if (typeof encoding === 'string' && encoding !== '') options.warnEncoded(encoding);
      await lease.commitUnbuffered(ctx.status, 'not-bufferable');
    }
    // Stored before respond() writes a byte, so a client retrying at once gets the replay.
    else if (captured.body.byteLength > options.maxBodyBytes) await lease.commitUnbuffered(ctx.status, 'too-large');
    // A HEAD's Content-Length is stored as it went out: it counts a body that was never sent
    // (see captureHead), and is replayed as it is to a HEAD.
    else await lease.commit({ status: ctx.status, headers: toStoredHeaders(ctx.response.headers, before, ctx.method === 'HEAD'), body: captured.body });
    // Transactional mode, rolled back: the handler's answer (a stream's too) describes writes that
    // never happened. A replaced stream is destroyed by Koa once the response finishes.
    const replacement = lease.replacement;
    if (replacement) {
      // A head the handler already wrote cannot take another status: cut the answer instead.
      if (ctx.res.headersSent) ctx.res.destroy();
      else {
        for (const name of Object.keys(ctx.response.headers)) ctx.remove(name);
        // Those of middleware mounted before this one stay, as on a replay: without CORS's
        // (@koa/cors), a browser's fetch could not read the 503.
        for (const [name, value] of Object.entries(before)) if (value !== undefined) ctx.set(name, typeof value === 'number' ? String(value) : (value as string | string[]));
        sendStored(ctx, replacement, responseHeaders(replacement));
      }
    }
  } finally {
    // E.g. JSON.stringify threw on a BigInt, or made nothing of the body: Koa answers 500, and the
    // key must be free again.
    if (!lease.settled) await lease.abandon('handler-threw');
  }
}

/**
 * A lease from now, settle a lease whose handler is still running although its client left or
 * an answer went out for it (see run()): marked `cut-short`, or by the head the handler wrote
 * itself, never by the status of an answer sent for it (a timeout's 503 would free the key for a
 * second run). In transactional mode the lease is left to run out (rolled back, key freed): `null`.
 */
function markLater(ctx: Context, lease: Lease, options: RunOptions, answeredForIt: boolean): NodeJS.Timeout | null {
  if (options.transactional) {
    lease.letLapse();
    return null;
  }
  return setTimeout(() => {
    if (lease.settled) return;
    const { res } = ctx;
    void (!answeredForIt && res.headersSent ? lease.commitUnbuffered(res.statusCode, 'not-bufferable') : lease.commitUnbuffered(null, 'cut-short'));
  }, options.leaseMs).unref();
}

/**
 * Settle the lease of a raw answer when its response closes, by the status it sent: never run
 * again (stored as not replayable), or released if that status is not storable. Also when the
 * response was cut short (the client left): the handler may still be working (a proxy waiting
 * on its upstream), and freeing the key would let the client's retry run it a second time. Not
 * awaited, so the middleware chain does not wait for a long answer (a proxied download, say).
 */
function settleWhenClosed(ctx: Context, lease: Lease): void {
  const { res } = ctx;
  let settled = false;
  const settle = (): void => {
    if (settled) return;
    settled = true;
    // Nothing went out: res.statusCode is only Koa's placeholder 404, so no status is recorded.
    void (res.headersSent ? lease.commitUnbuffered(res.statusCode, 'not-bufferable') : lease.commitUnbuffered(null, 'cut-short'));
  };
  // Closed already (the client left while the handler ran): 'close' will not come again.
  if (responseClosed(res)) return settle();
  res.once('close', settle);
  // Pipelined behind another answer on its connection (it has no socket yet): should the socket
  // die first, Node never closes this response, and the lease would be renewed (in transactional
  // mode, its transaction and connection held) for the life of the process. The socket's close
  // stands in, as on Express and Fastify.
  const socket = ctx.req.socket as Socket | null;
  if (res.socket === null && socket) res.once('finish', whenSocketCloses(socket, settle));
}

/** Whether the response has closed: Node's HTTP/2 compat response has no `closed`, its stream has. */
function responseClosed(res: Context['res']): boolean {
  const r = res as { closed?: boolean; stream?: { closed?: boolean } };
  return r.closed ?? r.stream?.closed === true;
}

/** A Koa context (what Koa passes to a middleware), not an options object. */
function looksLikeContext(options: unknown): boolean {
  if (typeof options !== 'object' || options === null) return false;
  const o = options as Partial<Record<'req' | 'res' | 'app' | 'request', unknown>>;
  return o.req !== undefined && o.res !== undefined && o.app !== undefined && o.request !== undefined;
}

/** Core options without the binding's own `onProblem` (the engine warns on unknown options). */
function engineOptions(options: KoaIdempotencyOptions): IdempotencyOptions<Context> {
  if (typeof options !== 'object' || options === null) return options;
  const { onProblem: _onProblem, ...rest } = options;
  return rest;
}

/** Where koa-body and @koa/multer leave uploads. */
function uploadedBy(ctx: Context): unknown {
  const request = ctx.request as { files?: unknown; file?: unknown };
  return request.files ?? request.file;
}

/**
 * `{}` that stands for a body no parser read, not one that parsed to `{}`: a parser that read the
 * body consumed the request stream to its end, one that skipped it left it unread. (The content
 * type cannot tell: @koa/bodyparser skips `application/merge-patch+json`, koa-body reads
 * `application/csp-report`.)
 */
function leftUnparsed(ctx: Context, body: unknown): boolean {
  return looksUnparsed(ctx, body) && !ctx.req.readableEnded;
}

/** @koa/bodyparser sets `{}` (and no rawBody) for content types it does not parse (of a request that carries a body). */
function looksUnparsed(ctx: Context, body: unknown): boolean {
  if (typeof body !== 'object' || body === null || Object.getPrototypeOf(body) !== Object.prototype) return false;
  if (Object.keys(body).length > 0) return false;
  return (ctx.request as { rawBody?: unknown }).rawBody === undefined;
}
