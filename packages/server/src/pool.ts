/**
 * The warm pool: ready sandboxes per key (template + egress), so a create only pops one. Refilled
 * in the background with bounded parallelism; a sandbox that dies while pooled is dropped and
 * replaced. Counters feed /v1/capacity.
 */
import type { Logger } from './log.js';
import type { RuntimeName, RuntimeSandbox } from '@podflare/runtime';
import type { PoolStats } from '@podflare/protocol';
import { PoolSizer } from './pool-sizer.js';

export interface PoolKey { runtime: RuntimeName; template: string; egress: boolean }
export type StartFn = (key: PoolKey) => Promise<RuntimeSandbox>;

/**
 * Why a create found no ready sandbox (it then starts one cold, ~70 ms instead of ~1.5):
 * - `pool_off`: the server keeps no pool (pool size 0);
 * - `cold_key`: nobody asked for this template and egress before (it is kept warm from now on);
 * - `refilling`: the bucket is empty and refills are under way: creates come faster than the pool refills;
 * - `starts_failing`: the last refills failed (see the warnings), so the bucket stays empty;
 * - `empty`: nothing ready and nothing starting (the host-wide cap on parallel starts is taken).
 */
export type PoolMissReason = 'pool_off' | 'cold_key' | 'refilling' | 'starts_failing' | 'empty';
export const POOL_MISS_REASONS: readonly PoolMissReason[] = ['pool_off', 'cold_key', 'refilling', 'starts_failing', 'empty'];

export type PoolTake = { sandbox: RuntimeSandbox; miss?: undefined } | { sandbox?: undefined; miss: PoolMissReason };

interface Bucket {
  key: PoolKey;
  ready: RuntimeSandbox[];
  starting: number;
  target: number;
  hits: number;
  misses: number;
  missReasons: Record<PoolMissReason, number>;
  failures: number;
  /** Kept warm by warm() (start-up, configuration): never shrinks when idle. */
  pinned: boolean;
  /** Last take(), for shrinking idle buckets. */
  lastTakenAt: number;
  /** Grows the bucket above its target (its floor) while creates come fast (pool-sizer.ts). */
  sizer: PoolSizer;
}

const keyOf = (k: PoolKey) => `${k.runtime}|${k.template}|${k.egress ? 'net' : 'nonet'}`;

export class WarmPool {
  private readonly buckets = new Map<string, Bucket>();
  private closed = false;
  private startsInFlight = 0;
  private readonly waiters = new Set<() => void>();
  /** Starts in flight (each ends once its sandbox is in the pool, or destroyed after close). */
  private readonly refilling = new Set<Promise<void>>();
  /** Shrinks idle buckets back to their floor. */
  private readonly shrinker: NodeJS.Timeout;

  constructor(
    private readonly start: StartFn,
    private readonly opts: {
      target: number; maxParallelStarts: number; log: Logger;
      /** The most ready sandboxes a key's bucket grows to under load (default: its target, no growth). */
      maxTarget?: (key: PoolKey) => number;
      /** After this long without a create a grown bucket shrinks back to its target. @default 30 s */
      idleMs?: number;
    },
  ) {
    this.shrinker = setInterval(() => this.shrinkIdle(), (opts.idleMs ?? 30_000) / 2);
    this.shrinker.unref();
  }

  /** Starts keeping `target` ready sandboxes for this key (the default key gets the full target). */
  warm(key: PoolKey, target = this.opts.target): void {
    const b = this.bucket(key);
    b.target = Math.max(b.target, target);
    b.pinned = true;
    this.refill(b);
  }

  /** Pops a ready sandbox, or says why there was none. Either way the bucket is refilled behind. */
  take(key: PoolKey, missTarget = Math.max(1, Math.floor(this.opts.target / 4))): PoolTake {
    const b = this.bucket(key);
    b.lastTakenAt = Date.now();
    b.sizer.noteTake(Date.now());
    const sandbox = b.ready.shift();
    if (sandbox) {
      b.hits++;
      this.refill(b);
      return { sandbox };
    }
    const miss: PoolMissReason = this.opts.target === 0 ? 'pool_off'
      : b.target === 0 ? 'cold_key'
      : b.failures > 0 ? 'starts_failing'
      : b.starting > 0 ? 'refilling'
      : 'empty';
    b.misses++;
    b.missReasons[miss]++;
    if (miss === 'refilling') b.sizer.noteLag();
    // A key asked for is a key worth keeping warm, if the pool is on at all.
    if (b.target === 0 && this.opts.target > 0) b.target = missTarget;
    this.refill(b);
    return { miss };
  }

  /**
   * Buckets warmed on demand (not pinned by warm()) that nobody took from for `idleMs` give their
   * sandboxes back: a template asked for once does not hold memory for ever.
   */
  dropIdle(idleMs: number, now = Date.now()): void {
    for (const b of this.buckets.values()) {
      // (Also catches a refill that finished after the bucket shrank.)
      if (b.pinned || now - b.lastTakenAt < idleMs || (b.target === 0 && b.ready.length === 0)) continue;
      b.target = 0;
      const idle = b.ready.splice(0);
      if (idle.length) this.opts.log.info('idle pool shrunk', { runtime: b.key.runtime, template: b.key.template, egress: b.key.egress, destroyed: idle.length });
      for (const s of idle) void s.destroy();
    }
  }

