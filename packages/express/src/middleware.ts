import { ConfigurationError, createIdempotencyEngine, isMultipart, requestCarriesBody, mayHaveKey, readsBody, unreadBodyKeyWarning, unreadBodyMayHoldKey, upperMethod, uploadedFileDigests, type IdempotencyContext, type IncomingRequest, type Lease } from '@idemkit/core';
import type { ErrorRequestHandler, NextFunction, Request, RequestHandler, Response } from 'express';
import type { ServerResponse } from 'node:http';
import { captureResponse, cutIfAnsweredLater, isTimeoutError, markTimeoutAnswer, onlyHeadWritten, processWide, toDictionaryProperties } from './capture.js';
import { splitOptions, type ExpressIdempotencyOptions } from './options.js';
import { writeProblem, writeReplay } from './respond.js';

declare global {
  // Declaration merging with Express's own global namespace is how Express types request extras.
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Express {
    interface Request {
      /**
       * Set by `idempotency()`: the running key (and, in transactional mode, the transaction
       * client), or `null` when this request runs without idempotency (method not covered, no
       * key with `required: false`, store down with `onStoreError: 'pass'`).
       */
      idempotency?: IdempotencyContext | null;
    }
  }
}

/**
 * The lease of the `idempotency()` that claimed this request's key, so an inner one on the same
 * request (app-wide and per route) steps aside instead of answering 409 to itself. Only a claim
 * counts: an outer instance that let the request through (method not covered, no key with
 * `required: false`) leaves the inner one to decide, as in the Koa binding. Shared with the other
 * build of this package when both are loaded (see processWide).
 */
const claimed = processWide('claimed', () => new WeakMap<Request, Lease>());

/**
 * Whether `idempotencyErrorHandler()` was ever created in this process (shared through the
 * global symbol registry, so an ESM and a CJS copy of this package agree). Transactional mode
 * warns without it: see `warnNoErrorHandler`.
 */
const ERROR_HANDLER_CREATED = Symbol.for('idemkit.express.errorHandlerCreated');
const errorHandlerCreated = (): boolean => (globalThis as Record<symbol, unknown>)[ERROR_HANDLER_CREATED] === true;

/**
 * 415, not 500: a client sending a type no parser reads (text/plain to an express.json() app)
 * gets told so, while a server that mounted no parser at all sees it on its first request.
 */
function bodyNotParsed(contentType: string | undefined): ConfigurationError {
  const error = new ConfigurationError(
    'ERR_IDEMKIT_BODY_NOT_PARSED',
    `The request has a body (content-type ${JSON.stringify(contentType ?? '')}) that no body parser read, so idempotency() cannot fingerprint it. ` +
      (isMultipart(contentType)
        ? "For uploads, mount idempotency() after the multipart parser on the route: app.post('/path', upload.single('file'), idempotency(options), handler). "
        : '') +
      'To accept this type, mount a body parser for it (express.json(), express.text() or express.raw()) before idempotency().',
  );
  return Object.assign(error, { status: 415, statusCode: 415, expose: true });
}

// Node joins repeated header lines with ", ", and core refuses a bare key with a comma, so two
// Idempotency-Key lines still get a 400. Not `headersDistinct`: building it copies every header
// of every request, and on Express's req every property access is slow (see the bench README).
function toIncoming(req: Request, method: string, body: unknown, files: IncomingRequest['files']): IncomingRequest {
  return { method, path: req.originalUrl, headers: req.headers, body, files };
}

/**
 * Where multer leaves uploads: `req.files` (array, fields) or `req.file` (single); express-fileupload
 * `req.files` (an object, or `null` when it ran and no file came). `undefined`: no upload parser ran.
 */
function uploadedBy(req: Request): unknown {
  const uploads = req as { files?: unknown; file?: unknown };
  return uploads.files !== undefined ? uploads.files : uploads.file;
}

/**
 * Express 4's `body-parser` sets `req.body = {}` for every type it skips, and reads nothing of
 * it: a body still unread (its stream still readable) under an empty plain object is that `{}`,
 * not a parsed one (a parser that read `{}` has ended the stream, or flagged it: see parsedBefore).
 * Before, such bodies all fingerprinted alike, so a form posted to an express.json()-only app under a reused key got
 * the first form's answer instead of a 415. Express 5's parsers leave `undefined` instead.
 * `readable`, not `!readableEnded`: a request object that is no stream (azure-function-express,
 * node-mocks-http) reads `readableEnded` false through Express's prototype, `readable` false too.
 */
