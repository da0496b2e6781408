/**
 * The server's end of the JSON-lines channel to one in-sandbox agent (protocol: @podflare/protocol
 * agent.ts). The agent is inside the sandbox and so untrusted (a VM guest is root in its own kernel;
 * code in a namespace sandbox can take its agent's channel over): every line is size-capped, every
 * message validated against the schema of the request it answers, and a misbehaving agent only ever
 * breaks its own sandbox.
 *
 * Memory this channel can be made to hold (per sandbox): one partial line (MAX_LINE_BYTES) plus one
 * read from the socket (at most 64 KiB) while a consumer holds the channel (`onEvent` returning a
 * promise pauses reading until it settles: backpressure from a slow HTTP client reaches the agent,
 * whose writes then block in its own sandbox).
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import {
  AgentMessage, AgentReplySchemas, AGENT_PROTOCOL_VERSION,
  type AgentOp, type AgentReplies, type AgentRequestBody, type ExecStreamMessage,
} from '@podflare/protocol';
import type { ErrorCode } from '@podflare/protocol/errors';
import { isErrorCode } from '@podflare/protocol/errors';
import type { z } from 'zod';
import { ApiError } from './errors.js';

/** Longest line accepted from an agent: a 1 MiB file chunk in base64 plus slack. */
export const MAX_LINE_BYTES = 4 * 1024 * 1024;

export interface Hello { version: number; pid: number; hostname: string }
type ExitMsg = Extract<ExecStreamMessage, { ev: 'exit' }>;

/**
 * Sees one exec stream message. Returning a promise holds the channel (no further message is read
 * from the agent) until it settles: how a consumer whose own buffer is full applies backpressure.
 */
export type ExecEventSink = (msg: ExecStreamMessage) => void | Promise<void>;

interface Pending {
  body: AgentRequestBody;
  resolve(msg: Record<string, unknown>): void;
  reject(err: Error): void;
  onEvent?: ExecEventSink;
}

/** Thrown when the agent answers `ok: false`; carries the agent's code so the API can map it. */
export class AgentError extends ApiError {}

export class ChannelClosedError extends ApiError {
  constructor(reason: string) {
    super('sandbox_gone', `the sandbox's agent is gone: ${reason}`);
  }
}

/** The agent answered something the protocol does not allow: that request ends with a 502. */
export class AgentProtocolError extends ApiError {
  constructor(what: string) {
    super('agent_protocol', `sandbox agent protocol violation: ${what}`);
  }
}

/** The first zod issue as "field: problem". */
function describeIssue(error: z.ZodError): string {
  const issue = error.issues[0];
  if (!issue) return 'invalid';
  const field = issue.path.map(String).join('.');
  return field ? `${field}: ${issue.message}` : issue.message;
}

/** Checks of a reply that depend on its request (beyond the op's schema); a problem, or null. */
function replyProblem(body: AgentRequestBody, reply: Record<string, unknown>): string | null {
  if (body.op === 'file_read') {
    const data = reply.data as string;
    if (data.length > Math.ceil(body.length / 3) * 4) return `data: longer than the ${body.length} bytes asked for`;
  }
  if (body.op === 'fork') {
    const pids = reply.pids as number[];
    if (pids.length > body.children.length) return `pids: ${pids.length} for ${body.children.length} children`;
    if (new Set(pids).size !== pids.length) return 'pids: not distinct';
  }
  return null;
}

export class AgentChannel extends EventEmitter<{ close: [string]; violation: [string] }> {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private closedReason: string | null = null;
  private hello: Hello | null = null;
  private helloWaiters: Array<(h: Hello) => void> = [];
  /** Consumers holding the channel (reading paused while > 0). */
  private holds = 0;
  /** What was read but not yet handled when a hold began. */
  private stash: Buffer | null = null;

