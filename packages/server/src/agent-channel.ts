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
import { randomInt } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import {
  AgentMessage, AgentReplySchemas, AGENT_PROTOCOL_VERSION,
  type AgentOp, type AgentReplies, type AgentRequestBody, type ExecStreamMessage,
} from '@podflare/protocol';
import type { ErrorCode } from '@podflare/protocol/errors';
import { isErrorCode } from '@podflare/protocol/errors';
import { SandboxError, type AgentClient, type ExecEventSink, type ExecExit, type ExecOutputMessage } from '@podflare/runtime';
import type { z } from 'zod';
import { JsonlRpc, type CallStep, type RpcFault } from './jsonl/rpc.js';

/** Longest line accepted from an agent: a 1 MiB file chunk in base64 plus slack. */
export const MAX_LINE_BYTES = 4 * 1024 * 1024;

export interface Hello { version: number; pid: number; hostname: string }
type ExitMsg = ExecExit;
export type { ExecEventSink, ExecOutputMessage };

/** Thrown when the agent answers `ok: false`; carries the agent's code so the API can map it. */
export class AgentError extends SandboxError {}

export class ChannelClosedError extends SandboxError {
  constructor(reason: string) {
    super('sandbox_gone', `the sandbox's agent is gone: ${reason}`);
  }
}

/** The agent answered something the protocol does not allow: that request ends with a 502. */
export class AgentProtocolError extends SandboxError {
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

/** The built-in drivers' AgentClient: JSON lines over a socket to the agent. */
export class AgentChannel extends EventEmitter<{ close: [string]; violation: [string] }> implements AgentClient {
  /** Framing, correlation and backpressure; the protocol's rules are this class's. */
  private readonly rpc: JsonlRpc;
  private closedReason: string | null = null;
  private hello: Hello | null = null;
  private helloWaiters: Array<(h: Hello) => void> = [];

  constructor(private readonly socket: Duplex) {
    super();
    this.rpc = new JsonlRpc({
      readable: socket,
      writable: socket,
      maxLineBytes: MAX_LINE_BYTES,
      checkMessage: (msg) => {
        const result = AgentMessage.safeParse(msg);
        return result.success ? null : `invalid message: ${describeIssue(result.error)}`;
      },
      callError: (call, problem) => this.protocolViolation(`${call.label}: ${problem}`),
      onEvent: (msg) => this.onEvent(msg),
      onFault: (fault) => this.onFault(fault),
      // The agent may outlive this server (its holder keeps it): ids from a random start, so the
      // next server's calls are never confused with answers to ours (see runtime/namespace/holder.ts).
      firstId: randomInt(1, 2 ** 40),
    });
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
      const timer = setTimeout(() => reject(new SandboxError('timeout', `the agent did not start within ${timeoutMs} ms`)), timeoutMs);
      const onClose = (reason: string) => { clearTimeout(timer); reject(new ChannelClosedError(reason)); };
      this.once('close', onClose);
      this.helloWaiters.push((h) => { clearTimeout(timer); this.off('close', onClose); resolve(h); });
    });
  }

  /** Sends one request and resolves with the agent's `ok` answer, validated against the op's reply schema. */
  request<B extends AgentRequestBody<Exclude<AgentOp, 'exec'>>>(body: B): Promise<AgentReplies[B['op']]> {
    return this.send(body) as Promise<AgentReplies[B['op']]>;
  }

  /** Runs an exec; `onEvent` sees its output, the promise resolves with the final `exit` (not given to `onEvent`). */
  exec(body: AgentRequestBody<'exec'>, onEvent: ExecEventSink): Promise<ExitMsg> {
    return this.send(body, onEvent) as unknown as Promise<ExitMsg>;
  }

  close(reason = 'closed by server'): void {
    if (this.closedReason) return;
    this.closedReason = reason;
    this.rpc.close(() => new ChannelClosedError(reason));
    this.socket.destroy();
    this.emit('close', reason);
  }

  /**
   * For checks made outside the channel (a diff listing's contents, fork pids): reports the
   * violation like the channel's own (the sandbox manager logs it) and returns the error to throw.
   */
  protocolViolation(what: string): AgentProtocolError {
    this.violation(what);
    return new AgentProtocolError(what);
  }

  private send(body: AgentRequestBody, onEvent?: ExecEventSink): Promise<Record<string, unknown>> {
    if (this.closedReason) return Promise.reject(new ChannelClosedError(this.closedReason));
    return this.rpc.call<Record<string, unknown>>(body as Record<string, unknown>, {
      label: body.op,
      onMessage: (msg) => this.onReply(body, msg, onEvent),
    });
  }

  private violation(what: string): void {
    this.emit('violation', what);
  }

  /** A line the channel cannot use, naming no request: nothing from this agent can be trusted. */
  private onFault(fault: RpcFault): void {
    if (fault.kind === 'too_long') {
      this.violation(`a line longer than ${MAX_LINE_BYTES} bytes`);
      return this.close('agent sent an oversized line');
    }
    if (fault.kind === 'not_json') {
      this.violation('a line that is not JSON');
      return this.close('agent sent a line that is not JSON');
    }
    this.violation(fault.problem);
    this.close(`agent sent an invalid message: ${fault.problem.replace(/^invalid message: /, '')}`);
  }

  /** A message without an id: the hello (anything else without an id is a refusal nothing waits for). */
  private onEvent(msg: Record<string, unknown>): void {
    if (msg.type !== 'hello') return;
    if (msg.version !== AGENT_PROTOCOL_VERSION) return this.close(`agent speaks protocol ${String(msg.version)}, server ${AGENT_PROTOCOL_VERSION}`);
    this.hello = msg as unknown as Hello;
    for (const w of this.helloWaiters.splice(0)) w(this.hello);
  }

  /** One message answering `body` (validated against AgentMessage already). */
  private onReply(body: AgentRequestBody, msg: Record<string, unknown>, onEvent?: ExecEventSink): CallStep<Record<string, unknown>> {
    const op = body.op;
    if ('ok' in msg) {
      if (!msg.ok) {
        const err = msg.error as { code: string; message: string };
        const code: ErrorCode = isErrorCode(err.code) ? err.code : 'internal';
        return { done: true, error: new AgentError(code, err.message) };
      }
      if (op === 'exec') return this.fail('exec: answered with ok instead of a stream ending in exit');
      const reply = AgentReplySchemas[op].safeParse(msg);
      if (!reply.success) return this.fail(`${op} reply: ${describeIssue(reply.error)}`);
      const problem = replyProblem(body, reply.data as Record<string, unknown>);
      if (problem) return this.fail(`${op} reply: ${problem}`);
      return { done: true, value: reply.data as Record<string, unknown> };
    }
    if (op !== 'exec' || !onEvent) return this.fail(`${op}: answered with an exec stream event`);
    const event = msg as unknown as ExecStreamMessage;
    if (event.type === 'exit') return { done: true, value: msg };
    return { done: false, hold: onEvent(event) || undefined };
  }

  /** Ends one request with a protocol violation (logged by whoever listens to 'violation'). */
  private fail(what: string): CallStep<never> {
    return { done: true, error: this.protocolViolation(what) };
  }
}
