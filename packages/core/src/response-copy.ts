import type { StoredResponse } from './store.js';

/**
 * A copy to keep: the caller may reuse its buffers (a handler rendering into one buffer for
 * every request), and a kept answer must stay byte-exact. Headers are frozen, so the copy can be
 * handed out as it is; the body gets its own, exactly sized buffer (never a view of a pool).
 */
export function keptCopy(response: StoredResponse): StoredResponse {
  return {
    status: response.status,
    headers: Object.freeze(response.headers.map(([n, v]) => Object.freeze([n, v] as const))),
    body: new Uint8Array(response.body),
  };
}

/**
 * A kept answer as handed out: its own body, since a caller may change the bytes it got in
 * place (a Buffer view allows it), and that must not change the next replay. Headers stay the
 * frozen ones from `keptCopy`.
 */
export function handedOut(response: StoredResponse): StoredResponse {
  return { status: response.status, headers: response.headers, body: new Uint8Array(response.body) };
}
