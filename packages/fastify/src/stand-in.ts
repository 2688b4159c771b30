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

/** What the handler tried to send after the answer being settled went out (see `watchSends`). */
export interface LateSends {
  /** The handler sent an answer of its own after this one (Fastify drops it: one went out). */
  readonly answered: boolean;
  /** Stop watching (the reply's own `send` comes back). */
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
      if (reply.then === watch) Reflect.deleteProperty(reply, 'then');
      resolve(sender);
    };
    const watch: FastifyReply['then'] = function (this: FastifyReply, fulfilled, rejected) {
      decide('own');
      return replyThen.call(this, fulfilled, rejected);
    };
    reply.then = watch;
    const timer = setImmediate(() => decide('running'));
    Promise.resolve(handler).then(
      (value) => decide(value !== undefined || sends.answered ? 'finished' : 'own'),
      () => decide('own'),
    );
  });
}

/**
 * Note the handler's own answers from now on: Fastify drops a `send` once an answer went out, so
 * without this a handler that finishes with `return reply.code(201).send(order)` after a timeout
 * answered for it would look like one that had nothing to say. Only `send`s with a payload count:
 * Fastify's own send of an async handler's `undefined` result is not an answer.
 */
export function watchSends(reply: FastifyReply): LateSends {
  const send = reply.send;
  let answered = false;
  const watch: FastifyReply['send'] = function (this: FastifyReply, payload?: unknown) {
    if (payload !== undefined) answered = true;
    return send.call(this, payload);
  };
  reply.send = watch;
  return {
    get answered() {
      return answered;
    },
    stop() {
      if (reply.send === watch) Reflect.deleteProperty(reply, 'send');
    },
  };
}
