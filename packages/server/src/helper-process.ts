/**
 * A long-lived Python helper of the server (packages/server/host/*.py) speaking JSON lines on its
 * stdin/stdout: a request carries an `id` and is answered `{id, ok, error?, ...}`; a line without
 * an `id` is an event. Started on first use (or by `start()`), and again on the next call after it
 * has exited.
 *
 * The framing, correlation and timeouts are the shared JSON-lines RPC (jsonl/rpc.ts); this class
 * owns the process. Nothing the helper does (or fails to do) may crash the server: writes to a
 * dead helper's stdin (EPIPE) are caught, a reply line longer than `maxLineBytes` or one that is not JSON kills the
 * helper with an error, and a call may carry a timeout after which the helper is killed. The
 * helper answers in order, so the oldest pending call is the one it is working on: its timer runs
 * from when it became that call, not from when it was queued.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { JsonlRpc, type RpcFault } from './jsonl/rpc.js';

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
  /** The longest reply line accepted (UTF-8 bytes); a longer one kills the helper. @default 64 MiB */
  maxLineBytes?: number;
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

const DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024;

export class HelperProcess {
  private child: ChildProcess | null = null;
  /** The current child's RPC (its calls in the order sent: the first is the one it works on). */
  private rpc: JsonlRpc | null = null;
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

  /** Sends `req`; resolves with the helper's `ok` answer, rejects with its error (or the helper's end). */
  call(req: Record<string, unknown>, opts: CallOptions = {}): Promise<Record<string, unknown>> {
    this.start();
    const op = String(req.op);
    if (this.childExited) {
      return Promise.reject(new HelperExitedError(`${this.o.name} exited; ${op} had not started`, false));
    }
    return this.rpc!.call<Record<string, unknown>>(req, {
      label: op,
      timeoutMs: opts.timeoutMs,
      onMessage: (msg) => (msg.ok
        ? { done: true, value: msg }
        : { done: true, error: new Error(`${this.o.name}: ${String(msg.error)}`) }),
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
    this.rpc?.stopReading(); // what it says from now on is not trusted (nor waited for)
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
    const rpc = new JsonlRpc({
      readable: child.stdout!,
      writable: child.stdin!,
      maxLineBytes: this.o.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES,
      inOrder: true,
      onEvent: (msg) => this.o.onEvent?.(msg),
      onFault: (fault) => this.kill(new HelperError(`${this.o.name}: ${describeFault(fault)}`)),
      onTimeout: (call, timeoutMs) => this.kill(new HelperTimeoutError(this.o.name, call.label, timeoutMs)),
    });
    this.rpc = rpc;
    let exited = false;
    const onExit = (code: number | null, signal: NodeJS.Signals | null) => {
      if (exited) return;
      exited = true;
      if (this.child === child) {
        this.child = null;
        this.rpc = null;
        this.childExited = false;
      }
      const killed = this.killReason;
      this.killReason = null;
      const ended = killed?.error.message ?? `${this.o.name} exited (${signal ?? `code ${code}`})`;
      // The first pending call is the one it was working on; the others never started.
      rpc.close((call, index) => {
        if (index === 0 && killed?.error instanceof HelperTimeoutError) return killed.error;
        if (index === 0) return new HelperExitedError(ended, true);
        return new HelperExitedError(`${ended}; ${call.label} had not started`, false);
      });
      this.o.onExit?.({ pid: child.pid, code, signal, expected: killed?.expected ?? false, reason: killed?.error });
    };
    // 'close', not 'exit': replies it wrote before it ended are read first.
    child.once('close', onExit);
    return child;
  }
}

/** How a helper's unreadable output is reported. */
function describeFault(fault: RpcFault): string {
  if (fault.kind === 'too_long') return `a reply line is longer than ${fault.maxLineBytes} bytes`;
  if (fault.kind === 'not_json') return `unreadable reply (${fault.error.message}): ${fault.line.slice(0, 200)}`;
  return `unreadable reply (${fault.problem}): ${JSON.stringify(fault.message).slice(0, 200)}`;
}
