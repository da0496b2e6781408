/**
 * Events of `POST /v1/sandboxes/:id/exec`, one JSON object per NDJSON line. `stdout`, `stderr` and
 * `exit` are the hosted product's; `result` and `error` are ours (the code-interpreter standard).
 * Runtime-dependency free so the SDK can use it as is.
 */

/** A MIME bundle: `text/plain` always, plus any of html, png (base64), svg, json, markdown, latex. */
export type MimeBundle = Record<string, unknown> & { 'text/plain'?: string };

export interface ExecErrorInfo {
  name: string;
  value: string;
  traceback: string;
}

interface EventBase {
  /** Position of the event in its exec's stream, from 0. */
  seq: number;
  /** Milliseconds since the epoch when the server emitted the event. */
  ts: number;
}

export interface StdoutEvent extends EventBase { type: 'stdout'; data: string }
export interface StderrEvent extends EventBase { type: 'stderr'; data: string }
export interface ResultEvent extends EventBase {
  type: 'result';
  data: MimeBundle;
  /** True for the value of the cell's last expression; false for figures and display() calls. */
  is_main_result: boolean;
}
export interface ErrorEvent extends EventBase { type: 'error'; data: ExecErrorInfo }
export interface ExitEvent extends EventBase {
  type: 'exit';
  /** The exit code: 0 on success, 1 on an uncaught exception, n for SystemExit(n), 124 on timeout. */
  data: number;
  /** The interpreter's execution counter after this call (python only). */
  execution_count?: number | null;
  /** True when the interpreter had to be restarted (timeout or crash): its variables are gone. */
  state_lost?: boolean;
  /** ours: an atomic exec failed and everything it did was undone (its output stays as sent). */
  rolled_back?: boolean;
}

export type ExecEvent = StdoutEvent | StderrEvent | ResultEvent | ErrorEvent | ExitEvent;
export type ExecEventType = ExecEvent['type'];

/** Every exec event type, in no particular order (the Python SDK and agent read it from the protocol JSON). */
export const EXEC_EVENT_TYPES = ['stdout', 'stderr', 'result', 'error', 'exit'] as const satisfies readonly ExecEventType[];
// Fails to compile when an ExecEvent type is missing from the list above.
const execEventTypesComplete: Exclude<ExecEventType, (typeof EXEC_EVENT_TYPES)[number]> extends never ? true : never = true;
void execEventTypesComplete;

/** The exit codes the server and agent give an exec that did not end by itself. */
export const EXIT_CODES = Object.freeze({
  /** The exec hit its timeout (the same as coreutils' `timeout`). */
  timeout: 124,
  /** The exec was killed: its sandbox ended or its agent's channel broke mid-run (128 + SIGKILL). */
  killed: 137,
} as const);

/** Exit code reported when an exec hit its timeout (the same as coreutils' `timeout`). */
export const TIMEOUT_EXIT_CODE = EXIT_CODES.timeout;
/** Exit code reported when an exec was killed before it could exit (its sandbox ended). */
export const KILLED_EXIT_CODE = EXIT_CODES.killed;

/**
 * Events of a sandbox's life (`GET /v1/sandboxes/:id/events`), numbered per sandbox from 0. Today:
 * what its egress policy let through or stopped.
 */
export interface EgressEventData {
  /** The name or address asked for. */
  host: string;
  /** The port asked for (null for DNS). */
  port: number | null;
  /**
   * How it was asked: a plain HTTP request through the proxy, HTTP CONNECT, SOCKS5, a DNS query, or
   * a direct connection to port 80/443 of some address (taken over by the proxy).
   */
  via: 'http' | 'connect' | 'socks' | 'dns' | 'transparent';
  /** The address connected to (allowed attempts). */
  address?: string;
  /** Why it was denied. */
  reason?: string;
}

export interface EgressDeniedEvent extends EventBase { type: 'egress_denied'; data: EgressEventData }
export interface EgressAllowedEvent extends EventBase { type: 'egress_allowed'; data: EgressEventData }

export type SandboxEvent = EgressDeniedEvent | EgressAllowedEvent;
export type SandboxEventType = SandboxEvent['type'];

/** Every sandbox event type. */
export const SANDBOX_EVENT_TYPES = ['egress_denied', 'egress_allowed'] as const satisfies readonly SandboxEventType[];
const sandboxEventTypesComplete: Exclude<SandboxEventType, (typeof SANDBOX_EVENT_TYPES)[number]> extends never ? true : never = true;
void sandboxEventTypesComplete;
