/**
 * A long-lived Python helper of the server (packages/server/host/*.py) speaking JSON lines on its
 * stdin/stdout: a request carries an `id` and is answered `{id, ok, error?, ...}`; a line without
 * an `id` is an event. Started on first use (or by `start()`), and again on the next call after it
 * has exited.
 *
 * Nothing the helper does (or fails to do) may crash the server: writes to a dead helper's stdin
 * (EPIPE) are caught, a reply line longer than `maxLineChars` or one that is not JSON kills the
 * helper with an error, and a call may carry a timeout after which the helper is killed. The
 * helper answers in order, so the oldest pending call is the one it is working on: its timer runs
 * from when it became that call, not from when it was queued.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { LineReader } from './line-reader.js';

export interface HelperProcessOptions {
  /** The helper's script (run by the system's python3, isolated mode). */
  script: string;
  /** How errors name it: "<name>: <error>", "<name> exited". */
  name: string;
  /** Lines without an `id`. */
  onEvent?: (msg: Record<string, unknown>) => void;
  /** After it has exited and every pending call has been failed. */
  onExit?: (exit: HelperExit) => void;
  /** Idle, it does not keep the server's process alive (a caller waiting on it has its own timer). */
  unref?: boolean;
  /** The longest reply line accepted; a longer one kills the helper. @default 64 Mi characters */
  maxLineChars?: number;
}

/** How a helper process ended. */
export interface HelperExit {
  pid: number | undefined;
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Ended by `close()` (the server no longer needs it), not by a fault. */
  expected: boolean;
  /** Why the server killed it (a timeout, a bad reply), when it did. */
  reason?: Error;
}

export interface CallOptions {
  /** Fail the call, and kill the helper (it is stuck), when it has worked on it this long. */
  timeoutMs?: number;
}

/** Something went wrong with a helper (not an error the helper answered). */
export class HelperError extends Error {
  override name = 'HelperError';
}

/** A call the helper did not answer in time; the helper was killed. */
export class HelperTimeoutError extends HelperError {
  override name = 'HelperTimeoutError';
  constructor(helper: string, readonly op: string, readonly timeoutMs: number) {
    super(`${helper}: ${op} timed out after ${timeoutMs} ms (the helper was killed)`);
  }
}

/** The helper ended with this call pending. */
export class HelperExitedError extends HelperError {
  override name = 'HelperExitedError';
  constructor(
    message: string,
    /** The helper had begun this call (it was the oldest pending); the others never started. */
    readonly started: boolean,
  ) {
    super(message);
  }
}

const DEFAULT_MAX_LINE_CHARS = 64 * 1024 * 1024;

interface Pending {
  op: string;
  timeoutMs?: number;
  timer?: NodeJS.Timeout;
  resolve(v: Record<string, unknown>): void;
  reject(e: Error): void;
}

export class HelperProcess {
  private child: ChildProcess | null = null;
  private nextId = 1;
  /** In the order sent: the first is the one the helper is working on. */
  private readonly pending = new Map<number, Pending>();
  /** Why the current child is being killed (set before the kill, reported at its exit). */
  private killReason: { error: Error; expected: boolean } | null = null;
  /** The current child has exited, but its pipes are not drained yet ('close' comes later). */
  private childExited = false;

  constructor(private readonly o: HelperProcessOptions) {}

  /** The running helper's pid (undefined before it starts or after it ended). */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Started and not known to have exited. */
  get running(): boolean {
    return this.child !== null && !this.childExited;
  }

  /** Starts the helper now, if it is not running. */
  start(): void {
    this.child ??= this.spawnChild();
  }

