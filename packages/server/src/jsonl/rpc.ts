/**
 * Id-correlated JSON-lines RPC over a byte stream (a socket, a child's stdio), shared by the
 * channel to an in-sandbox agent (untrusted) and the server's own helper processes.
 *
 * - A request is `{...body, id}` on one line; a line whose `id` matches a pending call goes to
 *   that call's handler (a reply, or one message of a stream tied to the call); a line without an
 *   `id` is an event; a line with an unknown id (a call given up on) is dropped.
 * - Lines are size-capped (LineFramer); a line that is not JSON, over the cap, or rejected by
 *   `checkMessage` while naming no pending call is a fault: the RPC reads nothing more and tells
 *   its owner, who ends the peer. The owner decides how; the RPC never kills anything itself.
 * - Backpressure: a handler may return a promise; reading stops (the stream is paused, the rest of
 *   the read is kept) until it settles.
 * - Timeouts: per call; with `inOrder` (a peer that works on one call at a time, in order) a
 *   call's timer starts when it becomes the oldest pending, i.e. when the peer starts it.
 * - At most `maxPending` calls wait at once; more are refused.
 * - `close(errorFor)` fails every pending call exactly once, with the error its owner chooses.
 */
import type { Readable, Writable } from 'node:stream';
import { LineFramer, LineTooLongError } from './line-framer.js';

/** A line the RPC could not use, naming no call: the peer cannot be trusted any more. */
export type RpcFault =
  | { kind: 'too_long'; maxLineBytes: number; error: LineTooLongError }
  | { kind: 'not_json'; line: string; error: Error }
  | { kind: 'invalid'; message: unknown; problem: string };

/** What a call's handler made of one message for it. */
export type CallStep<T> =
  | { done: true; value: T; hold?: Promise<void> }
  | { done: true; error: Error; hold?: Promise<void> }
  /** More messages follow (a stream); `hold` pauses reading until it settles. */
  | { done: false; hold?: Promise<void> };

export interface CallOptions<T> {
  /** How errors and timeouts name the call (its op). */
  label: string;
  /** Sees each message with this call's id; the default resolves with it. */
  onMessage?: (msg: Record<string, unknown>) => CallStep<T>;
  /** Calls `onTimeout` when the call has been pending (or, `inOrder`, worked on) this long. */
  timeoutMs?: number;
}

/** A call still pending, as its owner sees it when closing. */
export interface PendingCall {
  readonly id: number;
  readonly label: string;
}

export interface JsonlRpcOptions {
  readable: Readable;
  writable: Writable;
  maxLineBytes: number;
  /** Calls pending at once beyond which `call` is refused. @default 65536 */
  maxPending?: number;
  /** The peer answers one call at a time, in order (timeouts then run from when a call starts). */
  inOrder?: boolean;
  /**
   * Validates every parsed line (a problem, or null). A bad message whose `id` names a pending
   * call fails only that call (via `callError`); otherwise it is a fault.
   */
  checkMessage?: (msg: unknown) => string | null;
  /** The error a call fails with when its message was bad. */
  callError?: (call: PendingCall, problem: string) => Error;
  /** A line without an `id`; returning a promise pauses reading until it settles. */
  onEvent?: (msg: Record<string, unknown>) => void | Promise<void>;
  /** The peer sent what cannot be read; nothing more is read. The owner ends the peer. */
  onFault: (fault: RpcFault) => void;
  /** A call's timer ran out (it stays pending: the owner ends the peer, or closes). */
  onTimeout?: (call: PendingCall, timeoutMs: number) => void;
  /**
   * The first call's id (then one more each). A peer that may still answer an earlier owner's
   * calls (an agent adopted after a server restart) needs ids that cannot be those. @default 1
   */
  firstId?: number;
}

/** `call` refused: too many calls already pending, or the RPC closed. */
export class RpcRefusedError extends Error {
  override name = 'RpcRefusedError';
}

const DEFAULT_MAX_PENDING = 65_536;

interface Pending extends PendingCall {
  timeoutMs?: number;
  timer?: NodeJS.Timeout;
  onMessage?: (msg: Record<string, unknown>) => CallStep<unknown>;
  resolve(v: unknown): void;
  reject(e: Error): void;
}

export class JsonlRpc {
  private nextId = 1;
  /** In the order sent: with `inOrder`, the first is the one the peer works on. */
  private readonly pending = new Map<number, Pending>();
  private readonly framer: LineFramer;
  /** Closed or faulted: nothing more is read, nothing sent. */
  private stopped = false;
  private closedError: ((call: PendingCall) => Error) | null = null;
  private holds = 0;
  /** What was read but not yet framed when a hold began. */
  private stash: Buffer | null = null;

  constructor(private readonly o: JsonlRpcOptions) {
    this.framer = new LineFramer(o.maxLineBytes);
    this.nextId = o.firstId ?? 1;
    // Left attached (and flowing) once stopped: a process's 'close' waits for its pipes to end.
    o.readable.on('data', (chunk: Buffer) => this.feed(chunk));
  }

