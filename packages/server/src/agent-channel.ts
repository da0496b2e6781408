/**
 * The server's end of the JSON-lines channel to one in-sandbox agent (protocol: @podflare/protocol
 * agent.ts). The agent is inside the sandbox and so untrusted: every line is size-capped and
 * validated, and a misbehaving agent only ever breaks its own sandbox.
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import {
  AgentMessage, AGENT_PROTOCOL_VERSION,
  type AgentOp, type AgentReplies, type AgentRequestBody, type ExecStreamMessage,
} from '@podflare/protocol';
import type { ErrorCode } from '@podflare/protocol/errors';
import { isErrorCode } from '@podflare/protocol/errors';
import { ApiError } from './errors.js';

/** Longest line accepted from an agent: a 1 MiB file chunk in base64 plus slack. */
const MAX_LINE_BYTES = 4 * 1024 * 1024;

export interface Hello { version: number; pid: number; hostname: string }
type ExitMsg = Extract<ExecStreamMessage, { ev: 'exit' }>;

interface Pending {
  resolve(msg: Record<string, unknown>): void;
  reject(err: Error): void;
  onEvent?: (msg: ExecStreamMessage) => void;
}

/** Thrown when the agent answers `ok: false`; carries the agent's code so the API can map it. */
export class AgentError extends ApiError {}

export class ChannelClosedError extends ApiError {
  constructor(reason: string) {
    super('sandbox_gone', `the sandbox's agent is gone: ${reason}`);
  }
}

export class AgentChannel extends EventEmitter {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private closedReason: string | null = null;
  private hello: Hello | null = null;
  private helloWaiters: Array<(h: Hello) => void> = [];

  constructor(private readonly socket: Duplex) {
    super();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.close(`channel error: ${err.message}`));
    socket.on('close', () => this.close('channel closed'));
  }

  get closed(): boolean {
    return this.closedReason !== null;
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

  /** Sends one request and resolves with the agent's `ok` answer. */
  request<B extends AgentRequestBody<Exclude<AgentOp, 'exec'>>>(body: B): Promise<AgentReplies[B['op']]> {
    return this.send(body) as Promise<AgentReplies[B['op']]>;
  }

  /** Runs an exec; `onEvent` sees every stream message, the promise resolves with the final `exit`. */
  exec(body: AgentRequestBody<'exec'>, onEvent: (msg: ExecStreamMessage) => void): Promise<ExitMsg> {
    return this.send(body, onEvent) as unknown as Promise<ExitMsg>;
  }

  close(reason = 'closed by server'): void {
    if (this.closedReason) return;
    this.closedReason = reason;
    for (const p of this.pending.values()) p.reject(new ChannelClosedError(reason));
    this.pending.clear();
    this.socket.destroy();
    this.emit('close', reason);
  }

  private send(body: AgentRequestBody, onEvent?: (msg: ExecStreamMessage) => void): Promise<Record<string, unknown>> {
    if (this.closedReason) return Promise.reject(new ChannelClosedError(this.closedReason));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onEvent });
      this.socket.write(JSON.stringify({ ...body, id }) + '\n');
    });
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
      nl = chunk.indexOf(10, start);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.bufferedBytes += rest.length;
      if (this.bufferedBytes > MAX_LINE_BYTES) return this.close('agent sent an oversized line');
      this.buffered.push(rest);
    }
  }

  private onLine(line: Buffer): void {
    if (line.length === 0 || this.closedReason) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line.toString('utf8'));
    } catch {
      return this.close('agent sent a line that is not JSON');
    }
    const result = AgentMessage.safeParse(parsed);
    if (!result.success) return this.close(`agent sent an invalid message: ${result.error.issues[0]?.message ?? ''}`);
    const msg = result.data as Record<string, unknown>;
    if (msg.ev === 'hello') {
      if (msg.version !== AGENT_PROTOCOL_VERSION) return this.close(`agent speaks protocol ${String(msg.version)}, server ${AGENT_PROTOCOL_VERSION}`);
      this.hello = msg as unknown as Hello;
      for (const w of this.helloWaiters.splice(0)) w(this.hello);
      return;
    }
    if (typeof msg.id !== 'number') return; // the agent refused a line it could not read: nothing waits for it
    const pending = this.pending.get(msg.id);
    if (!pending) return; // an answer to a request we gave up on
    if ('ok' in msg) {
      this.pending.delete(msg.id as number);
      if (msg.ok) pending.resolve(msg);
      else {
        const err = msg.error as { code: string; message: string };
        const code: ErrorCode = isErrorCode(err.code) ? err.code : 'internal';
        pending.reject(new AgentError(code, err.message));
      }
      return;
    }
    pending.onEvent?.(msg as unknown as ExecStreamMessage);
    if (msg.ev === 'exit') {
      this.pending.delete(msg.id as number);
      pending.resolve(msg);
    }
  }
}
