import { ERROR_STATUS, type ErrorBody, type ErrorCode } from '@podflare/protocol/errors';

/**
 * An error the API answers with: `code` picks the HTTP status (one table, in the protocol package),
 * `message` is what the user reads. Anything else thrown in a handler becomes a 500.
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

export const notFound = (what: string) => new ApiError('not_found', what);
export const badRequest = (message: string, field?: string) => new ApiError('bad_request', message, field);
