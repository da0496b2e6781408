/**
 * Stable error codes shared by the server (HTTP answers), the agent channel and both SDKs.
 * The HTTP status of each code is defined here once; the server maps codes to statuses and the
 * SDKs map codes back to exception classes (the Python SDK reads this table from the generated
 * python/podflare/protocol.json). Deliberately free of runtime dependencies so the SDK
 * can import it without pulling in zod.
 */
/** What the protocol says about one error code. */
export interface ErrorCodeSpec {
  /** The HTTP status of answers with this code. */
  readonly status: number;
  /** Whether the same call may succeed later unchanged (rate limit, overload, timeout). */
  readonly retryable: boolean;
  /** When a caller sees it (docs/api.md's error table is generated from these). */
  readonly description: string;
}

/**
 * The error table: every stable code with its HTTP status, retryability and meaning. The Python SDK,
 * the agent and docs/api.md get it through the generated protocol JSON (`npm run gen:protocol`).
 */
export const ERROR_TABLE = {
  bad_request: { status: 400, retryable: false, description: 'malformed JSON, a missing/ill-typed field (`field` names it), an unknown language, a bad path' },
  unauthorized: { status: 401, retryable: false, description: 'missing or wrong API key' },
  forbidden: {
    status: 403, retryable: false,
    description: 'the key may not touch that sandbox; a `Host` or `Origin` the server does not serve (see above)',
  },
  not_found: { status: 404, retryable: false, description: 'unknown sandbox id (or retired by merge), unknown file, unknown route' },
  method_not_allowed: { status: 405, retryable: false, description: 'wrong method on a known route' },
  conflict: { status: 409, retryable: false, description: "the operation conflicts with the sandbox's current state" },
  sandbox_gone: { status: 410, retryable: false, description: 'the sandbox existed but was destroyed (deleted, idle timeout, lifetime, crash)' },
  payload_too_large: {
    status: 413, retryable: false,
    description: 'request body over the cap (JSON bodies: 8 MiB; file uploads: no cap beyond disk, 507 when it is full)',
  },
  unsupported_media_type: { status: 415, retryable: false, description: 'a JSON endpoint got another content type, or a body without one' },
  rate_limited: {
    status: 429, retryable: true,
    description: 'too many requests or sandboxes; `Retry-After` header says when to retry',
  },
  internal: { status: 500, retryable: false, description: 'a bug; the message says what failed' },
  /** The sandbox's agent answered something the protocol does not allow (a hostile or broken agent). */
  agent_protocol: {
    status: 502, retryable: false,
    description: "the sandbox's agent answered something the protocol does not allow (logged as a protocol violation; only that request fails)",
  },
  /** A checkpoint id the sandbox does not have (never made, deleted, dropped from history, or another sandbox's). */
  checkpoint_not_found: {
    status: 404, retryable: false,
    description: "no such checkpoint of this sandbox: never made, deleted, dropped from its history, or another sandbox's",
  },
  /** The sandbox's runtime cannot do what was asked (e.g. checkpoints where it cannot fork). */
  not_supported: {
    status: 422, retryable: false,
    description: "the sandbox's runtime cannot do this (the message says what it can); see GET /v1/capacity for the runtimes offered",
  },
  unavailable: { status: 503, retryable: true, description: 'the server is shutting down or cannot start a sandbox now' },
  timeout: { status: 504, retryable: true, description: 'the sandbox did not answer in time' },
  /** The sandbox's disk limit is reached, or the server's disk volume is full. */
  insufficient_storage: {
    status: 507, retryable: false,
    description: "a file write hit the sandbox's disk limit (`limits.disk_mb`) or the server's disk volume is full; other sandboxes stay writable",
  },
  /** Cluster mode: the host that owns the sandbox stopped heartbeating or cannot be reached from the gateway. */
  node_unavailable: {
    status: 503, retryable: true,
    description: "cluster mode: the host that runs the sandbox is not answering (stopped heartbeating, or unreachable from the gateway); the sandbox is kept, retry after `Retry-After`",
  },
  /** Cluster mode: no host could take the sandbox (or a fork's parent host is full). */
  no_capacity: {
    status: 503, retryable: true,
    description: "cluster mode: no host has room for the sandbox (a fork's children must fit on the parent's host); retry after `Retry-After`",
  },
} as const satisfies Record<string, ErrorCodeSpec>;

export type ErrorCode = keyof typeof ERROR_TABLE;

/** The HTTP status of each code (a view of {@link ERROR_TABLE}). */
export const ERROR_STATUS = Object.freeze(
  Object.fromEntries(Object.entries(ERROR_TABLE).map(([code, spec]) => [code, spec.status])),
) as { readonly [C in ErrorCode]: (typeof ERROR_TABLE)[C]['status'] };

/** The codes a caller may retry unchanged. */
export const RETRYABLE_ERROR_CODES: readonly ErrorCode[] = Object.freeze(
  (Object.keys(ERROR_TABLE) as ErrorCode[]).filter((code) => ERROR_TABLE[code].retryable),
);

/** The JSON body of every error answer: `error` is for people, `code` is for programs. */
export interface ErrorBody {
  error: string;
  code: ErrorCode;
  /** The request field the error is about, when there is one. */
  field?: string;
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(ERROR_TABLE, value);
}

/** Maps an HTTP status back to the closest code, for answers that carry no body we understand. */
export function codeForStatus(status: number): ErrorCode {
  // A bare 502 is a proxy's: agent_protocol always comes with our JSON body.
  for (const [code, s] of Object.entries(ERROR_STATUS)) if (s === status && code !== 'agent_protocol') return code as ErrorCode;
  return status >= 500 ? 'internal' : 'bad_request';
}
