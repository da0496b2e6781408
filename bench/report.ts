/**
 * The benchmark's results as they are gathered: table rows, notes, and the bookkeeping of
 * operations that failed inside a measure. Shared by bench/run.ts and the measure modules.
 */
import { fmtMs, type Summary } from './stats.js';

export interface Row {
  measure: string;
  n: string;
  p50: string;
  p99: string;
  target: string;
  peer: string;
  status: string;
}

export const rows: Row[] = [];
export const notes: string[] = [];
/** Set once a Failures object reported a failure: the run then exits non-zero. */
export const failureState = { anyFailed: false };

export const status = (ok: boolean) => (ok ? 'PASS' : 'MISS');

/**
 * Operations that failed inside a measure (a create answered with an error, a sandbox that died).
 * The measure goes on without that sample; the row and the notes say how many failed and why, and
 * the run exits non-zero. Past half the runs the measure is abandoned.
 */
export class Failures {
  count = 0;
  readonly messages = new Map<string, number>();
  constructor(readonly measure: string, private readonly limit: number) {}

  record(what: string, err: unknown): void {
    this.count++;
    const e = err as Error & { status?: number; code?: string };
    const key = `${what}: ${e.status !== undefined ? `${e.status} ${e.code ?? ''} ` : ''}${e.message}`;
    this.messages.set(key, (this.messages.get(key) ?? 0) + 1);
    if (this.count > this.limit) throw new Error(`${this.measure}: too many failures (${this.count}): ${[...this.messages.keys()].join('; ')}`);
  }

  /** Runs fn; a throw is recorded and gives undefined. */
  async attempt<T>(what: string, fn: () => Promise<T>): Promise<T | undefined> {
    try {
      return await fn();
    } catch (err) {
      this.record(what, err);
      return undefined;
    }
  }

  /** Appends the count to a status cell and reports the messages. */
  report(st: string): string {
    if (!this.count) return st;
    failureState.anyFailed = true;
    for (const [m, k] of this.messages) notes.push(`${this.measure}: FAILED ${k}× ${m}`);
    return `${st} (${this.count} failed)`;
  }
}

export const failLimit = (n: number) => Math.max(5, Math.floor(n / 2));

export function timingRow(measure: string, s: Summary, target: string, peer: string, st: string): Row {
  return { measure, n: String(s.n), p50: fmtMs(s.p50), p99: fmtMs(s.p99), target, peer, status: st };
}

export function detail(label: string, s: Summary): string {
  return `${label}: mean ${fmtMs(s.mean)}, min ${fmtMs(s.min)}, max ${fmtMs(s.max)}`;
}
