/**
 * How the server talks to the agent inside one sandbox, whatever runs it: what a driver hands back
 * (`RuntimeSandbox.channel`) instead of a concrete channel class. The built-in drivers return the
 * JSON-lines `AgentChannel` of packages/server; a driver may return anything that keeps this
 * contract (a remote node's proxy, for one).
 */
import type { AgentOp, AgentReplies, AgentRequestBody, ExecStreamMessage } from '@podflare/protocol';

/** The final message of an exec stream. */
export type ExecExit = Extract<ExecStreamMessage, { type: 'exit' }>;

/** An exec's output (stdout, stderr, result, error): the stream before its exit. */
export type ExecOutputMessage = Exclude<ExecStreamMessage, { type: 'exit' }>;

/**
 * Sees one exec output message. Returning a promise holds the channel (no further message is read
 * from the agent) until it settles: how a consumer whose own buffer is full applies backpressure.
 * The exit is not among them: it is what `exec` resolves with (one path for it, end to end).
 */
export type ExecEventSink = (msg: ExecOutputMessage) => void | Promise<void>;

/** The client's lifecycle events: `close` (why), `violation` (what the agent did wrong, for the log). */
export type AgentClientEvent = 'close' | 'violation';

export interface AgentClient {
  /** True once the client can no longer reach the agent. */
  readonly closed: boolean;
  /** Why it closed (null while open). */
  readonly closeReason: string | null;
  /**
   * One request (files, fork, variables, interrupt, …: every op but exec); resolves with the
   * agent's `ok` answer, validated against the op's reply schema; rejects with a domain error.
   */
  request<B extends AgentRequestBody<Exclude<AgentOp, 'exec'>>>(body: B): Promise<AgentReplies[B['op']]>;
  /** Runs code; `onEvent` sees its output, the promise resolves with the final `exit`. */
  exec(body: AgentRequestBody<'exec'>, onEvent: ExecEventSink): Promise<ExecExit>;
  /**
   * For checks of the agent's answers made outside the client (a listing's names, fork pids):
   * reports the violation like the client's own and returns the error to throw.
   */
  protocolViolation(what: string): Error;
  /** Closes the channel (the sandbox cannot be driven after); idempotent. */
  close(reason?: string): void;
  on(event: AgentClientEvent, listener: (detail: string) => void): unknown;
  once(event: AgentClientEvent, listener: (detail: string) => void): unknown;
  off(event: AgentClientEvent, listener: (detail: string) => void): unknown;
}
