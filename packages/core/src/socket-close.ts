/** What `whenSocketCloses` needs of a socket: Node's `net.Socket` (and any emitter with `once`). */
export interface ClosableSocket {
  once(event: 'close', listener: () => void): unknown;
  /** True once 'close' has been emitted (Node streams): it will not be emitted again. */
  readonly closed?: boolean;
}

/** Callbacks waiting for a socket's close, behind one listener per socket (not one per pipelined request). */
const waiting = new WeakMap<ClosableSocket, Set<() => void>>();

/**
 * Call `callback` when `socket` closes; returns the function that stops waiting. For bindings: a
 * response pipelined behind another on its connection has no socket yet, and Node never closes
 * it if the socket dies first, so the socket's close stands in. One listener per socket, however
 * many requests wait on it (more than ten would trip Node's MaxListenersExceededWarning).
 */
export function whenSocketCloses(socket: ClosableSocket, callback: () => void): () => void {
  // Closed already (it died while the request's key was being claimed): no 'close' is coming,
  // so the caller hears it on the next turn, unless it stops waiting first.
  if (socket.closed === true) {
    let live = true;
    setImmediate(() => live && callback());
    return () => void (live = false);
  }
  let waiters = waiting.get(socket);
  if (waiters === undefined) {
    const all = new Set<() => void>();
    waiters = all;
    waiting.set(socket, all);
    socket.once('close', () => {
      waiting.delete(socket);
      for (const waiter of all) waiter();
    });
  }
  const set = waiters;
  set.add(callback);
  return () => void set.delete(callback);
}