  /** Calls waiting for their answer. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /** Sends `body` with a fresh id; resolves with what the call's handler makes of its answer. */
  call<T = Record<string, unknown>>(body: Record<string, unknown>, opts: CallOptions<T>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError({ id: 0, label: opts.label }));
    if (this.pending.size >= (this.o.maxPending ?? DEFAULT_MAX_PENDING)) {
      return Promise.reject(new RpcRefusedError(`${opts.label}: ${this.pending.size} calls already pending`));
    }
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, {
        id, label: opts.label, timeoutMs: opts.timeoutMs, resolve: resolve as (v: unknown) => void, reject,
        onMessage: opts.onMessage as Pending['onMessage'],
      });
      if (this.o.inOrder) this.armHead();
      else this.arm(this.pending.get(id)!);
      // A dead pipe is reported by the stream's 'error' event (its owner's to handle).
      this.o.writable.write(JSON.stringify({ ...body, id }) + '\n');
    });
  }

  /** Reads nothing more (the peer is being ended); pending calls wait for `close`. */
  stopReading(): void {
    this.stopped = true;
    this.framer.reset();
    this.stash = null;
  }

  /** Stops reading and sending; every pending call fails once, with `errorFor(call)` (also later calls'). */
  close(errorFor: (call: PendingCall, index: number) => Error): void {
    if (this.closedError) return;
    this.stopped = true;
    this.closedError = (c) => errorFor(c, -1);
    this.framer.reset();
    this.stash = null;
    let index = 0;
    for (const p of [...this.pending.values()]) {
      this.pending.delete(p.id);
      clearTimeout(p.timer);
      p.reject(errorFor(p, index++));
    }
  }

  private feed(chunk: Buffer): void {
    if (this.stopped) return;
    let rest: Buffer | null;
    try {
      rest = this.framer.push(chunk, (line) => this.onLine(line) && !this.stopped && this.holds === 0);
    } catch (err) {
      if (!(err instanceof LineTooLongError)) throw err;
      return this.fault({ kind: 'too_long', maxLineBytes: err.maxLineBytes, error: err });
    }
    // A consumer is full: keep the rest of this read for when it has room.
    if (rest && !this.stopped) this.stash = rest;
  }

  /** One line; false when reading must stop. */
  private onLine(line: string): boolean {
    if (this.stopped) return false;
    if (line.length === 0) return true; // a blank line says nothing (whitespace is not JSON, though)
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch (err) {
      this.fault({ kind: 'not_json', line, error: err as Error });
      return false;
    }
    const problem = this.o.checkMessage?.(parsed) ?? (parsed === null || typeof parsed !== 'object' ? 'not an object' : null);
    const id = (parsed as { id?: unknown } | null)?.id;
    const call = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (problem !== null) {
      // Attributable to a call: only that call fails. Otherwise nothing can be trusted.
      if (call && this.o.callError) {
        this.settle(call, { done: true, error: this.o.callError(call, problem) });
        return true;
      }
      this.fault({ kind: 'invalid', message: parsed, problem });
      return false;
    }
    const msg = parsed as Record<string, unknown>;
    if (id === undefined || id === null) {
      const held = this.o.onEvent?.(msg);
      if (held) this.hold(held);
      return true;
    }
    if (!call) return true; // an answer to a call given up on
    const step: CallStep<unknown> = call.onMessage ? call.onMessage(msg) : { done: true, value: msg };
    this.settle(call, step);
    return true;
  }

  private settle(call: Pending, step: CallStep<unknown>): void {
    if (step.hold) this.hold(step.hold);
    if (!step.done) return;
    if (this.pending.get(call.id) !== call) return; // failed by a hold's owner meanwhile
    this.pending.delete(call.id);
    clearTimeout(call.timer);
    if (this.o.inOrder) this.armHead();
    if ('error' in step) call.reject(step.error);
    else call.resolve(step.value);
  }

  /** Stops reading until `until` settles (several holds may overlap). */
  private hold(until: Promise<void>): void {
    if (this.holds++ === 0) this.o.readable.pause();
    void until.catch(() => undefined).then(() => {
      if (--this.holds > 0 || this.stopped) return;
      const stash = this.stash;
      this.stash = null;
      if (stash) this.feed(stash);
      if (this.holds === 0 && !this.stopped) this.o.readable.resume();
    });
  }

  private fault(fault: RpcFault): void {
    this.stopped = true;
    this.framer.reset();
    this.stash = null;
    this.o.onFault(fault);
  }

  /** Starts the timer of the call the peer now works on (`inOrder`: the oldest pending). */
  private armHead(): void {
    const head = this.pending.values().next();
    if (!head.done) this.arm(head.value);
  }

  private arm(p: Pending): void {
    if (p.timer || p.timeoutMs === undefined) return;
    const ms = p.timeoutMs;
    p.timer = setTimeout(() => { if (this.pending.get(p.id) === p) this.o.onTimeout?.(p, ms); }, ms);
  }
}
