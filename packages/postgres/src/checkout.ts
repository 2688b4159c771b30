import type { Pool, PoolClient } from 'pg';

/**
 * Ignores a checked-out client's 'error' event. pg-pool takes its own listener off a client while
 * it is checked out, so a connection that dies then (a restart, a failover,
 * `pg_terminate_backend`, `idle_in_transaction_session_timeout`) would be an unhandled 'error'
 * event, which ends the process. Nothing is lost: the next query on the client rejects with the
 * driver's error, and the client is destroyed when it goes back.
 */
function ignoreConnectionError(): void {}

/**
 * Check a client out of `pool` with `ignoreConnectionError` already listening. With
 * `await pool.connect()` there is a gap: a FATAL that arrives in the same socket read as the
 * answer that freed the client (or as the answer to our BEGIN) is emitted synchronously, before
 * the `await` resumes, with no listener on the client (seen under `pg_terminate_backend` in a
 * loop: the process died within a second). The callback form runs within that read. Take the
 * listener off (`giveBack`) before the client goes back to the pool.
 */
export function checkOut(pool: Pool): Promise<PoolClient> {
  return new Promise((resolve, reject) => {
    pool.connect((error, client) => {
      if (error !== undefined && error !== null) return reject(error);
      if (client === undefined) return reject(new Error('[idemkit] [postgres] The pool handed out no client.'));
      client.on('error', ignoreConnectionError);
      resolve(client);
    });
  });
}

/** Back to the pool (destroyed when `destroy` is set: its state is unknown after a failure). */
export function giveBack(client: PoolClient, destroy?: Error | boolean): void {
  client.removeListener('error', ignoreConnectionError);
  client.release(destroy);
}
