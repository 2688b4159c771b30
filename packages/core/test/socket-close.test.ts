import { createServer, connect, type Server, type Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { whenSocketCloses } from '../src/index.js';

/** A client socket connected to a server of its own on 127.0.0.1. */
async function connected(): Promise<{ server: Server; socket: Socket }> {
  const server = createServer((s) => s.on('error', () => undefined));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  const socket = connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  return { server, socket };
}

describe('whenSocketCloses', () => {
  it('calls every waiter once the socket closes, behind a single listener, except those that stopped', async () => {
    const { server, socket } = await connected();
    const before = socket.listenerCount('close');
    const called: number[] = [];
    const stops = Array.from({ length: 15 }, (_, i) => whenSocketCloses(socket, () => called.push(i)));
    expect(socket.listenerCount('close')).toBe(before + 1);
    stops[3]?.();
    const closed = new Promise((resolve) => socket.once('close', resolve));
    socket.destroy();
    await closed;
    expect(called).toEqual([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    await new Promise((resolve) => server.close(resolve));
  });

  it('a socket that closed already calls back on the next turn (no close event is coming), unless stopped first', async () => {
    const { server, socket } = await connected();
    const closed = new Promise((resolve) => socket.once('close', resolve));
    socket.destroy();
    await closed;
    const called: string[] = [];
    whenSocketCloses(socket, () => called.push('waiting'));
    const stop = whenSocketCloses(socket, () => called.push('stopped'));
    stop();
    expect(called).toEqual([]);
    await new Promise((resolve) => setImmediate(resolve));
    expect(called).toEqual(['waiting']);
    await new Promise((resolve) => server.close(resolve));
  });
});