function skippedByParser(req: Request, body: unknown): boolean {
  return (
    req.readable &&
    !parsedBefore(req) &&
    typeof body === 'object' &&
    body !== null &&
    Object.getPrototypeOf(body) === Object.prototype &&
    Object.keys(body).length === 0
  );
}

/**
 * Flagged parsed as body-parser 1.x flags what it parsed (`req._body`), which it never does for
 * a type it skips: a platform that parsed the body before the app and built the request from its
 * event (serverless adapters, Vercel's and Cloud Functions' bridges) sets it so the app's parsers
 * skip it, and no one reads that request's stream. Its JSON `{}` is a parsed body, not a 415.
 */
function parsedBefore(req: Request): boolean {
  return (req as { _body?: unknown })._body === true;
}

/** A request Express passed to a factory mounted uncalled, not an options object. */
function isRequest(options: unknown): boolean {
  if (typeof options !== 'object' || options === null) return false;
  const o = options as Partial<Record<'method' | 'headers' | 'socket', unknown>>;
  return typeof o.method === 'string' && typeof o.headers === 'object' && o.socket !== undefined;
}

function uncalled(name: string, args: string): ConfigurationError {
  return new ConfigurationError(
    'ERR_IDEMKIT_OPTION_INVALID',
    `\`${name}\` was passed to app.use() (or a router) without being called, so Express called it with the request. It is a factory: app.use(${name}(${args})).`,
  );
}

function expose(req: Request, res: Response, context: IdempotencyContext | null): void {
  req.idempotency = context;
  res.locals['idempotency'] = context;
}

/**
 * Express middleware: the first request with an `Idempotency-Key` runs, its response is stored,
 * and retries get the stored response instead of running the handler again (SPEC §2).
 * Mount it after your body parser, app-wide or per route.
 *
 * @example
 * app.use(express.json());
 * app.use(idempotency({ store: createPostgresStore({ pool }) }));
 */
