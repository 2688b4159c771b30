import type { Writable } from 'node:stream';
import timers from 'node:timers';
import type { Cluster } from 'ioredis';
import type { RedisClient } from './options.js';

/**
 * From `node:timers`, not the global: test runners' fake timers (vitest's and Jest's defaults)
 * replace the global `setImmediate`, even before this module loads (a setup file), and a faked
 * flush would leave the socket corked for good, holding this store's commands and the app's own
 * on the same client. The uncork must run whatever the test does with time.
 */
const uncorkSoon: (flush: () => void) => void = timers.setImmediate;

/**
 * Returns `batch()`: call it before sending a command. The first call of an event-loop turn
 * corks the client's sockets and schedules their uncork with `setImmediate`, so every command
 * sent until then (this store's, and your own on the same client) leaves in one socket write.
 *
 * Why: an HTTP server hands over the requests that arrived together in one poll phase, and each
 * of them sends a `begin` or `complete`. One write per command costs a syscall in Node and a
 * wake-up plus a read in Redis, which on a busy server is most of what a store call costs.
 * node-redis batches this way by default; ioredis writes each command at once. The delay is
 * bounded by the current turn: the uncork runs right after the poll phase, before any timer.
 */
export function writeBatcher(client: RedisClient): () => void {
  let corked: Writable[] | null = null;

  const flush = (): void => {
    const streams = corked ?? [];
    corked = null;
    // A stream ioredis replaced meanwhile (reconnect) is destroyed; uncorking it is a no-op.
    for (const stream of streams) stream.uncork();
  };

  return function batch(): void {
    if (corked !== null) return;
    const streams = readyStreams(client);
    if (streams.length === 0) return;
    for (const stream of streams) stream.cork();
    corked = streams;
    uncorkSoon(flush);
  };
}

/**
 * The sockets commands are written to right now. A client that is not ready queues commands in
 * memory instead (its offline queue), so there is nothing to cork. On a Cluster every command
 * goes to a master, and which one depends on the key, so all ready masters are corked.
 */
function readyStreams(client: RedisClient): Writable[] {
  if (isCluster(client)) {
    const out: Writable[] = [];
    for (const node of client.nodes('master')) {
      if (node.status === 'ready' && node.stream) out.push(node.stream);
    }
    return out;
  }
  return client.status === 'ready' && client.stream ? [client.stream] : [];
}

// ioredis types `isCluster` as boolean on both classes, so it does not narrow by itself.
function isCluster(client: RedisClient): client is Cluster {
  return client.isCluster;
}