  constructor(private readonly socket: Duplex) {
    super();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.close(`channel error: ${err.message}`));
    socket.on('close', () => this.close('channel closed'));
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }

  /** Why the channel closed (null while open). */
  get closeReason(): string | null {
    return this.closedReason;
  }

  /** Resolves with the agent's hello; rejects if the channel closes or `timeoutMs` passes first. */
  waitHello(timeoutMs: number): Promise<Hello> {
    if (this.hello) return Promise.resolve(this.hello);
    if (this.closedReason) return Promise.reject(new ChannelClosedError(this.closedReason));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new ApiError('timeout', `the agent did not start within ${timeoutMs} ms`)), timeoutMs);
      const onClose = (reason: string) => { clearTimeout(timer); reject(new ChannelClosedError(reason)); };
      this.once('close', onClose);
      this.helloWaiters.push((h) => { clearTimeout(timer); this.off('close', onClose); resolve(h); });
    });
  }

  /** Sends one request and resolves with the agent's `ok` answer, validated against the op's reply schema. */
  request<B extends AgentRequestBody<Exclude<AgentOp, 'exec'>>>(body: B): Promise<AgentReplies[B['op']]> {
    return this.send(body) as Promise<AgentReplies[B['op']]>;
  }

  /** Runs an exec; `onEvent` sees every stream message, the promise resolves with the final `exit`. */
  exec(body: AgentRequestBody<'exec'>, onEvent: ExecEventSink): Promise<ExitMsg> {
    return this.send(body, onEvent) as unknown as Promise<ExitMsg>;
  }

  close(reason = 'closed by server'): void {
    if (this.closedReason) return;
    this.closedReason = reason;
    for (const p of this.pending.values()) p.reject(new ChannelClosedError(reason));
    this.pending.clear();
    this.stash = null;
    this.buffered = [];
    this.socket.destroy();
    this.emit('close', reason);
  }

  private send(body: AgentRequestBody, onEvent?: ExecEventSink): Promise<Record<string, unknown>> {
    if (this.closedReason) return Promise.reject(new ChannelClosedError(this.closedReason));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { body, resolve, reject, onEvent });
      this.socket.write(JSON.stringify({ ...body, id }) + '\n');
    });
  }

  /** Stops reading from the agent until `until` settles (several holds may overlap). */
  private hold(until: Promise<void>): void {
    if (this.holds++ === 0) this.socket.pause();
    void until.catch(() => undefined).then(() => {
      if (--this.holds > 0 || this.closedReason) return;
      const stash = this.stash;
      this.stash = null;
      if (stash) this.onData(stash);
      if (this.holds === 0 && !this.closedReason) this.socket.resume();
    });
  }

  private violation(what: string): void {
    this.emit('violation', what);
  }

  /**
   * For checks made outside the channel (a diff listing's contents, fork pids): reports the
   * violation like the channel's own (the sandbox manager logs it) and returns the error to throw.
   */
  protocolViolation(what: string): AgentProtocolError {
    this.violation(what);
    return new AgentProtocolError(what);
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    let nl = chunk.indexOf(10);
    while (nl !== -1) {
      const piece = chunk.subarray(start, nl);
      const line = this.buffered.length ? Buffer.concat([...this.buffered, piece]) : piece;
      this.buffered = [];
      this.bufferedBytes = 0;
      this.onLine(line);
      start = nl + 1;
      if (this.closedReason) return;
      if (this.holds > 0) {
        // A consumer is full: keep the rest of this read for when it has room.
        if (start < chunk.length) this.stash = chunk.subarray(start);
        return;
      }
      nl = chunk.indexOf(10, start);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.bufferedBytes += rest.length;
      if (this.bufferedBytes > MAX_LINE_BYTES) {
        this.violation(`a line longer than ${MAX_LINE_BYTES} bytes`);
        return this.close('agent sent an oversized line');
      }
      this.buffered.push(rest);
    }
  }

  private onLine(line: Buffer): void {
    if (line.length === 0 || this.closedReason) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line.toString('utf8'));
    } catch {
      this.violation('a line that is not JSON');
      return this.close('agent sent a line that is not JSON');
    }
    const result = AgentMessage.safeParse(parsed);
    if (!result.success) {
      // Attributable to a request: only that request fails. Otherwise nothing can be trusted.
      const id = (parsed as { id?: unknown } | null)?.id;
      const pending = typeof id === 'number' ? this.pending.get(id) : undefined;
      const what = `invalid message: ${describeIssue(result.error)}`;
      if (pending) return this.fail(id as number, pending, `${pending.body.op}: ${what}`);
      this.violation(what);
      return this.close(`agent sent an invalid message: ${describeIssue(result.error)}`);
    }
    const msg = result.data as Record<string, unknown>;
    if (msg.ev === 'hello') {
      if (msg.version !== AGENT_PROTOCOL_VERSION) return this.close(`agent speaks protocol ${String(msg.version)}, server ${AGENT_PROTOCOL_VERSION}`);
      this.hello = msg as unknown as Hello;
      for (const w of this.helloWaiters.splice(0)) w(this.hello);
      return;
    }
    if (typeof msg.id !== 'number') return; // the agent refused a line it could not read: nothing waits for it
    const id = msg.id;
    const pending = this.pending.get(id);
    if (!pending) return; // an answer to a request we gave up on
    const op = pending.body.op;
    if ('ok' in msg) {
      if (!msg.ok) {
        this.pending.delete(id);
        const err = msg.error as { code: string; message: string };
        const code: ErrorCode = isErrorCode(err.code) ? err.code : 'internal';
        return pending.reject(new AgentError(code, err.message));
      }
      if (op === 'exec') return this.fail(id, pending, 'exec: answered with ok instead of a stream ending in exit');
      const reply = AgentReplySchemas[op].safeParse(msg);
      if (!reply.success) return this.fail(id, pending, `${op} reply: ${describeIssue(reply.error)}`);
      const problem = replyProblem(pending.body, reply.data as Record<string, unknown>);
      if (problem) return this.fail(id, pending, `${op} reply: ${problem}`);
      this.pending.delete(id);
      return pending.resolve(reply.data as Record<string, unknown>);
    }
    if (op !== 'exec' || !pending.onEvent) return this.fail(id, pending, `${op}: answered with an exec stream event`);
    const event = msg as unknown as ExecStreamMessage;
    const held = pending.onEvent(event);
    if (held) this.hold(held);
    if (event.ev === 'exit') {
      this.pending.delete(id);
      pending.resolve(msg);
    }
  }

  /** Ends one request with a protocol violation (logged by whoever listens to 'violation'). */
  private fail(id: number, pending: Pending, what: string): void {
    this.pending.delete(id);
    this.violation(what);
    pending.reject(new AgentProtocolError(what));
  }
}