export function idempotency(options: ExpressIdempotencyOptions): RequestHandler {
  // `app.use(idempotency)`, the factory uncalled: Express calls it with each request, which failed
  // with "Missing required option `store`", saying nothing of why.
  if (isRequest(options)) throw uncalled('idempotency', '{ store }');
  const { engine: engineOptions, onProblem } = splitOptions(options);
  const engine = createIdempotencyEngine<Request>(engineOptions);

  // Only the default fingerprint and the body key field read the body; without them an unparsed
  // body is no reason to refuse the request (as in the Koa binding).
  const o = engine.options;
  const bodyMatters = readsBody(o);

  // Checked at the first transactional run, not here: the error handler is created after the routes.
  let errorHandlerChecked = !o.transactional;
  let warnedUnparsed = false;
  let warnedBodyKey = false;
  let warnedEncoded = false;
  let warnedWrapped = false;
  // A compressed answer streamed through a write/end that a later middleware wrapped is
  // compression mounted after idempotency(): every such answer's key then answers 410. (Mounted
  // before, compression sets the header too, but then a stream is the handler's own doing.)
  // Uncompressed, it is most likely express-session mounted after idempotency(): its end() writes
  // the answer in two parts around the session's save, so every answer that saves one went out
  // as a stream, and its retry got 410 with nothing in the log to say why.
  function warnWrappedStream(res: ServerResponse, wrapped: boolean): void {
    if (!wrapped) return;
    if (res.getHeader('content-encoding') === undefined) {
      if (warnedWrapped) return;
      warnedWrapped = true;
      o.logger?.warn(
        '[idemkit] [express] An answer went out as a stream through a res.end() or res.write() that a middleware mounted after idempotency() replaced, so it is not stored and a retry with its key gets 410. ' +
          'express-session does this for every answer that saves the session: mount such middleware before idempotency(). (Warned once.)',
      );
      return;
    }
    if (warnedEncoded) return;
    warnedEncoded = true;
    o.logger?.warn(
      `[idemkit] [express] An answer with Content-Encoding: ${String(res.getHeader('content-encoding'))} went out as a stream, so it is not stored and a retry with its key gets 410. ` +
        'If compression() is mounted after idempotency() (in a router, say), mount it before idempotency(): the stored and replayed bytes are then the uncompressed ones. (Warned once.)',
    );
  }
  function warnNoErrorHandler(): void {
    errorHandlerChecked = true;
    if (errorHandlerCreated()) return;
    o.logger?.warn(
      '[idemkit] [express] transactional: true without idempotencyErrorHandler(): Express tells this middleware nothing about a ' +
        'thrown error, so one your error handling answers with a stored status (a 400 from createError(400), say) commits the ' +
        "handler's writes with that answer. Mount idempotencyErrorHandler() after your routes to roll them back.",
    );
  }

  async function handle(req: Request, res: Response, next: NextFunction): Promise<void> {
    if (claimed.has(req)) return next();
    const method = upperMethod(req.method);
    if (!engine.options.methods.has(method)) {
      expose(req, res, null);
      return next();
    }
    // Both switched to dictionary properties here, on every path that may claim or replay (see
    // toDictionaryProperties): the property reads and adds on them from here on, the binding's
    // and Express's and Node's own (setHeader, end), no longer miss V8's inline caches, a runtime
    // call each. Before, only a claimed request's `res` was switched (in captureResponse): a
    // replay wrote to a plain `res`, and a run added `req.idempotency` to a plain `req`. The
    // switch costs about 30-45k instructions per object; measured with the bench's callgrind
    // counter it saves far more: replay 600k -> 479k instructions per request, new-key
    // 647k -> 578k (less JIT and GC; GC per request unchanged within its noise).
    toDictionaryProperties(req);
    toDictionaryProperties(res);
    // A request that carries no bytes (fetch's empty POST sends `Content-Length: 0`, curl's sends
    // no length at all) has no body, whatever a parser made of it: express.json() makes `{}` of
    // the one on Express 5 and of both on Express 4. A retry sent through another client must not
    // look like another request (422).
    // A chunked request that ended with no bytes (`Transfer-Encoding: chunked`, then `0`: a
    // stream body that turned out empty) carries none either: its parser read it to the end and
    // saw no 'data', and json() and urlencoded() make `{}` of it. Fingerprinted as a body, its
    // retry with `Content-Length: 0` got 422.
    const carriesBody = requestCarriesBody(req);
    let body: unknown = carriesBody ? req.body : undefined;
    if (body !== undefined && skippedByParser(req, body)) body = undefined;
    // express-fileupload sets req.body only when a text field arrives: files alone are a body too,
    // and so is a form whose one file input was left empty (it sets req.files to null). Looked at
    // only then: on Express's req every property read is slow (see the bench README).
    if (body === undefined && isMultipart(req.headers['content-type']) && uploadedBy(req) !== undefined) body = {};
    // Only a request that may have a key is fingerprinted (see core's mayHaveKey): one without
    // gets the SPEC's answer for that, a webhook reading its raw body itself included.
    if (body === undefined && bodyMatters && carriesBody && mayHaveKey(o, req.headers, undefined, carriesBody)) {
      const error = bodyNotParsed(req.headers['content-type']);
      // Once in the server's log too: an error handler that logs only 5xx would hide a parser
      // mounted after idempotency() (a route-level express.raw(), say).
      if (!warnedUnparsed) {
        warnedUnparsed = true;
        engine.options.logger?.warn(`${error.message} (Answered 415; warned once.)`);
      }
      return next(error);
    }
    // Keyless and passed through (required: false; a webhook reading its raw body): a key the
    // client put in this unread body is not seen, so say so once.
    if (!warnedBodyKey && unreadBodyMayHoldKey(o, req.headers, body, carriesBody)) {
      warnedBodyKey = true;
      o.logger?.warn(unreadBodyKeyWarning('express', req.headers['content-type'], o.bodyField));
    }

    // Uploaded files multer keeps beside the body (`req.file`, `req.files`): their bytes are part
    // of the request, so the default fingerprint covers them. Nothing to await without files.
    // Hashed only for a request that may have a key: one without is never fingerprinted.
    const files =
      o.fingerprint === 'default' && isMultipart(req.headers['content-type']) && mayHaveKey(o, req.headers, body, carriesBody) ? await uploadedFileDigests(uploadedBy(req)) : undefined;
    const decision = await engine.decide(toIncoming(req, method, body, files), req);
    switch (decision.kind) {
      case 'pass':
        expose(req, res, null);
        return next();
      case 'replay':
        // Answered while the store was asked (a timeout middleware mounted before this one, on a
        // slow store): the client has its answer. Written over it, the replay threw
        // ERR_HTTP_HEADERS_SENT into the app's error handlers, and Express then cut the
        // connection. So does a problem (below); the 'run' case gives its key back.
        if (res.headersSent || res.writableEnded) return;
        return writeReplay(res, decision.response);
      case 'problem': {
        if (res.headersSent || res.writableEnded) return;
        if (!onProblem) return writeProblem(res, decision.error);
        // `next()` (or 'route'/'router') from onProblem means "carry on as usual": here that is the
        // problem answer. Passed on as it is, it ran the handler with no idempotency at all, a
        // second charge on a 409. Only an error goes on to the error handlers.
        const { error } = decision;
        return onProblem(error, req, res, (err?: unknown) => {
          if (err !== undefined && err !== null && err !== 'route' && err !== 'router') next(err);
          // Unless onProblem answered already, and then called next() too.
          else if (!res.headersSent && !res.writableEnded) writeProblem(res, error);
        });
      }
      case 'run': {
        const { lease } = decision;
        // Answered while the key was being claimed (a slow store) or, with `concurrency: 'wait'`,
        // while it waited its turn: a timeout middleware mounted before this one sent its 503
        // (itself, or through next(err) as connect-timeout does). The handler must not run behind
        // an answer already sent, and the key is given back at once for the client's retry, not
        // held for a whole lease (as the Koa and Fastify bindings do).
        if (res.headersSent || res.writableEnded) {
          await lease.abandon('client-gone');
          return;
        }
        if (!errorHandlerChecked) warnNoErrorHandler();
        claimed.set(req, lease);
        expose(req, res, lease.context);
        // No abandon on an early 'close' (client gone): the handler still runs, and freeing the
        // key would let the client's retry run the operation a second time. Its answer still goes
        // through the patched end() and is stored, so the retry gets 409, then the replay (if it
        // comes within a lease of the client leaving: see captureResponse).
        captureResponse(res, lease, engine.options, warnWrappedStream);
        return next();
      }
    }
  }

  return function idempotencyMiddleware(req, res, next) {
    // Express 4 ignores a returned promise: route every rejection to next(err) ourselves.
    handle(req, res, next).catch(next);
  };
}

