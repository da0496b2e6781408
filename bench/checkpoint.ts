/**
 * The checkpoint measures (issue 23; names for --only): checkpoint (checkpoint and restore of a
 * parent holding 200 MB), atomic (atomic `print(1)` against a plain one), ckptmem (PSS of ten
 * checkpoints of a 200 MB interpreter, each after a step that changed ~1 MB).
 *
 * They run on the fork measures' server. Between timed runs the benchmark waits for the teardowns
 * a run started (a deleted checkpoint, the state a restore replaced) to finish, as the fork
 * measures do, so one run's teardown does not share the CPUs with the next run.
 */
import { performance } from 'node:perf_hooks';
import { Sandbox, type Client } from 'podflare';
import type { RunningServer } from '@podflare/server';
import { detail, Failures, failLimit, notes, rows, status, timingRow } from './report.js';
import { fmtMB, summarize } from './stats.js';

export const CHECKPOINT_MEASURES = ['checkpoint', 'atomic', 'ckptmem'] as const;

export interface CheckpointBenchServer {
  server: RunningServer;
  client: Client;
}

export interface CheckpointOptions {
  quick: boolean;
  n: number;
  warmup: number;
}

export const CHECKPOINT_TARGET = { checkpointP50: 5, restoreP50: 15, atomicOverheadP50: 5, memRatio: 1.1 };

/** 200 MB of float64 (26,214,400 values). */
const STATE_CODE = 'import numpy as np\na = np.random.rand(26_214_400)\nprint(a.nbytes)';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const runsOf = (opts: CheckpointOptions) => Math.min(opts.n, opts.quick ? 20 : 100);

async function py(sbx: Sandbox, code: string): Promise<string> {
  const ex = await sbx.runCode(code, { timeoutMs: 180_000 });
  if (ex.exitCode !== 0) throw new Error(`set-up failed in ${sbx.id}: ${ex.error?.name ?? ''} ${ex.error?.value ?? ex.stderr}`);
  return ex.stdout;
}

/** Lets the teardowns of the previous run finish (the DELETE or the restore answered before them). */
async function settle(bs: CheckpointBenchServer): Promise<void> {
  await bs.server.manager.waitPoolFull(120_000);
  await sleep(150);
}

export async function measureCheckpoint(bs: CheckpointBenchServer, opts: CheckpointOptions): Promise<void> {
  const runs = runsOf(opts);
  const warmup = Math.min(opts.warmup, 3);
  const failures = new Failures('checkpoint', failLimit(2 * runs));
  const sbx = await Sandbox.create({ client: bs.client });
  const taken: number[] = [];
  const restored: number[] = [];
  let bytes = 0;
  try {
    bytes = Number(await py(sbx, STATE_CODE));
    for (let i = 0; i < warmup + runs; i++) {
      await settle(bs);
      const t0 = performance.now();
      const cp = await failures.attempt('checkpoint', () => sbx.checkpoint());
      const t1 = performance.now();
      if (!cp) continue;
      if (i >= warmup) taken.push(t1 - t0);
      await settle(bs);
      const t2 = performance.now();
      const ok = await failures.attempt('restore', () => sbx.restore(cp).then(() => true));
      const t3 = performance.now();
      if (ok !== undefined && i >= warmup) restored.push(t3 - t2);
      if (i === 0) {
        const check = await sbx.runCode('print(a.nbytes)');
        if (check.stdout !== `${bytes}\n`) failures.record('restore check', new Error(`restored state printed ${JSON.stringify(check.stdout)}`));
      }
      await failures.attempt('delete checkpoint', () => sbx.deleteCheckpoint(cp));
    }
  } finally {
    await sbx.close();
  }
  const sc = summarize(taken);
  const sr = summarize(restored);
  const st = failures.report('');
  rows.push(timingRow('checkpoint(), 200 MB interpreter', sc, `p50 ≤ ${CHECKPOINT_TARGET.checkpointP50} ms`, '–', status(sc.p50 <= CHECKPOINT_TARGET.checkpointP50) + st));
  rows.push(timingRow('restore(checkpoint), 200 MB interpreter', sr, `p50 ≤ ${CHECKPOINT_TARGET.restoreP50} ms`, '–', status(sr.p50 <= CHECKPOINT_TARGET.restoreP50) + st));
  notes.push(`checkpoint: the sandbox holds ${fmtMB(bytes)} (np.random.rand); each run: checkpoint, restore it, delete it (untimed), ` +
    'namespace runtime: checkpoints held inside the sandbox (a stopped fork of the interpreter + a fork layer), restore in place, timed to its ' +
    'answer (root switched, the checkpoint\'s interpreter is the worker, the copy that stays the checkpoint made); ' +
    `teardowns waited for between steps; ${runs} runs after ${warmup} warm-ups; ${detail('checkpoint', sc)}; ${detail('restore', sr)}`);
}

