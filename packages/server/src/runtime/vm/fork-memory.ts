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
   * are and whether they are to be copied (at most `limitBytes`); `stateHead` is then the
   * children's state with them, up to the device state (fork-state.ts), or null.
   */
  privatePages(o: Omit<PagesRequest, 'type' | 'id'>): { counted: Promise<{ count: number; copy: boolean }>; stateHead: Promise<Buffer | null> } {
    const { first, last } = this.twoAnswers(
      { type: 'pages', ...o },
      (m) => (m.type === 'counted' ? { count: m.count, copy: m.copy } : undefined),
      (m) => (m.type === 'pages' ? (m.stateHead ? asBuffer(m.stateHead) : null) : undefined),
      (message) => new Error(message),
    );
    return { counted: first, stateHead: last };
  }

  /**
   * Listens on `socketPath` for one migration stream; `listening` resolves once QEMU (uid `uid`)
   * may connect, `done` with the split. `cancel` stops it (the socket closes, `done` rejects).
   */
  split(o: Omit<SplitRequest, 'type' | 'id'>): { listening: Promise<void>; done: Promise<{ state: Buffer; pages: number }>; cancel(): void } {
    const { id, first, last } = this.twoAnswers(
      { type: 'split', ...o },
      (m) => (m.type === 'listening' ? true : undefined),
      (m) => (m.type === 'split' ? { state: asBuffer(m.state), pages: m.pages } : undefined),
      (message) => new MigrationStreamError(message),
    );
    return { listening: first.then(() => undefined), done: last, cancel: () => this.worker?.postMessage({ type: 'cancel', id } satisfies WorkerRequest) };
  }

  /**
   * A request answered twice: a first message (what `first` picks out of it), then the last
   * (what `last` picks). An error from the worker (or an answer neither expects) fails both.
   */
  private twoAnswers<A, B>(req: Omit<SplitRequest, 'id'> | Omit<PagesRequest, 'id'>, first: (m: WorkerMessage) => A | undefined, last: (m: WorkerMessage) => B | undefined, failure: (message: string) => Error): { id: number; first: Promise<A>; last: Promise<B> } {
    let onFirst!: (a: A) => void;
    let onFail!: (e: Error) => void;
    const firstAnswer = new Promise<A>((resolve, reject) => { onFirst = resolve; onFail = reject; });
    let id = 0;
    const lastAnswer = new Promise<B>((resolve, reject) => {
      id = this.request(req, (m) => {
        const a = first(m);
        if (a !== undefined) {
          onFirst(a);
          return false;
        }
        const b = last(m);
        if (b !== undefined) {
          resolve(b);
          return true;
        }
        const err = failure(m.type === 'error' ? m.message : `unexpected answer ${m.type}`);
        onFail(err);
        reject(err);
        return true;
      });
    });
    firstAnswer.catch(() => undefined);
    lastAnswer.catch(() => undefined);
    return { id, first: firstAnswer, last: lastAnswer };
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

function asBuffer(a: Uint8Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}
