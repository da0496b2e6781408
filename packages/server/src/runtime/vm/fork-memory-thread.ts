/**
 * The fork worker thread: it gets a fork point's memory (fork-memory.ts) off the server's event
 * loop, which meanwhile spawns the children's QEMUs. Either of:
 * - `pages`: the parent's private pages, read from its QEMU's memory (private-pages.ts) into the
 *   children's state (fork-state.ts);
 * - `split`: the parent's migration stream, split as it arrives (migration-split.ts): the 100+ MB
 *   it streams (socket reads, parsing, page writes, and the garbage collections the socket's
 *   buffers set off) stay here. The stream is read into one buffer, reused for every read: a
 *   fresh buffer per read (Node's default) means ~100 MB of new memory per fork, each page of it
 *   faulted in and then collected by V8 — about half the CPU a split took.
 */
import { closeSync, openSync, readlinkSync } from 'node:fs';
import { chown } from 'node:fs/promises';
import net from 'node:net';
import { parentPort } from 'node:worker_threads';
import { PAGE, splitEnded, splitMigrationStream, StreamSplitter, type SplitResult } from './migration-split.js';
import { forkStateHead, MAX_RUN, type ForkSkeleton } from './fork-state.js';
import { findPrivatePages, PageReader } from './private-pages.js';

export interface SplitRequest {
  type: 'split';
  id: number;
  socketPath: string;
  /** QEMU's uid: it must be able to connect. */
  uid: number;
  /** Where the pages go: a path the server opens read-write (shared RAM's fillPath). */
  ramFile: string;
  /** What the file opened must be (/proc/self/fd's link): shared RAM's mapsName. */
  ramName: string;
  ramBlock: string;
  ramSize: number;
}

export interface PagesRequest {
  type: 'pages';
  id: number;
  pid: number;
  /** The RAM's name in /proc/<pid>/maps (shared RAM's mapsName: `/memfd:<name> (deleted)`). */
  ramFile: string;
  ramSize: number;
  limitBytes: number;
  skeleton: ForkSkeleton;
  ramBlock: string;
}

export type WorkerRequest = SplitRequest | PagesRequest | { type: 'cancel'; id: number };

export type WorkerMessage =
  | { id: number; type: 'listening' }
  | { id: number; type: 'split'; state: Uint8Array; pages: number }
  | { id: number; type: 'counted'; count: number; copy: boolean }
  /** null: too many pages to copy. */
  | { id: number; type: 'pages'; stateHead: Uint8Array | null }
  | { id: number; type: 'error'; message: string };

const port = parentPort!;
const cancels = new Map<number, () => void>();

port.on('message', (m: WorkerRequest) => {
  if (m.type === 'cancel') return void cancels.get(m.id)?.();
  if (m.type === 'pages') return pages(m);
  void split(m);
});

/**
 * Counts the private pages first, then, unless they are more than the limit, reads them into the
 * children's state.
 */
function pages(m: PagesRequest): void {
  try {
    const found = findPrivatePages(m.pid, m.ramFile, m.ramSize);
    const copy = found.pages.length * PAGE <= m.limitBytes;
    port.postMessage({ id: m.id, type: 'counted', count: found.pages.length, copy } satisfies WorkerMessage);
    if (!copy) return port.postMessage({ id: m.id, type: 'pages', stateHead: null } satisfies WorkerMessage);
    const reader = new PageReader(m.pid, found.start, MAX_RUN);
    let stateHead: Buffer;
    try {
      stateHead = forkStateHead(m.skeleton, m.ramBlock, found.pages, (first, count) => reader.read(first, count));
    } finally {
      reader.close();
    }
    // Handed over, not copied (its own memory: allocUnsafeSlow).
    port.postMessage({ id: m.id, type: 'pages', stateHead } satisfies WorkerMessage, [stateHead.buffer as ArrayBuffer]);
  } catch (err) {
    port.postMessage({ id: m.id, type: 'error', message: (err as Error).message } satisfies WorkerMessage);
  }
}

/** One read buffer for the worker's splits (they run one after another in practice; a second
 * concurrent split gets its own). */
const READ_BUFFER_BYTES = 1 << 20;
let readBufferFree: Buffer | null = Buffer.allocUnsafe(READ_BUFFER_BYTES);

/**
 * The accepted connection as a socket that reads into a reused buffer (`onread`), handing each
 * chunk to `onChunk`; a chunk it throws on ends the connection with that error. net.Server has no
 * such option for accepted sockets, so the connection's handle moves to a socket made with one.
 * Null where there is no handle to move (the connection is then read as it is).
 */
function readingIntoOneBuffer(accepted: net.Socket, onChunk: (chunk: Buffer) => void): net.Socket | null {
  const holder = accepted as unknown as { _handle: unknown };
  const handle = holder._handle;
  if (!handle) return null;
  holder._handle = null;
  const buffer = readBufferFree ?? Buffer.allocUnsafe(READ_BUFFER_BYTES);
  readBufferFree = null;
  const sock: net.Socket = new net.Socket({
    handle,
    onread: {
      buffer,
      callback: (n: number, buf: Uint8Array) => {
        try {
          onChunk(Buffer.from(buf.buffer, buf.byteOffset, n));
          return true;
        } catch (err) {
          sock.destroy(err as Error);
          return false;
        }
      },
    },
  } as net.SocketConstructorOpts & { handle: unknown });
  sock.once('close', () => { readBufferFree = buffer; });
  sock.resume();
  return sock;
}

async function split(m: SplitRequest): Promise<void> {
  const send = (msg: WorkerMessage) => port.postMessage(msg);
  // Paused: the connection's handle moves to a socket reading into the reused buffer before any read.
  const server = net.createServer({ pauseOnConnect: true });
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
    const accepted = await new Promise<net.Socket>((resolve, reject) => {
      server.once('connection', resolve);
      server.once('close', () => reject(new Error('cancelled before QEMU connected')));
    });
    server.close(); // one connection only
    conn = accepted;
    if (cancelled) throw new Error('cancelled');
    fd = openSync(m.ramFile, 'r+');
    // A /proc/<spawner>/fd/<n> path: it is the memfd made for this split, nothing else of the host.
    if (readlinkSync(`/proc/self/fd/${fd}`) !== m.ramName) throw new Error(`${m.ramFile} is not the fork point's RAM`);
    const splitter = new StreamSplitter(m.ramBlock, fd, m.ramSize);
    const reader = readingIntoOneBuffer(accepted, (chunk) => splitter.push(chunk, true));
    let r: SplitResult;
    if (reader) {
      conn = reader;
      r = await splitEnded(reader, splitter);
    } else {
      const whole = splitMigrationStream(accepted, splitter);
      accepted.resume(); // paused on connect
      r = await whole;
    }
    send({ id: m.id, type: 'split', state: r.state, pages: r.pages });
  } catch (err) {
    send({ id: m.id, type: 'error', message: (err as Error).message });
  } finally {
    cancels.delete(m.id);
    server.close();
    conn?.destroy();
    if (fd !== null) closeSync(fd);
  }
}