  call(req: Record<string, unknown>, opts: CallOptions = {}): Promise<Record<string, unknown>> {
    const child = (this.child ??= this.spawnChild());
    if (this.childExited) {
      return Promise.reject(new HelperExitedError(`${this.o.name} exited; ${String(req.op)} had not started`, false));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { op: String(req.op), timeoutMs: opts.timeoutMs, resolve, reject });
      this.armHead();
      // A dead pipe is reported by the stream's 'error' event and then by the exit, which fails
      // this call: nothing to do here.
      child.stdin?.write(JSON.stringify({ ...req, id }) + '\n');
    });
  }

  /** Kills the helper: it is no longer needed. Pending calls fail. */
  close(): void {
    this.kill(new HelperError(`${this.o.name} closed`), true);
  }

  /** Kills the helper because of `reason` (a fault): pending calls fail, `onExit` reports it. */
  kill(reason: Error, expected = false): void {
    const child = this.child;
    if (!child) return;
    this.killReason ??= { error: reason, expected };
    child.kill('SIGKILL');
  }

  private spawnChild(): ChildProcess {
    const child = spawn('/usr/bin/python3', ['-I', this.o.script], { stdio: ['pipe', 'pipe', 'inherit'] });
    this.killReason = null;
    this.childExited = false;
    child.once('exit', () => { if (this.child === child) this.childExited = true; });
    if (this.o.unref) {
      child.unref();
      (child.stdin as unknown as { unref?: () => void }).unref?.();
      (child.stdout as unknown as { unref?: () => void }).unref?.();
    }
    // Without these, a helper that died (or could not start) crashes the server with an
    // unhandled 'error' (EPIPE on the next write, ENOENT at spawn): its exit tells callers instead.
    child.on('error', (err) => {
      this.kill(new HelperError(`${this.o.name}: ${err.message}`));
      // Never started (no pid): there will be no 'exit' to report it.
      if (child.pid === undefined) onExit(null, null);
    });
    child.stdin!.on('error', () => undefined);
    child.stdout!.on('error', () => undefined);
    const lines = new LineReader(this.o.maxLineChars ?? DEFAULT_MAX_LINE_CHARS);
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      if (this.child !== child || this.killReason) return;
      let got: string[];
      try {
        got = lines.push(d);
      } catch (err) {
        this.kill(new HelperError(`${this.o.name}: ${(err as Error).message}`));
        return;
      }
      for (const line of got) {
        if (!this.handleLine(line)) return;
      }
    });
    let exited = false;
    const onExit = (code: number | null, signal: NodeJS.Signals | null) => {
      if (exited) return;
      exited = true;
      if (this.child === child) {
        this.child = null;
        this.childExited = false;
      }
      const killed = this.killReason;
      this.killReason = null;
      const ended = killed?.error.message ?? `${this.o.name} exited (${signal ?? `code ${code}`})`;
      let first = true;
      for (const [id, p] of this.pending) {
        this.pending.delete(id);
        clearTimeout(p.timer);
        if (first && killed?.error instanceof HelperTimeoutError) p.reject(killed.error);
        else p.reject(new HelperExitedError(first ? ended : `${ended}; ${p.op} had not started`, first));
        first = false;
      }
      this.o.onExit?.({ pid: child.pid, code, signal, expected: killed?.expected ?? false, reason: killed?.error });
    };
    // 'close', not 'exit': replies it wrote before it ended are read first.
    child.once('close', onExit);
    return child;
  }

  /** One reply or event; false when the line was bad and the helper is being killed. */
  private handleLine(line: string): boolean {
    let msg: Record<string, unknown> & { id?: number; ok?: boolean; error?: string };
    try {
      msg = JSON.parse(line) as typeof msg;
      if (msg === null || typeof msg !== 'object') throw new Error('not an object');
    } catch (err) {
      this.kill(new HelperError(`${this.o.name}: unreadable reply (${(err as Error).message}): ${line.slice(0, 200)}`));
      return false;
    }
    if (msg.id === undefined || msg.id === null) {
      this.o.onEvent?.(msg);
      return true;
    }
    const p = this.pending.get(msg.id);
    if (!p) return true;
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    this.armHead();
    if (msg.ok) p.resolve(msg);
    else p.reject(new Error(`${this.o.name}: ${msg.error}`));
    return true;
  }

  /** Starts the timer of the call the helper is now working on (the oldest pending). */
  private armHead(): void {
    const head = this.pending.values().next();
    if (head.done) return;
    const p = head.value;
    if (p.timer || p.timeoutMs === undefined) return;
    p.timer = setTimeout(() => this.kill(new HelperTimeoutError(this.o.name, p.op, p.timeoutMs!)), p.timeoutMs);
  }
}
