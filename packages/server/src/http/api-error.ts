import { ERROR_STATUS, type ErrorBody, type ErrorCode } from '@podflare/protocol/errors';
import { SandboxError } from '@podflare/runtime';

/**
 * An error the API answers with: `code` picks the HTTP status (one table, in the protocol package),
 * `message` is what the user reads. Anything else thrown in a handler becomes a 500, except a
 * {@link SandboxError} from below, which {@link toApiError} maps here (the one place that does).
 */
export class ApiError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly field?: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }

  get status(): number {
    return ERROR_STATUS[this.code];
  }

  toBody(): ErrorBody {
    return this.field ? { error: this.message, code: this.code, field: this.field } : { error: this.message, code: this.code };
  }
}

/** The API answer for a thrown error: its own for ApiError and SandboxError, null for anything else (a bug: 500). */
export function toApiError(err: unknown): ApiError | null {
  if (err instanceof ApiError) return err;
  if (err instanceof SandboxError) {
    const { field, retryAfterSeconds } = err.details;
    return new ApiError(err.code, err.message, field, retryAfterSeconds === undefined ? {} : { 'Retry-After': String(retryAfterSeconds) });
  }
  return null;
}

export const notFound = (what: string) => new ApiError('not_found', what);
export const badRequest = (message: string, field?: string) => new ApiError('bad_request', message, field);
