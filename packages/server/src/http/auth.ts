/**
 * Bearer-key auth. Keys are kept only as sha256 digests and compared in constant time; the digest
 * of the caller's key is its identity ("owner") for the sandboxes it creates, and the only form of
 * a key that reaches the database. A configured key may itself be given as `sha256:<64 hex>`, so
 * the server's environment need not hold any key in the clear.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { ApiError } from './api-error.js';

export const hashKey = (key: string) => createHash('sha256').update(key).digest();

export class KeyRing {
  private readonly digests: Buffer[];

  constructor(keys: string[]) {
    this.digests = keys.map((k) => {
      const m = /^sha256:([0-9a-fA-F]{64})$/.exec(k);
      return m ? Buffer.from(m[1]!, 'hex') : hashKey(k);
    });
  }

  get enabled(): boolean {
    return this.digests.length > 0;
  }

  /** The caller's owner id; throws 401 when keys are configured and the request has none of them. */
  authenticate(req: IncomingMessage): string {
    return this.authenticateKey(bearerKey(req));
  }

  /** The owner id of a key given some other way than the header (a browser's WebSocket: ws-key-protocol.ts). */
  authenticateKey(key: string | undefined): string {
    if (!this.enabled) return '';
    if (key === undefined) throw new ApiError('unauthorized', 'missing API key: send "Authorization: Bearer <key>" (PODFLARE_API_KEY in the SDKs)');
    const digest = hashKey(key);
    if (!this.digests.some((d) => timingSafeEqual(d, digest))) throw new ApiError('unauthorized', 'invalid API key');
    return digest.toString('hex');
  }
}

/** The key of an `Authorization: Bearer <key>` header, if the request has a well-formed one. */
export function bearerKey(req: IncomingMessage): string | undefined {
  const m = /^Bearer\s+(\S{1,512})$/i.exec(req.headers.authorization ?? '');
  return m ? m[1]! : undefined;
}
