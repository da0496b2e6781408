/**
 * The domain error of everything below the HTTP layer (runtimes, the agent channel, the helpers,
 * the store, the sandbox manager). Its code is one of the protocol's error codes; only `http/`
 * turns it into a status and a JSON body (through the protocol's table), so this module knows
 * nothing about HTTP and imports nothing from the server.
 */
import type { ErrorCode } from '@podflare/protocol/errors';

/** What an answer may say beyond code and message. */
export interface SandboxErrorDetails {
  /** The request field the error is about, when there is one. */
  readonly field?: string;
  /** When the same call may succeed (retryable codes): becomes the Retry-After of an HTTP answer. */
  readonly retryAfterSeconds?: number;
}

export class SandboxError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details: SandboxErrorDetails = {},
  ) {
    super(message);
    this.name = 'SandboxError';
  }
}
