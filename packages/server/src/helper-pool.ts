/**
 * Several processes of one JSON-lines helper (see helper-process.ts), so that one slow or stuck
 * call cannot stall everyone else's: the helper itself stays single-threaded (the host helper
 * setns(2)es into mount namespaces, which a multi-threaded process cannot), so "more workers"
 * means more processes.
 *
 * - A call goes to an idle worker (the least recently used one, so every worker gets work), else
 *   to the one with the fewest calls in flight, preferring the one whose oldest call was sent last.
 * - Every call has a timeout (chosen by its op); a worker that misses it is killed and replaced.
 * - Set-up calls (`setUp`, e.g. the host helper's idmap: state held inside the process) run on
 *   every worker, and again on each replacement before it serves anything.
 * - A worker that dies is logged as an error, counted, and replaced at once (after a short,
 *   growing pause if replacements keep dying within seconds). Its call in progress fails; calls
 *   queued behind it (never started) go to another worker, unless pinned to it.
 * - A call may be pinned to a worker (state made by an earlier call lives there); when that worker
 *   is gone, it fails with a HelperWorkerGoneError.
 */
import type { Logger } from './log.js';
import { HelperError, HelperExitedError, HelperProcess, HelperTimeoutError, type HelperExit } from './helper-process.js';

/**
 * Why a worker was replaced (the label of the restarts counter): it died on its own, missed a
 * call's timeout, or was killed for a fault (an unreadable or oversized reply, a failed set-up).
 */
export type RestartReason = 'exit' | 'timeout' | 'fault';
export const RESTART_REASONS: readonly RestartReason[] = ['exit', 'timeout', 'fault'];

export interface HelperPoolOptions {
  script: string;
  /** How logs and errors name the helper. */
  name: string;
  /** How many processes. */
  size: number;
  /** The timeout of a call, by its op. */
  timeoutMs: (op: string) => number;
  log: Logger;
  maxLineBytes?: number;
}

/** A pinned call's worker has exited since the call it depends on. */
export class HelperWorkerGoneError extends HelperError {
  override name = 'HelperWorkerGoneError';
}

/** Which worker answered: pass it back to `callOn` for calls that depend on that answer. */
export interface WorkerRef {
  readonly index: number;
  readonly generation: number;
}

/** A worker crash-looping at start waits this long, doubling, before its next replacement. */
const RESTART_BACKOFF_MS = { first: 100, max: 5_000 };
/** A worker that lived less than this counts as having failed at start (backoff applies). */
const HEALTHY_AFTER_MS = 2_000;

interface Worker extends WorkerRef {
  proc: HelperProcess;
  /** Its set-up replayed; rejects if that failed (the worker is then killed). */
  ready: Promise<void>;
  load: number;
  /** When its calls in flight were sent (in `useCounter` ticks: strictly increasing). */
  busySince: number[];
  lastUsed: number;
  startedAt: number;
  /** Picked for calls (false once it failed its set-up or exited). */
  alive: boolean;
}

export class HelperPool {
  private readonly workers: Array<Worker | null>;
  private readonly setUps: Array<Record<string, unknown>> = [];
  private readonly restartCounts = new Map<RestartReason, number>(RESTART_REASONS.map((r) => [r, 0]));
  private readonly backoff: number[];
  private readonly restartTimers = new Set<NodeJS.Timeout>();
  private started = false;
  private closed = false;
  private generation = 0;
  private useCounter = 0;

  constructor(private readonly o: HelperPoolOptions) {
    if (!Number.isInteger(o.size) || o.size < 1) throw new Error(`${o.name}: at least one worker, got ${o.size}`);
    this.workers = new Array<Worker | null>(o.size).fill(null);
    this.backoff = new Array<number>(o.size).fill(0);
  }

  /** Workers replaced so far, by reason. */
  restarts(): Array<{ reason: RestartReason; count: number }> {
    return RESTART_REASONS.map((reason) => ({ reason, count: this.restartCounts.get(reason) ?? 0 }));
  }

  /**
   * Runs `req` on every worker now, and on every worker started later before it serves anything
   * (state the helper keeps in its process). Resolves when every live worker has done it.
   */
  async setUp(req: Record<string, unknown>): Promise<void> {
    this.startAll();
    this.setUps.push(req);
    // Straight into each worker's pipe, behind its own set-up: nothing sent later can overtake it.
    const onWorker = (w: Worker) => w.proc.call(req, { timeoutMs: this.o.timeoutMs(String(req.op)) }).catch((err: Error) => {
      // The worker died or hung (logged and counted): its replacement replays the set-up.
      if (!(err instanceof HelperError)) throw err;
    });
    try {
      await Promise.all(this.live().map(onWorker));
    } catch (err) {
      // The op itself failed: not replayed on new workers; the caller sees why and may retry.
      this.setUps.splice(this.setUps.indexOf(req), 1);
      throw err;
    }
  }

  /** Runs `req` on the least busy worker; `worker` names it for calls pinned to it. */
  async call(req: Record<string, unknown>): Promise<{ reply: Record<string, unknown>; worker: WorkerRef }> {
    for (let attempt = 0; ; attempt++) {
      const w = this.pick();
      try {
        return { reply: await this.run(w, req), worker: { index: w.index, generation: w.generation } };
      } catch (err) {
        // Queued behind a call that killed its worker, never started: another worker takes it.
        if (err instanceof HelperExitedError && !err.started && !this.closed && attempt < this.workers.length) continue;
        throw err;
      }
    }
  }

