import { ConfigurationError, type IdempotencyError, type IdempotencyOptions } from '@idemkit/core';
import type { FastifyReply, FastifyRequest } from 'fastify';

/**
 * Plugin options: the core engine options (typed for `FastifyRequest`, so `scope`, `getKey` and
 * `fingerprint` see the Fastify request) plus Fastify-only extras.
 */
export interface FastifyIdempotencyOptions extends IdempotencyOptions<FastifyRequest> {
  /**
   * Answer idempotency problems (400 key missing/invalid, 409 in progress, 422 mismatch, 503
   * store down) yourself. It must send the reply (`reply.code(...).send(...)`). Never called for
   * replays, the stored 410 of an answer that could not be stored included.
   * Without it the plugin writes the RFC 9457 `application/problem+json` response core builds,
   * byte-identical to the Express and Koa bindings.
   */
  onProblem?: ((request: FastifyRequest, reply: FastifyReply, error: IdempotencyError) => void | Promise<void>) | undefined;
}

/** What a route may override through `config: { idempotency: { … } }`; the store is app-wide. */
export type RouteIdempotencyOptions = Partial<Omit<FastifyIdempotencyOptions, 'store'>> & {
  /** Not per route: register the plugin in a separate (sibling) encapsulated context for another store. */
  store?: never;
};

/**
 * The value of `config.idempotency` on one route: overrides, or `false` to leave the route alone.
 * (`& object` keeps `true` out even when Fastify infers the route's config type from the literal.)
 */
export type RouteIdempotencyConfig = (RouteIdempotencyOptions & object) | false;

/**
 * Merge one route's `config.idempotency` into the plugin options. Throws a `ConfigurationError`
 * at startup (from `app.post(...)` or `ready()`) for anything but an object, `false` or undefined.
 * Returns null when the route opted out.
 */
export function mergeRouteOptions(
  base: FastifyIdempotencyOptions,
  value: unknown,
  where: string,
): FastifyIdempotencyOptions | null {
  if (value === false) return null;
  if (value === undefined) return base;
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      `Route ${where}: \`config.idempotency\` must be an object of option overrides or false, got ${describe(value)}.`,
    );
  }
  if (Object.hasOwn(value, 'store')) {
    throw new ConfigurationError(
      'ERR_IDEMKIT_OPTION_INVALID',
      `Route ${where}: \`config.idempotency.store\` cannot be overridden per route; register the plugin in its own context with that store instead.`,
    );
  }
  // Undefined means "not given": keep the plugin's value rather than falling back to the core default.
  const overrides = Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined));
  return { ...base, ...overrides };
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'string' ? JSON.stringify(value) : typeof value;
}