  /** Misses so far by reason, per bucket (for /v1/metrics). */
  missReasons(): Array<{ key: PoolKey; reason: PoolMissReason; count: number }> {
    return [...this.buckets.values()].flatMap((b) => POOL_MISS_REASONS.map((reason) => ({ key: b.key, reason, count: b.missReasons[reason] })));
  }

  stats(): PoolStats[] {
    return [...this.buckets.values()].map((b) => ({
      runtime: b.key.runtime, template: b.key.template, egress: b.key.egress, ready: b.ready.length, starting: b.starting,
      target: this.want(b), hits: b.hits, misses: b.misses,
    }));
  }

  /** Resolves when every bucket is full (for start-up and benchmarks). */
  async waitFull(timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    // Full as sized now (grown while creates came fast): refills still running are no quiet pool.
    while (!this.closed && [...this.buckets.values()].some((b) => b.ready.length < this.want(b))) {
      if (Date.now() > deadline) throw new Error('the warm pool did not fill in time');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 200);
        this.waiters.add(() => { clearTimeout(t); resolve(); });
      });
    }
  }

  /**
   * Ends the pools of a template (deleted): its ready sandboxes are destroyed, starts in flight
   * awaited and destroyed, and its buckets forgotten.
   */
  async dropTemplate(template: string): Promise<void> {
    const mine = () => [...this.buckets.entries()].filter(([, b]) => b.key.template === template);
    for (const [, b] of mine()) Object.assign(b, { target: 0, pinned: false });
    await Promise.allSettled([...this.refilling]);
    const all = mine().flatMap(([k, b]) => (this.buckets.delete(k), b.ready.splice(0)));
    await Promise.all(all.map((s) => s.destroy()));
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.shrinker);
    const all = [...this.buckets.values()].flatMap((b) => b.ready.splice(0));
    await Promise.all(all.map((s) => s.destroy()));
    // Starts in flight end too (destroyed once started): a stop that keeps the live sandboxes
    // (onStop 'keep') must not find a pool sandbox among them.
    await Promise.allSettled([...this.refilling]);
  }

  private bucket(key: PoolKey): Bucket {
    const k = keyOf(key);
    let b = this.buckets.get(k);
    if (!b) {
      b = {
        key, ready: [], starting: 0, target: 0, hits: 0, misses: 0, missReasons: { pool_off: 0, cold_key: 0, refilling: 0, starts_failing: 0, empty: 0 }, failures: 0,
        pinned: false, lastTakenAt: Date.now(),
        sizer: new PoolSizer({ ceiling: this.opts.maxTarget?.(key) ?? 0, idleMs: this.opts.idleMs ?? 30_000 }),
      };
      this.buckets.set(k, b);
    }
    return b;
  }

  /** Ready sandboxes the bucket aims at now: its target, grown while creates come fast. */
  private want(b: Bucket): number {
    return b.sizer.target(b.target, Date.now());
  }

  /** Idle buckets grown past their target give the extra sandboxes back. */
  private shrinkIdle(): void {
    for (const b of this.buckets.values()) {
      const extra = b.ready.length - this.want(b);
      if (extra > 0) for (const s of b.ready.splice(b.target, extra)) void s.destroy();
    }
  }

  private refill(b: Bucket): void {
    while (!this.closed && b.ready.length + b.starting < this.want(b) && this.startsInFlight < this.opts.maxParallelStarts) {
      b.starting++;
      this.startsInFlight++;
      const t0 = performance.now();
      const started = this.start(b.key).then(
        async (sandbox) => {
          b.failures = 0;
          b.sizer.noteRefill(performance.now() - t0);
          if (this.closed) return void (await sandbox.destroy());
          b.ready.push(sandbox);
          void sandbox.exited.then(() => {
            const i = b.ready.indexOf(sandbox);
            if (i !== -1) { b.ready.splice(i, 1); this.refill(b); }
          });
        },
        (err: Error) => {
          b.failures++;
          // A start cut short by close() is not worth a warning.
          if (!this.closed) this.opts.log.warn('pool start failed', { runtime: b.key.runtime, template: b.key.template, error: err.message });
        },
      ).finally(() => {
        b.starting--;
        this.startsInFlight--;
        for (const w of this.waiters) w();
        this.waiters.clear();
        // Back off after repeated failures instead of spinning on a broken image or host.
        if (b.failures > 0) setTimeout(() => this.refillAll(), Math.min(30_000, 500 * 2 ** b.failures)).unref();
        else this.refillAll();
      });
      this.refilling.add(started);
      void started.finally(() => this.refilling.delete(started));
    }
  }

  private refillAll(): void {
    for (const b of this.buckets.values()) this.refill(b);
  }
}