export async function measureAtomic(bs: CheckpointBenchServer, opts: CheckpointOptions): Promise<void> {
  const runs = runsOf(opts);
  const warmup = Math.min(opts.warmup, 3);
  const failures = new Failures('atomic', failLimit(2 * runs));
  const sbx = await Sandbox.create({ client: bs.client });
  const plain: number[] = [];
  const atomic: number[] = [];
  try {
    for (let i = 0; i < warmup + runs; i++) {
      await settle(bs);
      // Interleaved: drift on the host weighs on both alike.
      for (const [list, isAtomic] of [[plain, false], [atomic, true]] as const) {
        const t0 = performance.now();
        const ex = await failures.attempt('exec', () => sbx.runCode('print(1)', { atomic: isAtomic }));
        const ms = performance.now() - t0;
        if (ex && ex.stdout !== '1\n') failures.record('exec', new Error(`printed ${JSON.stringify(ex.stdout)}`));
        else if (ex && i >= warmup) list.push(ms);
      }
    }
  } finally {
    await sbx.close();
  }
  const sp = summarize(plain);
  const sa = summarize(atomic);
  const overhead = sa.p50 - sp.p50;
  const st = failures.report('');
  rows.push(timingRow('runCode("print(1)", { atomic: true })', sa, `≤ plain + ${CHECKPOINT_TARGET.atomicOverheadP50} ms`, `plain ${sp.p50.toFixed(2)} ms`,
    status(overhead <= CHECKPOINT_TARGET.atomicOverheadP50) + st));
  notes.push(`atomic: p50 overhead ${overhead.toFixed(2)} ms over a plain print(1) (each atomic exec takes a checkpoint and frees it after success); ` +
    `${runs} interleaved pairs after ${warmup} warm-ups; ${detail('plain', sp)}; ${detail('atomic', sa)}`);
}

export async function measureCheckpointMemory(bs: CheckpointBenchServer, _opts: CheckpointOptions): Promise<void> {
  const sbx = await Sandbox.create({ client: bs.client });
  try {
    const bytes = Number(await py(sbx, STATE_CODE));
    await sleep(500);
    const alone = await bs.server.manager.memoryOf(sbx.id);
    for (let i = 0; i < 10; i++) {
      // ~1 MB changed: 131,072 float64 values.
      await py(sbx, `a[${i} * 131072:${i + 1} * 131072] += 1`);
      await sbx.checkpoint(`step ${i}`);
    }
    await sleep(500);
    const live = await bs.server.manager.memoryOf(sbx.id);
    const held = await bs.server.manager.checkpoints.memoryPss(sbx.id);
    const ratio = (live + held) / alone;
    rows.push({
      measure: '10 checkpoints of a 200 MB interpreter (PSS)', n: '1', p50: `${ratio.toFixed(2)}×`, p99: '–',
      target: `≤ ${CHECKPOINT_TARGET.memRatio}× alone`, peer: `alone ${fmtMB(alone)}`, status: status(ratio <= CHECKPOINT_TARGET.memRatio),
    });
    notes.push(`ckptmem: interpreter holding ${fmtMB(bytes)}: PSS alone ${fmtMB(alone)}; after 10 steps (each += 1 on 1 MB) and a checkpoint after each: ` +
      `live ${fmtMB(live)} + checkpoints ${fmtMB(held)} = ${fmtMB(live + held)} (held checkpoints are processes of the sandbox: in "live")`);
  } finally {
    await sbx.close();
  }
}
