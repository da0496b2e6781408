/**
 * Stable error codes shared by the server (HTTP answers), the agent channel and both SDKs.
 * The HTTP status of each code is defined here once; the server maps codes to statuses and the
 * SDKs map codes back to exception classes. Deliberately free of runtime dependencies so the SDK
 * can import it without pulling in zod.
 */
export const ERROR_STATUS = {
  bad_request: 400,
  unauthorized: 401,
  forbidden: 403,
  not_found: 404,
  method_not_allowed: 405,
  conflict: 409,
  sandbox_gone: 410,
  payload_too_large: 413,
  unsupported_media_type: 415,
  rate_limited: 429,
  internal: 500,
  /** The sandbox's agent answered something the protocol does not allow (a hostile or broken agent). */
  agent_protocol: 502,
  unavailable: 503,
  timeout: 504,
  /** The sandbox's disk limit is reached, or the server's disk volume is full. */
  insufficient_storage: 507,
} as const;

export type ErrorCode = keyof typeof ERROR_STATUS;

/** The JSON body of every error answer: `error` is for people, `code` is for programs. */
export interface ErrorBody {
  error: string;
  code: ErrorCode;
  /** The request field the error is about, when there is one. */
  field?: string;
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(ERROR_STATUS, value);
}

/** Maps an HTTP status back to the closest code, for answers that carry no body we understand. */
export function codeForStatus(status: number): ErrorCode {
  // A bare 502 is a proxy's: agent_protocol always comes with our JSON body.
  for (const [code, s] of Object.entries(ERROR_STATUS)) if (s === status && code !== 'agent_protocol') return code as ErrorCode;
  return status >= 500 ? 'internal' : 'bad_request';
}
