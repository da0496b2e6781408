/**
 * Every error the SDK throws is a {@link PodflareError}; each subclass is a failure the caller can
 * act on. HTTP answers are mapped to classes by their stable `code` in one table
 * ({@link ERROR_CLASSES}), falling back to the status when the body is not ours (a proxy's 502 page).
 *
 * What is NOT an exception: a non-zero exit code and an `error` event inside an exec's NDJSON stream
 * (an uncaught exception in the user's code). Those are results, found on `Execution.error`.
 */
import { codeForStatus, isErrorCode, RETRYABLE_ERROR_CODES } from '@podflare/protocol/errors';
import type { ErrorCode } from '@podflare/protocol/errors';

/**
 * Codes the SDK produces itself, for failures without a server answer: `connection_error` (the
 * server could not be reached or the connection dropped) and `invalid_response` (the server answered
 * something that is not the API, e.g. a broken NDJSON line).
 */
export type ClientErrorCode = 'connection_error' | 'invalid_response';

/** Every value of {@link PodflareError.code}: the server's stable codes plus the SDK's own. */
export type PodflareErrorCode = ErrorCode | ClientErrorCode;

/** What every {@link PodflareError} constructor takes besides its message. */
export interface PodflareErrorInit {
  /** The stable code, e.g. `not_found`. */
  code: PodflareErrorCode;
  /** The HTTP status, or `0` when the error did not come from an HTTP answer. */
  status: number;
  /** The request field the error is about, when the server named one. */
  field?: string;
  /** The underlying error (a socket error, a JSON parse error). */
  cause?: unknown;
}

/** The protocol's retryable codes, plus a failed connection (the same call may well get through). */
const RETRYABLE_CODES: ReadonlySet<PodflareErrorCode> = new Set<PodflareErrorCode>([...RETRYABLE_ERROR_CODES, 'connection_error']);

/**
 * The root of every error the SDK throws.
 *
 * @example
 * ```ts
 * try {
 *   await sandbox.runCode('print(1)');
 * } catch (err) {
 *   if (err instanceof SandboxGoneError) sandbox = await Sandbox.create();
 *   else if (err instanceof PodflareError && err.retryable) { ... }
 *   else throw err;
 * }
 * ```
 */
export class PodflareError extends Error {
  override name = 'PodflareError';
  /** The stable code: the server's `code` field, or one of the SDK's own {@link ClientErrorCode}s. */
  readonly code: PodflareErrorCode;
  /** The HTTP status of the answer, or `0` when there was no answer (connection error, client timeout). */
  readonly status: number;
  /** The request field the error is about, when the server named one (e.g. `timeout_ms`). */
  readonly field?: string;

  /**
   * @param message For errors from the server, its `error` string verbatim.
   */
  constructor(message: string, init: PodflareErrorInit) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.code = init.code;
    this.status = init.status;
    if (init.field !== undefined) this.field = init.field;
  }

  /** True when the same call may succeed if tried again later (rate limit, overload, timeout, network). */
  get retryable(): boolean {
    return RETRYABLE_CODES.has(this.code);
  }
}

/**
 * The request was malformed: a missing or ill-typed field ({@link PodflareError.field} names it), an
 * unknown language, a bad path (400). Also used for 405/415 and for invalid arguments the SDK catches
 * before sending anything (then `status` is 0).
 */
export class BadRequestError extends PodflareError {
  override name = 'BadRequestError';
}

/** The API key is missing or wrong (401): set `PODFLARE_API_KEY` or pass `apiKey`. */
export class AuthenticationError extends PodflareError {
  override name = 'AuthenticationError';
}

/** The API key may not touch that sandbox (403). */
export class ForbiddenError extends PodflareError {
  override name = 'ForbiddenError';
}

/** Unknown sandbox (or one retired by a merge), unknown file, or unknown route (404). */
export class NotFoundError extends PodflareError {
  override name = 'NotFoundError';
}

/** The operation conflicts with the sandbox's current state (409). */
export class ConflictError extends PodflareError {
  override name = 'ConflictError';
}

/** The sandbox's runtime cannot do this (422), e.g. checkpoints on a runtime that cannot fork: the message says what it can. */
export class NotSupportedError extends PodflareError {
  override name = 'NotSupportedError';
}

/**
 * The sandbox existed but was destroyed: deleted, idle timeout, lifetime reached or crashed (410).
 * Create a new one; raise `idleTimeoutSeconds` if it timed out while you were not using it.
 */
export class SandboxGoneError extends PodflareError {
  override name = 'SandboxGoneError';
}

/** The request body is over the server's cap (413). JSON bodies are capped at 8 MiB: send files with `upload`. */
export class PayloadTooLargeError extends PodflareError {
  override name = 'PayloadTooLargeError';
}