/**
 * Optional error middleware: mount it after your routes and before your own error handlers to
 * release the key whenever a handler throws or calls `next(err)`, whatever status your error
 * handler then answers (as the Koa and Fastify bindings do). Without it, Express gives the
 * middleware no signal for thrown errors: the key is released only when the error's answer is
 * not storable (Express's default 500 is not), and a 4xx your error handler renders is stored
 * (in transactional mode, with the handler's writes committed: it warns once without this).
 *
 * @example
 * app.use(routes);
 * app.use(idempotencyErrorHandler());
 * app.use(myErrorHandler);
 */
export function idempotencyErrorHandler(): ErrorRequestHandler;
export function idempotencyErrorHandler(...misuse: unknown[]): ErrorRequestHandler {
  // `app.use(idempotencyErrorHandler)`, uncalled: it takes no arguments, so Express runs it as a
  // plain middleware with (req, res, next), and next() was never called: every request hung.
  if (misuse.length > 0) throw uncalled('idempotencyErrorHandler', '');
  (globalThis as Record<symbol, unknown>)[ERROR_HANDLER_CREATED] = true;
  return function idempotencyErrors(err: unknown, req, res, next) {
    const lease = claimed.get(req);
    if (!lease || lease.settled) return next(err);
    // The answer's head is out already (compression mounted after idempotency() sends it now
    // and the body a tick later): freeing the key would let a retry run the operation again
    // while this client gets the answer. Settled as without this handler: by the answer's own
    // bytes as they go out, or else the lease runs out, as a crashed holder's.
    // A handler that threw after res.writeHead() alone sent nothing yet (Express's final handler
    // then cuts the connection): a throw as any other, so its key is freed at once for the retry,
    // as on Koa and Fastify, instead of answering 409 until the lease ran out.
    // Freed, nothing more of this answer may go out: an error handler of yours that ends it anyway
    // (`res.end('…')` needs no header) would complete the thrown handler's head (its 201, say)
    // while the retry runs the operation a second time. Cut instead, as Express's final handler does.
    const headOnly = res.headersSent && onlyHeadWritten(res);
    if (res.headersSent && !headOnly) {
      lease.letLapse();
      return next(err);
    }
    if (headOnly) cutIfAnsweredLater(res);
    // connect-timeout's error: the handler has not thrown, it still runs. The key stays held, and
    // whatever the error handlers answer for it settles it as cut short (see captureResponse). The
    // handler's own error after the deadline (`respond: false`) frees the key as any throw does.
    if (isTimeoutError(err, res)) {
      markTimeoutAnswer(res);
      return next(err);
    }
    // abandon() never rejects; the error goes on unchanged once the key is free.
    void lease.abandon('handler-threw').then(() => next(err));
  };
}
