/**
 * How many ready sandboxes one pool bucket should hold, from what it sees: the rate of creates
 * (an average of the gaps between them) and how long a refill takes. Enough to cover the creates
 * that arrive while refills run, twice over, between the configured floor and ceiling; a miss
 * because refills lagged raises it at once; an idle bucket goes back to its floor.
 */

/** Weight of the newest sample in the moving averages. */
const ALPHA = 0.2;

export interface PoolSizerOptions {
  /** The most ready sandboxes the bucket may grow to (config poolMaxSize). */
  ceiling: number;
  /** After this long without a create the bucket shrinks back to its floor. */
  idleMs: number;
}

export class PoolSizer {
  /** Average gap between creates, ms (Infinity until two were seen). */
  private gapMs = Number.POSITIVE_INFINITY;
  private lastTake = 0;
  /** Average time from a refill's start to its sandbox being ready, ms. */
  private refillMs = 50;
  /** Added after misses the refills could not prevent; gone when idle. */
  private boost = 0;

  constructor(private readonly opts: PoolSizerOptions) {}

  /** A create took (or missed) a sandbox at `now` (ms). */
  noteTake(now: number): void {
    if (this.lastTake) {
      const gap = Math.max(0.1, now - this.lastTake);
      this.gapMs = Number.isFinite(this.gapMs) ? (1 - ALPHA) * this.gapMs + ALPHA * gap : gap;
    }
    this.lastTake = now;
  }

  /** A create found the bucket empty while it refilled: the pool is too small for this rate. */
  noteLag(): void {
    this.boost = Math.min(this.opts.ceiling, this.boost + 1);
  }

  /** A refill took `ms` from its start to a ready sandbox. */
  noteRefill(ms: number): void {
    this.refillMs = (1 - ALPHA) * this.refillMs + ALPHA * ms;
  }

  /** Ready sandboxes wanted now, given the bucket's floor. */
  target(floor: number, now: number): number {
    if (floor === 0) return 0; // pool off (or a key nobody asked for)
    if (!this.lastTake || now - this.lastTake > this.opts.idleMs) {
      this.boost = 0;
      this.gapMs = Number.POSITIVE_INFINITY;
      return floor;
    }
    const during = Number.isFinite(this.gapMs) ? Math.ceil((2 * this.refillMs) / this.gapMs) : 0;
    return Math.max(floor, Math.min(this.opts.ceiling, during + this.boost));
  }
}