/** Too many requests or sandboxes (429). Wait {@link RateLimitError.retryAfterMs} before trying again. */
export class RateLimitError extends PodflareError {
  override name = 'RateLimitError';
  /** How long the server asked to wait, from its `Retry-After` header; undefined when it did not say. */
  readonly retryAfterMs?: number;

  constructor(message: string, init: PodflareErrorInit & { retryAfterMs?: number }) {
    super(message, init);
    if (init.retryAfterMs !== undefined) this.retryAfterMs = init.retryAfterMs;
  }
}

/**
 * The sandbox did not answer in time (504, `status` 504), or the server did not answer within the
 * client's `requestTimeoutMs` (`status` 0). For long calls raise `requestTimeoutMs`.
 */
export class TimeoutError extends PodflareError {
  override name = 'TimeoutError';
}

/**
 * The server failed (5xx): a bug (`internal`), it cannot start a sandbox now (`unavailable`, 503), or
 * the sandbox's agent broke the protocol (`agent_protocol`, 502).
 */
export class ServerError extends PodflareError {
  override name = 'ServerError';
}

/**
 * The server could not be reached, or the connection dropped mid-answer (`status` 0). The message
 * names the host; check `PODFLARE_HOST` (or the `host` option) and that `podflare serve` runs there.
 */
export class ConnectionError extends PodflareError {
  override name = 'ConnectionError';
}

/**
 * The sandbox's disk is full (507): its own disk limit (`limits.diskMb`) is reached, or the server's
 * disk volume, shared by every sandbox, is. Free space in the sandbox (or ask for a larger
 * `diskMb`) and try again; other sandboxes are not affected.
 */
export class InsufficientStorageError extends PodflareError {
  override name = 'InsufficientStorageError';
}

type ErrorClass = new (message: string, init: PodflareErrorInit & { retryAfterMs?: number }) => PodflareError;

/** The one table mapping the server's stable codes to error classes (exhaustive over `ErrorCode`). */
export const ERROR_CLASSES = {
  bad_request: BadRequestError,
  unauthorized: AuthenticationError,
  forbidden: ForbiddenError,
  not_found: NotFoundError,
  method_not_allowed: BadRequestError,
  conflict: ConflictError,
  sandbox_gone: SandboxGoneError,
  payload_too_large: PayloadTooLargeError,
  unsupported_media_type: BadRequestError,
  rate_limited: RateLimitError,
  internal: ServerError,
  agent_protocol: ServerError,
  unavailable: ServerError,
  timeout: TimeoutError,
  insufficient_storage: InsufficientStorageError,
  checkpoint_not_found: NotFoundError,
  not_supported: NotSupportedError,
  node_unavailable: ServerError,
  no_capacity: ServerError,
} as const satisfies Record<ErrorCode, ErrorClass>;

/** Parses a `Retry-After` header (delta seconds or an HTTP date) into milliseconds from now. */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const raw = Array.isArray(value) ? value[0] : value;
  if (raw === undefined || raw.trim() === '') return undefined;
  const trimmed = raw.trim();
  if (/^\d+(\.\d+)?$/.test(trimmed)) return Math.round(Number(trimmed) * 1000);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}

/**
 * Builds the error for a non-2xx HTTP answer. `body` is the answer's text; when it is our JSON error
 * body the message is its `error` string verbatim and the class comes from its `code`; otherwise the
 * class comes from the status (unknown 5xx → {@link ServerError}).
 */
export function errorFromResponse(
  status: number,
  body: string,
  headers: { 'retry-after'?: string | string[] | undefined },
  context: string,
): PodflareError {
  let message: string | undefined;
  let code: ErrorCode | undefined;
  let field: string | undefined;
  try {
    const parsed: unknown = JSON.parse(body);
    if (parsed !== null && typeof parsed === 'object') {
      const obj = parsed as Record<string, unknown>;
      if (typeof obj.error === 'string') message = obj.error;
      if (isErrorCode(obj.code)) code = obj.code;
      if (typeof obj.field === 'string') field = obj.field;
    }
  } catch {
    // Not our JSON (a proxy's HTML page, an empty body): fall back to the status below.
  }
  code ??= codeForStatus(status);
  if (message === undefined) {
    const snippet = body.trim().slice(0, 200);
    message = `HTTP ${status} from ${context}${snippet ? `: ${snippet}` : ''}`;
  }
  const init: PodflareErrorInit & { retryAfterMs?: number } = { code, status };
  if (field !== undefined) init.field = field;
  if (code === 'rate_limited') {
    const retryAfterMs = parseRetryAfter(headers['retry-after']);
    if (retryAfterMs !== undefined) init.retryAfterMs = retryAfterMs;
  }
  // A status without a code of its own (e.g. a proxy's 502) got the closest code above, by family.
  const Class: ErrorClass = ERROR_CLASSES[code];
  return new Class(message, init);
}
