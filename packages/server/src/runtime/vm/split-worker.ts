/**
 * The worker thread that splits fork points' migration streams (migration-split.ts). In a thread
 * of its own, the 100+ MB each fork streams (socket reads, parsing, page writes, and the garbage
 * collections the socket's buffers set off) stay off the server's event loop, which meanwhile
 * spawns the children's QEMUs.
 *
 * Messages in: {type: 'split', id, socketPath, uid, ramFile, ramBlock, ramSize} | {type: 'cancel', id}
 * Messages out: {id, type: 'listening'} | {id, type: 'done', state, pages} | {id, type: 'error', message}
 */
import { closeSync, openSync } from 'node:fs';
import { chown } from 'node:fs/promises';
import net from 'node:net';
import { parentPort } from 'node:worker_threads';
import { splitMigrationStream } from './migration-split.js';

export interface SplitRequest {
  type: 'split';
  id: number;
  socketPath: string;
  /** QEMU's uid: it must be able to connect. */
  uid: number;
  ramFile: string;
  ramBlock: string;
  ramSize: number;
}

export type SplitMessage =
  | { id: number; type: 'listening' }
  | { id: number; type: 'done'; state: Uint8Array; pages: number }
  | { id: number; type: 'error'; message: string };

const port = parentPort!;
const cancels = new Map<number, () => void>();

port.on('message', (m: SplitRequest | { type: 'cancel'; id: number }) => {
  if (m.type === 'cancel') return void cancels.get(m.id)?.();
  void split(m);
});

async function split(m: SplitRequest): Promise<void> {
  const send = (msg: SplitMessage) => port.postMessage(msg);
  const server = net.createServer();
  let conn: net.Socket | null = null;
  let cancelled = false;
  cancels.set(m.id, () => {
    cancelled = true;
    server.close();
    conn?.destroy(new Error('cancelled'));
  });
  // Our own descriptor of the RAM file: closed here, whatever the server does meanwhile.
  let fd: number | null = null;
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(m.socketPath, () => resolve());
    });
    await chown(m.socketPath, m.uid, m.uid);
    send({ id: m.id, type: 'listening' });
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      server.once('connection', resolve);
      server.once('close', () => reject(new Error('cancelled before QEMU connected')));
    });
    server.close(); // one connection only
    conn = sock;
    if (cancelled) throw new Error('cancelled');
    fd = openSync(m.ramFile, 'r+');
    const r = await splitMigrationStream(sock, m.ramBlock, fd, m.ramSize);
    send({ id: m.id, type: 'done', state: r.state, pages: r.pages });
  } catch (err) {
    send({ id: m.id, type: 'error', message: (err as Error).message });
  } finally {
    cancels.delete(m.id);
    server.close();
    conn?.destroy();
    if (fd !== null) closeSync(fd);
  }
}
