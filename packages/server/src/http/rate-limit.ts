/**
 * Per-key request rate limits: one token bucket per API key (the owner id), refilled continuously.
 * A request takes a token; an empty bucket answers 429 with `Retry-After` set to when the next
 * token arrives, so a well-behaved client waits exactly as long as needed.
 *
 * Buckets of keys not seen for a while are dropped (a full bucket is the same as no bucket), so
 * the map stays as small as the set of keys in use.
 */
import { ApiError } from './api-error.js';

export interface RateLimitOptions {
  /** Sustained requests per second per key; 0 disables the limit. */
  perSecond: number;
  /** Requests allowed at once above the sustained rate. */
  burst: number;
  now?: () => number;
}

interface Bucket {
  tokens: number;
  updatedMs: number;
}

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  private readonly now: () => number;
  private lastSweepMs = 0;

  constructor(private readonly opts: RateLimitOptions) {
    this.now = opts.now ?? (() => performance.now());
  }

  get enabled(): boolean {
    return this.opts.perSecond > 0;
  }

  /** Takes one token for `key`, or throws 429 with the wait until one is available. */
  take(key: string): void {
    if (!this.enabled) return;
    const now = this.now();
    const capacity = Math.max(1, this.opts.burst);
    const bucket = this.buckets.get(key) ?? { tokens: capacity, updatedMs: now };
    bucket.tokens = Math.min(capacity, bucket.tokens + ((now - bucket.updatedMs) / 1000) * this.opts.perSecond);
    bucket.updatedMs = now;
    this.buckets.set(key, bucket);
    this.sweep(now, capacity);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return;
    }
    const waitSeconds = Math.max(1, Math.ceil((1 - bucket.tokens) / this.opts.perSecond));
    throw new ApiError('rate_limited', `too many requests: this key may make ${this.opts.perSecond} per second (bursts of ${capacity}); retry in ${waitSeconds} s`,
      undefined, { 'Retry-After': String(waitSeconds) });
  }

  /** Forgets buckets that have refilled completely (at most once a minute). */
  private sweep(now: number, capacity: number): void {
    if (now - this.lastSweepMs < 60_000) return;
    this.lastSweepMs = now;
    for (const [key, b] of this.buckets) {
      if (b.tokens + ((now - b.updatedMs) / 1000) * this.opts.perSecond >= capacity) this.buckets.delete(key);
    }
  }
}
