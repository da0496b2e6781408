/**
 * Sustained churn and the pool-miss path with zygotes (issue 21). Names for --only:
 *   churn     1,000 back-to-back create → runCode("print(1)") → close with the default pool (200
 *             with --quick; PODFLARE_BENCH_CHURN_N): p50/p99, errors, pool misses
 *   churn4    the same loop from 4 concurrent clients (1,000 iterations in all)
 *   miss      create with no warm sandbox (pool size 0): served by the zygote, beside the same on a
 *             server without zygotes (a cold start, the previous behaviour) in the same run; and
 *             `import pandas` in the new sandbox (imported by the zygote)
 * Each runs on a server of its own, started for it; the pool is the server's default size unless
 * PODFLARE_BENCH_CHURN_POOL says otherwise.
 */
import { performance } from 'node:perf_hooks';
import { Sandbox, type Client } from 'podflare';
import type { RunningServer, ServerConfig } from '@podflare/server';
import { detail, Failures, failLimit, notes, rows, status, timingRow } from './report.js';
import { fmtMs, summarize } from './stats.js';

export const CHURN_MEASURES = ['churn', 'churn4', 'miss'] as const;

export const CHURN_TARGET = { p50: 10, p99: 25, p99With4: 40, missP50: 15, importPandas: 5 };

/** The figures on the code before zygotes (same loop, the hosted product's benchmark). */
const PREVIOUS = { churnP99: 138, missP50: 69 };

interface ChurnServer {
  server: RunningServer;
  client: Client;
}

export interface ChurnOptions {
  quick: boolean;
  /** Starts a server with these overrides (the caller stops it). */
  start(overrides: Partial<ServerConfig>): Promise<ChurnServer>;
  stop(bs: ChurnServer): Promise<void>;
}

function churnPoolOverride(): Partial<ServerConfig> {
  const pool = process.env.PODFLARE_BENCH_CHURN_POOL;
  return pool ? { poolSize: Number(pool) } : {};
}

function iterations(quick: boolean): number {
  return Number(process.env.PODFLARE_BENCH_CHURN_N ?? (quick ? 200 : 1000));
}

const ratio = (value: number, reference: number) => `${(value / reference).toFixed(2)}×`;

/** One client's loop: `n` create → print(1) → close, timed end to end. */
async function loop(client: Client, n: number, failures: Failures, samples: number[]): Promise<number> {
  let misses = 0;
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const sbx = await failures.attempt('create', () => Sandbox.create({ client }));
    if (!sbx) continue;
    if (!sbx.pool?.hit) misses++;
    let ok = false;
    try {
      const ex = await failures.attempt('runCode', () => sbx.runCode('print(1)'));
      if (ex && ex.stdout !== '1\n') failures.record('runCode', new Error(`wrong answer: ${JSON.stringify(ex.stdout)}`));
      else if (ex) ok = true;
    } finally {
      if (!(await failures.attempt('close', async () => { await sbx.close(); return true as const; }))) ok = false;
    }
    if (ok) samples.push(performance.now() - t0);
  }
  return misses;
}

export async function measureChurn(opts: ChurnOptions, clients: 1 | 4): Promise<void> {
  const bs = await opts.start(churnPoolOverride());
  try {
    await bs.server.manager.waitPoolFull(120_000);
    const n = iterations(opts.quick);
    // A few untimed rounds: the first creates of a fresh server.
    await loop(bs.client, 5, new Failures('churn warm-up', 5), []);
    await bs.server.manager.waitPoolFull(120_000);
    const samples: number[] = [];
    const failures = new Failures(clients === 1 ? 'churn' : 'churn4', failLimit(n));
    const per = Math.ceil(n / clients);
    const t0 = performance.now();
    const misses = (await Promise.all(Array.from({ length: clients }, () => loop(bs.client, per, failures, samples)))).reduce((a, b) => a + b, 0);
    const seconds = (performance.now() - t0) / 1000;
    const s = summarize(samples);
    const p99Target = clients === 1 ? CHURN_TARGET.p99 : CHURN_TARGET.p99With4;
    const ok = s.p99 <= p99Target && (clients > 1 || s.p50 <= CHURN_TARGET.p50);
    const label = clients === 1 ? 'churn: create → print(1) → close ×' + per : `churn, 4 clients: ×${per} each`;
    rows.push(timingRow(label, s, clients === 1 ? `p50 ≤ ${CHURN_TARGET.p50}, p99 ≤ ${p99Target} ms` : `p99 ≤ ${p99Target} ms`,
      `p99 ${ratio(s.p99, p99Target)} target; before zygotes p99 ~${PREVIOUS.churnP99} ms (issue)`, failures.report(status(ok))));
    const pool = bs.server.manager.poolStats.find((p) => p.template === 'default' && p.egress);
    notes.push(`${clients === 1 ? 'churn' : 'churn4'}: ${samples.length} ok, ${failures.count} errors, ${misses} pool misses ` +
      `(${((100 * misses) / Math.max(1, n)).toFixed(1)}%), ${(n / seconds).toFixed(0)} cycles/s; pool target now ${pool?.target ?? '?'}; ${detail('churn', s)}`);
  } finally {
    await opts.stop(bs);
  }
}

