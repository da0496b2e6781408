/**
 * The fork worker (fork-memory-thread.ts), started on first use and kept, seen from the server: it
 * reads a stopped parent's private pages, or splits its migration stream.
 */
import { Worker } from 'node:worker_threads';
import { MigrationStreamError } from './migration-split.js';
import type { PagesRequest, SplitRequest, WorkerMessage, WorkerRequest } from './fork-memory-thread.js';

export class ForkMemoryWorker {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly waiting = new Map<number, (m: WorkerMessage) => void>();

  /**
   * The private pages of a stopped VM's QEMU (private-pages.ts): `counted` says how many there
   * are and whether they are to be copied (at most `limitBytes`); if so, `stateHead` is the
   * children's state with them, up to the device state (fork-state.ts).
   */
  privatePages(o: Omit<PagesRequest, 'type' | 'id'>): { counted: Promise<{ count: number; copy: boolean }>; stateHead: Promise<Buffer> } {
    let onCounted!: (c: { count: number; copy: boolean }) => void;
    let onFail!: (e: Error) => void;
    const counted = new Promise<{ count: number; copy: boolean }>((resolve, reject) => { onCounted = resolve; onFail = reject; });
    const stateHead = new Promise<Buffer>((resolve, reject) => {
      this.request({ type: 'pages', ...o }, (m) => {
        if (m.type === 'counted') {
          onCounted(m);
          if (m.copy) return false;
          reject(new Error('the pages were too many to copy'));
        } else if (m.type === 'pages') {
          resolve(Buffer.from(m.stateHead.buffer, m.stateHead.byteOffset, m.stateHead.byteLength));
        } else {
          const err = new Error(m.type === 'error' ? m.message : `unexpected answer ${m.type}`);
          onFail(err);
          reject(err);
        }
        return true;
      });
    });
    counted.catch(() => undefined);
    stateHead.catch(() => undefined);
    return { counted, stateHead };
  }

  /**
   * Listens on `socketPath` for one migration stream; `listening` resolves once QEMU (uid `uid`)
   * may connect, `done` with the split. `cancel` stops it (the socket closes, `done` rejects).
   */
  split(o: Omit<SplitRequest, 'type' | 'id'>): { listening: Promise<void>; done: Promise<{ state: Buffer; pages: number }>; cancel(): void } {
    let onListening!: () => void;
    let onFail!: (e: Error) => void;
    let id = 0;
    const listening = new Promise<void>((resolve, reject) => { onListening = resolve; onFail = reject; });
    const done = new Promise<{ state: Buffer; pages: number }>((resolve, reject) => {
      id = this.request({ type: 'split', ...o }, (m) => {
        if (m.type === 'listening') {
          onListening();
          return false;
        }
        if (m.type === 'split') resolve({ state: Buffer.from(m.state.buffer, m.state.byteOffset, m.state.byteLength), pages: m.pages });
        else {
          const err = new MigrationStreamError(m.type === 'error' ? m.message : `unexpected answer ${m.type}`);
          onFail(err);
          reject(err);
        }
        return true;
      });
    });
    listening.catch(() => undefined);
    done.catch(() => undefined);
    return { listening, done, cancel: () => this.worker?.postMessage({ type: 'cancel', id } satisfies WorkerRequest) };
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    await w?.terminate();
  }

  /** Sends a request; `onMessage` gets its answers until it returns true (the last). */
  private request(req: Omit<SplitRequest, 'id'> | Omit<PagesRequest, 'id'>, onMessage: (m: WorkerMessage) => boolean): number {
    const worker = this.start();
    const id = this.nextId++;
    this.waiting.set(id, (m) => {
      if (!onMessage(m)) return;
      this.waiting.delete(id);
      if (this.waiting.size === 0) worker.unref();
    });
    worker.ref(); // work in progress keeps the process up
    worker.postMessage({ ...req, id } as WorkerRequest);
    return id;
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    // Next to this module: fork-memory-thread.js in dist (or .ts when run from source under tsx,
    // whose loader the worker inherits).
    const worker = new Worker(new URL(`./fork-memory-thread.${import.meta.url.endsWith('.ts') ? 'ts' : 'js'}`, import.meta.url));
    worker.unref();
    worker.on('message', (m: WorkerMessage) => this.waiting.get(m.id)?.(m));
    const failAll = (message: string) => {
      if (this.worker === worker) this.worker = null;
      for (const [id, w] of [...this.waiting]) w({ id, type: 'error', message });
    };
    worker.on('error', (e) => failAll(`the fork worker failed: ${e.message}`));
    worker.on('exit', () => failAll('the fork worker exited'));
    this.worker = worker;
    return worker;
  }
}
