/**
 * The paired measure (name for --only: paired): fork(1), diff and create → print(1) → close (back
 * to back, CYCLES_PER_RUN per run: the churn the warm pool must keep up with) latency of THIS build against a
 * baseline build of an earlier commit, measured in the same run, alternating, so that load on the
 * host weighs on both alike. A change that makes root's file work safer (the host helper) or moves
 * it elsewhere must not slow forks and diffs down: the rows say by how much each moved.
 *
 *   bash scripts/bench-baseline.sh <rev>          # a built checkout of <rev>, prints its directory
 *   node --import tsx bench/run.ts --only paired --baseline <that directory>
 *
 * Both servers run in this process: the baseline's server module is imported from the baseline
 * checkout (its own host helper scripts, its own dependencies); both are driven through this
 * build's SDK (the REST API is the same).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { performance } from 'node:perf_hooks';
import { Client, Sandbox } from 'podflare';
import * as thisBuild from '@podflare/server';
import { detail, Failures, failLimit, notes, rows, status, timingRow } from './report.js';
import { fmtMs, summarize } from './stats.js';

type ServerModule = Pick<typeof thisBuild, 'loadConfig' | 'startServer'>;

export interface PairedOptions {
  quick: boolean;
  n: number;
  warmup: number;
  imagesDir: string;
  /** A built checkout of the commit to compare with. */
  baselineDir: string;
}

/** How much slower than the baseline a figure may be and still pass. */
const MAX_SLOWDOWN = 1.1;
const FILES = 1000;
/** Back-to-back create → print(1) → close per side per run. */
const CYCLES_PER_RUN = 5;

interface Side {
  name: string;
  server: thisBuild.RunningServer;
  client: Client;
  stateDir: string;
  /** Forked once per run: fork(1) of it is timed. */
  parent: Sandbox;
  /** Two fork siblings with FILES changed files each: their diff is timed. */
  siblings: [Sandbox, Sandbox];
}

const writeFilesCode = (tag: string) =>
  `import os\nos.makedirs('/root/out', exist_ok=True)\nfor i in range(${FILES}):\n` +
  `    with open(f'/root/out/f{i:04d}.txt', 'w') as f:\n        f.write(f'${tag} {i}\\n')\nprint(len(os.listdir('/root/out')))`;

async function startSide(name: string, mod: ServerModule, imagesDir: string): Promise<Side> {
  const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-bench-'));
  const config = mod.loadConfig({ port: 0, poolSize: 2, logLevel: 'warn', imagesDir, stateDir }, { ...process.env, PODFLARE_API_KEYS: '' });
  const server = await mod.startServer(config);
  const client = new Client({ host: server.url });
  const parent = await Sandbox.create({ client });
  await parent.runCode('import numpy as np\na = np.ones(10 * 1024 * 1024 // 8)');
  const kids = await (await Sandbox.create({ client })).fork(2);
  for (const [sbx, tag] of [[kids[0]!, 'a'], [kids[1]!, 'b']] as const) {
    const ex = await sbx.runCode(writeFilesCode(tag));
    if (ex.stdout !== `${FILES}\n`) throw new Error(`${name}: writing ${FILES} files failed: ${ex.stdout}${ex.stderr}`);
  }
  await server.manager.waitPoolFull(120_000);
  return { name, server, client, stateDir, parent, siblings: [kids[0]!, kids[1]!] };
}

async function stopSide(side: Side): Promise<void> {
  side.client.close();
  await side.server.close();
  await rm(side.stateDir, { recursive: true, force: true });
}

async function timed<T>(failures: Failures, what: string, fn: () => Promise<T>): Promise<{ ms: number; value: T } | undefined> {
  const t0 = performance.now();
  const value = await failures.attempt(what, fn);
  const ms = performance.now() - t0;
  return value === undefined ? undefined : { ms, value };
}

export async function measurePaired(opts: PairedOptions): Promise<void> {
  const entry = path.join(path.resolve(opts.baselineDir), 'packages/server/dist/index.js');
  const baselineModule = (await import(pathToFileURL(entry).href)) as ServerModule;
  const runs = Math.min(opts.n, opts.quick ? 20 : 60);
  const warmup = Math.min(opts.warmup, 3);
  const sides: Side[] = [];
  const samples = new Map<string, { fork: number[]; diff: number[]; cycle: number[] }>();
  const failures = new Failures('paired', failLimit(4 * runs));
  try {
    sides.push(await startSide('this build', thisBuild, opts.imagesDir));
    sides.push(await startSide('baseline', baselineModule, opts.imagesDir));
    for (const s of sides) samples.set(s.name, { fork: [], diff: [], cycle: [] });
    for (let i = 0; i < warmup + runs; i++) {
      // Which side goes first alternates too: neither always follows the other's teardown.
      const order = i % 2 === 0 ? sides : [...sides].reverse();
      for (const side of order) {
        // Both pools full: the other side's refills (after its cycles) must not run under this side's timing.
        await Promise.all(sides.map((s) => s.server.manager.waitPoolFull(120_000)));
        const fork = await timed(failures, `fork (${side.name})`, () => side.parent.fork(1));
        if (fork) {
          await Promise.all(fork.value.map((k) => k.close()));
          if (i >= warmup) samples.get(side.name)!.fork.push(fork.ms);
        }
        const diff = await timed(failures, `diff (${side.name})`, () => side.siblings[0].diff(side.siblings[1]));
        if (diff) {
          const changed = diff.value.modified.filter((p) => p.startsWith('/root/out/')).length;
          if (changed !== FILES) failures.record(`diff (${side.name})`, new Error(`${changed} files modified under /root/out, not ${FILES}`));
          else if (i >= warmup) samples.get(side.name)!.diff.push(diff.ms);
        }
        for (let c = 0; c < CYCLES_PER_RUN; c++) {
          const cycle = await timed(failures, `cycle (${side.name})`, async () => {
            const sbx = await Sandbox.create({ client: side.client });
            try {
              const ex = await sbx.runCode('print(1)');
              if (ex.stdout !== '1\n') throw new Error(`print(1) gave ${JSON.stringify(ex.stdout)}`);
            } finally {
              await sbx.close();
            }
            return true;
          });
          if (cycle && i >= warmup) samples.get(side.name)!.cycle.push(cycle.ms);
        }
      }
    }
  } finally {
    for (const s of sides) await stopSide(s).catch(() => undefined);
  }
  const ours = samples.get('this build')!;
  const base = samples.get('baseline')!;
  for (const [label, key] of [['fork(1), 10 MB parent', 'fork'], [`diff of 2 siblings, ${FILES} changed files each`, 'diff'],
    [`create → print(1) → close, ${CYCLES_PER_RUN} back to back (pool 2)`, 'cycle']] as const) {
    const a = summarize(ours[key]);
    const b = summarize(base[key]);
    const ratio = a.p50 / b.p50;
    const st = failures.report(status(ratio <= MAX_SLOWDOWN));
    rows.push(timingRow(`paired: ${label}`, a, `p50 ≤ ${MAX_SLOWDOWN}× baseline`,
      `baseline p50 ${fmtMs(b.p50)} p99 ${fmtMs(b.p99)} → ${ratio.toFixed(2)}× (p99 ${(a.p99 / b.p99).toFixed(2)}×)`, st));
    notes.push(`paired ${key}: ${detail('this build', a)}; ${detail('baseline', b)}, p99 ${fmtMs(b.p99)}`);
  }
  notes.push(`paired: baseline ${opts.baselineDir}; ${runs} runs after ${warmup} warm-ups, the two builds alternating run by run`);
}