  /** Runs `req` on the worker that answered an earlier call; fails if it has exited since. */
  async callOn(ref: WorkerRef, req: Record<string, unknown>): Promise<Record<string, unknown>> {
    const w = this.workers[ref.index];
    if (!w || w.generation !== ref.generation || !w.alive || !w.proc.running) throw this.goneError(ref, String(req.op));
    try {
      return await this.run(w, req);
    } catch (err) {
      if (err instanceof HelperExitedError) throw this.goneError(ref, String(req.op), err);
      throw err;
    }
  }

  close(): void {
    this.closed = true;
    for (const t of this.restartTimers) clearTimeout(t);
    this.restartTimers.clear();
    for (const w of this.workers) w?.proc.close();
  }

  private goneError(ref: WorkerRef, op: string, cause?: Error): HelperWorkerGoneError {
    return new HelperWorkerGoneError(`${this.o.name}: ${op} needs worker #${ref.index}, which held what it works on and has exited`
      + (cause ? ` (${cause.message})` : ''));
  }

  private async run(w: Worker, req: Record<string, unknown>): Promise<Record<string, unknown>> {
    const op = String(req.op);
    w.load++;
    const since = (w.lastUsed = ++this.useCounter);
    w.busySince.push(since);
    try {
      try {
        await w.ready;
      } catch (err) {
        throw new HelperExitedError(`${this.o.name}: worker #${w.index} failed its set-up: ${(err as Error).message}`, false);
      }
      return await w.proc.call(req, { timeoutMs: this.o.timeoutMs(op) });
    } finally {
      w.load--;
      w.busySince.splice(w.busySince.indexOf(since), 1);
    }
  }

  private live(): Worker[] {
    return this.workers.filter((w): w is Worker => w !== null && w.alive && w.proc.running);
  }

  private pick(): Worker {
    if (this.closed) throw new HelperError(`${this.o.name} closed`);
    this.startAll();
    const live = this.live();
    // Every worker is between a death and its (backed-off) replacement: start one now.
    if (live.length === 0) return this.spawn(0);
    const idle = live.filter((w) => w.load === 0);
    if (idle.length) return idle.reduce((a, b) => (b.lastUsed < a.lastUsed ? b : a));
    const oldest = (w: Worker) => Math.min(...w.busySince);
    return live.reduce((a, b) => (b.load < a.load || (b.load === a.load && oldest(b) > oldest(a)) ? b : a));
  }

  private startAll(): void {
    if (this.started || this.closed) return;
    this.started = true;
    for (let i = 0; i < this.workers.length; i++) this.spawn(i);
  }

  private spawn(index: number): Worker {
    const generation = ++this.generation;
    const proc = new HelperProcess({
      script: this.o.script,
      name: this.o.name,
      maxLineBytes: this.o.maxLineBytes,
      onExit: (exit) => this.onExit(worker, exit),
    });
    proc.start();
    // Written at once, in order: whatever is sent to this worker later comes after its set-up.
    const setUp = this.setUps.map((req) => proc.call(req, { timeoutMs: this.o.timeoutMs(String(req.op)) }));
    const worker: Worker = {
      index, generation, proc, load: 0, busySince: [], lastUsed: 0, startedAt: Date.now(), alive: true,
      ready: Promise.all(setUp).then(() => undefined),
    };
    worker.ready.catch((err: Error) => {
      if (!worker.alive) return; // its exit is reported already
      worker.alive = false; // picked no more; replaced when its exit is reported
      this.o.log.error(`${this.o.name} worker failed its set-up; replacing it`, { worker: index, pid: proc.pid, error: err.message });
      proc.kill(new HelperError(`${this.o.name}: set-up failed: ${err.message}`));
    });
    this.workers[index] = worker;
    return worker;
  }

  private onExit(worker: Worker, exit: HelperExit): void {
    worker.alive = false;
    if (exit.expected || this.closed) return;
    const reason: RestartReason = exit.reason === undefined ? 'exit' : exit.reason instanceof HelperTimeoutError ? 'timeout' : 'fault';
    this.restartCounts.set(reason, (this.restartCounts.get(reason) ?? 0) + 1);
    const lived = Date.now() - worker.startedAt;
    const i = worker.index;
    this.backoff[i] = lived < HEALTHY_AFTER_MS
      ? Math.min(RESTART_BACKOFF_MS.max, this.backoff[i]! ? this.backoff[i]! * 2 : RESTART_BACKOFF_MS.first) : 0;
    this.o.log.error(`${this.o.name} worker ${reason === 'exit' ? 'exited' : 'killed'}; replacing it`, {
      worker: i, pid: exit.pid, code: exit.code, signal: exit.signal, reason, error: exit.reason?.message,
      restart_in_ms: this.backoff[i],
    });
    if (this.workers[i] !== worker) return;
    if (this.backoff[i] === 0) {
      this.spawn(i);
      return;
    }
    const timer = setTimeout(() => {
      this.restartTimers.delete(timer);
      if (!this.closed && this.workers[i] === worker) this.spawn(i);
    }, this.backoff[i]);
    this.restartTimers.add(timer);
  }
}