async function timedCreates(client: Client, n: number, failures: Failures, withPandas: boolean): Promise<{ create: number[]; pandas: number[] }> {
  const create: number[] = [];
  const pandas: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const sbx = await failures.attempt('create', () => Sandbox.create({ client }));
    const t1 = performance.now();
    if (!sbx) continue;
    try {
      if (withPandas) {
        const ex = await failures.attempt('runCode', () => sbx.runCode('import time\nt = time.perf_counter()\nimport pandas\nprint((time.perf_counter() - t) * 1000)'));
        if (ex?.stdout) pandas.push(Number(ex.stdout));
      }
    } finally {
      await failures.attempt('close', () => sbx.close());
    }
    create.push(t1 - t0);
  }
  return { create, pandas };
}

export async function measureMiss(opts: ChurnOptions): Promise<void> {
  const n = opts.quick ? 30 : 100;
  // The data stack in the zygote, as an operator of a data-heavy server sets it (PODFLARE_DEFAULT_PRELOAD).
  const zy = await opts.start({ poolSize: 0, defaultTemplatePreload: ['numpy', 'pandas', 'matplotlib', 'matplotlib.pyplot'] });
  let withZygote: { create: number[]; pandas: number[] };
  const failures = new Failures('miss', failLimit(n));
  try {
    const deadline = Date.now() + 120_000;
    // The zygote starts with the server (and imports the data stack): wait for it.
    while (!(await (await fetch(`${zy.server.url}/v1/metrics`)).text()).includes('podflare_zygote_ready{template="default"} 1')) {
      if (Date.now() > deadline) throw new Error('the zygote did not get ready');
      await new Promise((r) => setTimeout(r, 200));
    }
    await timedCreates(zy.client, 3, new Failures('miss warm-up', 3), false);
    withZygote = await timedCreates(zy.client, n, failures, true);
  } finally {
    await opts.stop(zy);
  }
  const cold = await opts.start({ poolSize: 0, zygote: false });
  let without: { create: number[]; pandas: number[] };
  const coldFailures = new Failures('miss (no zygote)', failLimit(n));
  try {
    await timedCreates(cold.client, 3, new Failures('miss warm-up', 3), false);
    without = await timedCreates(cold.client, Math.min(n, 30), coldFailures, true);
  } finally {
    await opts.stop(cold);
  }
  const s = summarize(withZygote.create);
  const c = summarize(without.create);
  rows.push(timingRow('create on a miss (pool off, from the zygote)', s, `p50 ≤ ${CHURN_TARGET.missP50} ms`,
    `cold start p50 ${fmtMs(c.p50)} → ${ratio(c.p50, s.p50)} faster`, failures.report(status(s.p50 <= CHURN_TARGET.missP50))));
  rows.push(timingRow('  before: create on a miss, no zygote (cold)', c, '(previous)', `issue: ~${PREVIOUS.missP50} ms`, coldFailures.report('–')));
  const p = summarize(withZygote.pandas);
  const pc = summarize(without.pandas);
  rows.push(timingRow('  `import pandas` in a sandbox from the zygote', p, `< ${CHURN_TARGET.importPandas} ms`,
    `cold ${fmtMs(pc.p50)}`, status(p.p50 < CHURN_TARGET.importPandas)));
  notes.push(detail('miss (zygote)', s), detail('miss (cold)', c));
}
