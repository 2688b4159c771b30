import type { FastifyReply } from 'fastify';

/**
 * Who sent an answer that would give the key back, while the async route handler had not
 * settled when it came:
 * - `own`: the handler's own answer (it threw, returned, or answered and returns `reply`);
 * - `finished`: someone else's (a timeout), and the handler has since finished with an answer
 *   that could not go out;
 * - `running`: someone else's, or the handler's own while it keeps working; it still runs.
 */
export type Sender = 'own' | 'finished' | 'running';

/** What was sent after the answer being settled (see `watchSends`). */
export interface LateSends {
  /** Any `send`: once that answer went out, only the handler's own (a 204 has no payload). */
  readonly any: boolean;
  /** A `send` with a payload: the handler's own answer even before that one went out, when
   * Fastify may still send an async handler's `undefined` result itself. */
  readonly withPayload: boolean;
  /** The last `send` was a failure (an Error, or a status that is not storable): as a throw, it frees the key. */
  readonly failed: boolean;
  /** Stop watching (the reply's `send` is as it was). */
  stop(): void;
}

/**
 * Tell who sent a key-freeing answer. Only such answers come here, and only when the route handler
 * returned a promise, so a normal request pays nothing for it.
 *
 * A handler whose promise had settled before the answer (Fastify sending its result or its error)
 * has reported within a few microtasks. One that answered itself and returns `reply` next has its
 * promise call `reply.then` within this turn of the event loop; one that throws or ends does so
 * too. One that ends with a value to send in that time was answered for: a timeout got there
 * first. Otherwise it still runs.
 */
export async function whoSent(handler: PromiseLike<unknown>, reply: FastifyReply, sends: LateSends): Promise<Sender> {
  let outcome: { readonly value: unknown } | 'rejected' | undefined;
  Promise.resolve(handler).then(
    (value) => void (outcome ??= { value }),
    () => void (outcome ??= 'rejected'),
  );
  // An already settled promise (native, or a thenable that calls back at once) has reported by now.
  for (let tick = 0; tick < 3 && outcome === undefined; tick++) await null;
  if (outcome !== undefined) return 'own';
  return new Promise<Sender>((resolve) => {
    const replyThen = reply.then;
    let decided = false;
    const decide = (sender: Sender): void => {
      if (decided) return;
      decided = true;
      clearImmediate(timer);
      restoreThen();
      resolve(sender);
    };
    // The handler returns `reply`: its answer went out before this one (its own, then), unless it
    // sent another just now (`return reply.code(201).send(order)` in the same turn as a timeout).
    const watch: FastifyReply['then'] = function (this: FastifyReply, fulfilled, rejected) {
      decide(sends.any ? 'finished' : 'own');
      return replyThen.call(this, fulfilled, rejected);
    };
    const restoreThen = patch(reply, 'then', watch);
    const timer = setImmediate(() => decide('running'));
    Promise.resolve(handler).then(
      (value) => decide(value !== undefined || sends.withPayload ? 'finished' : 'own'),
      () => decide('own'),
    );
  });
}

/**
 * Note the handler's own answers from now on: Fastify drops a `send` once an answer went out, so
 * without this a handler that finishes with `return reply.code(201).send(order)` after a timeout
 * answered for it would look like one that had nothing to say. Before that answer went out,
 * Fastify itself may send an async handler's `undefined` result, which is no answer: hence
 * `withPayload` beside `any`.
 */
export function watchSends(reply: FastifyReply, storable: (status: number) => boolean, answeredStatus: number): LateSends {
  const send = reply.send;
  let any = false;
  let withPayload = false;
  let failed = false;
  const watch: FastifyReply['send'] = function (this: FastifyReply, payload?: unknown) {
    any = true;
    if (payload !== undefined) withPayload = true;
    // `reply.code(500)` sets the status even once an answer went out: a status other than the
    // answer's that went out is the handler's own. (Fastify sends a returned value with whatever
    // status is there, the timeout's 503: not a failure of the handler's.)
    failed = payload instanceof Error || (this.statusCode !== answeredStatus && !storable(this.statusCode));
    return send.call(this, payload);
  };
  const stop = patch(reply, 'send', watch);
  return {
    get any() {
      return any;
    },
    get withPayload() {
      return withPayload;
    },
    get failed() {
      return failed;
    },
    stop,
  };
}

/** Whether `send` was called while it was watched (see `watchAnswered`). */
export interface Answered {
  /** `send` was called: the answer may still be in async `onSend` hooks, where `reply.sent` is not yet true. */
  readonly any: boolean;
  /** Stop watching (the reply's `send` is as it was). */
  stop(): void;
}

/**
 * A class, not an object literal with a getter: every new key makes one, and a literal with an
 * accessor is built by a runtime call (2,400 instructions per request under callgrind).
 */
class SendWatch implements Answered {
  any = false;
  readonly stop: () => void;

  constructor(reply: FastifyReply) {
    const send = reply.send;
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the wrapper's `this` is the reply.
    const watch = this;
    this.stop = patch(reply, 'send', function (this: FastifyReply, payload?: unknown) {
      watch.any = true;
      return send.call(this, payload);
    });
  }
}

/**
 * Note whether anyone answers while the plugin waits (for `onProblem`, or for the key to be
 * claimed). `reply.sent` is no use there: it turns true only once the response has ended, which
 * an async app-level `onSend` hook delays well past the `send()` call.
 */
export function watchAnswered(reply: FastifyReply): Answered {
  return new SendWatch(reply);
}

/**
 * Put `value` on the reply as its own `name` for a while; the returned function puts back what
 * was there (another plugin's own wrapper, or nothing, so the prototype's method shows again).
 */
function patch<K extends 'send' | 'then'>(reply: FastifyReply, name: K, value: FastifyReply[K]): () => void {
  const before = Object.getOwnPropertyDescriptor(reply, name);
  reply[name] = value;
  return () => {
    if (reply[name] !== value) return;
    if (before === undefined) Reflect.deleteProperty(reply, name);
    else Object.defineProperty(reply, name, before);
  };
}
