import { PROBLEM_CONTENT_TYPE, type IdempotencyError } from './errors.js';
import type { StoredResponse } from './store.js';

const encoder = new TextEncoder();

/**
 * The exact response every binding writes for a problem, so Express, Koa and Fastify answer
 * byte for byte alike: RFC 9457 JSON, the error's headers (e.g. `retry-after`).
 */
export function problemResponse(error: IdempotencyError): StoredResponse {
  const headers: Array<[string, string]> = [['content-type', PROBLEM_CONTENT_TYPE]];
  for (const [name, value] of Object.entries(error.headers)) headers.push([name.toLowerCase(), value]);
  return { status: error.status, headers, body: encoder.encode(JSON.stringify(error.toProblem())) };
}
