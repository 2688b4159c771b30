import { connect, createServer, type Socket } from 'node:net';

export interface AnswerHoldingProxy {
  /** The proxy's port on 127.0.0.1: point the client here instead of at the server. */
  readonly port: number;
  /**
   * From now on, connections already open send their commands on but never see the server's
   * answers: a reply lost on the way (a client-side timeout then fires while the command ran).
   * Connections opened later pass through, so a client can still reach the server.
   */
  holdAnswers(): void;
  /**
   * As `holdAnswers`, but the answers are kept, not dropped: `deliverHeld()` sends them on, late
   * (a network that stalled and then caught up).
   */
  stallAnswers(): void;
  /** Send every answer kept by `stallAnswers` on, and let later ones through. */
  deliverHeld(): void;
  /** Drop every open connection at once (the server stays up behind the proxy). */
  cut(): void;
  /** While on, new connections are closed as they come: the server looks unreachable. */
  refuse(on: boolean): void;
  /**
   * Drop every open connection and stop listening, so new ones are refused at the TCP level
   * (ECONNREFUSED, as when the server process died and its host is up); `listen()` takes the
   * same port again.
   */
  stopListening(): Promise<void>;
  listen(): Promise<void>;
  /** Connections passed through to the server so far (refused ones not counted). */
  accepted(): number;
  close(): Promise<void>;
}

/**
 * A TCP hop between a client and a real server that can make answers go missing, for tests of
 * "the command landed but its caller saw a failure". Bytes pass unchanged; nothing is parsed.
 */
export async function answerHoldingProxy(host: string, port: number): Promise<AnswerHoldingProxy> {
  const sockets = new Set<Socket>();
  const held = new WeakSet<Socket>();
  const stalled = new Map<Socket, Buffer[]>();
  const open: Socket[] = [];
  let refusing = false;
  let accepted = 0;
  const server = createServer((downstream) => {
    if (refusing) {
      downstream.on('error', () => undefined);
      downstream.destroy();
      return;
    }
    accepted++;
    const upstream = connect(port, host);
    for (const socket of [downstream, upstream]) {
      sockets.add(socket);
      socket.on('error', () => undefined);
      socket.on('close', () => {
        sockets.delete(socket);
        downstream.destroy();
        upstream.destroy();
      });
    }
    open.push(downstream);
    downstream.pipe(upstream);
    upstream.on('data', (chunk: Buffer) => {
      const kept = stalled.get(downstream);
      if (kept) kept.push(chunk);
      else if (!held.has(downstream)) downstream.write(chunk);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('proxy: no TCP address');
  const listeningPort = address.port;
  return {
    port: address.port,
    holdAnswers() {
      for (const socket of open.splice(0)) held.add(socket);
    },
    stallAnswers() {
      for (const socket of open.splice(0)) stalled.set(socket, []);
    },
    deliverHeld() {
      for (const [socket, chunks] of stalled) {
        stalled.delete(socket);
        for (const chunk of chunks) socket.write(chunk);
        open.push(socket);
      }
    },
    cut() {
      for (const socket of sockets) socket.destroy();
    },
    refuse(on) {
      refusing = on;
    },
    async stopListening() {
      const closed = new Promise((resolve) => server.close(resolve));
      for (const socket of sockets) socket.destroy();
      await closed;
    },
    async listen() {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(listeningPort, '127.0.0.1', () => {
          server.off('error', reject);
          resolve();
        });
      });
    },
    accepted: () => accepted,
    async close() {
      for (const socket of sockets) socket.destroy();
      if (server.listening) await new Promise((resolve) => server.close(resolve));
    },
  };
}
