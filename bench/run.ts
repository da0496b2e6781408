/**
 * `npm run bench`: Podflare's latency and memory figures beside their targets and peers.
 *
 * Starts a real server in this process (fresh temp state dir, the shared image directory), measures
 * through the TypeScript SDK, prints one table, stops the server. Figures are printed, never
 * asserted: the status column says PASS/MISS against each target, and the exit code is non-zero only
 * if something crashed.
 *
 *   node --import tsx bench/run.ts [--quick] [--only create,exec,...] [--n 200]
 *
 * Measures (names for --only):
 *   memory    idle pooled sandbox memory (PSS of every process of a sandbox, from /proc)
 *   templates each template's image size and its idle pooled PSS (default, python-datasci)
 *   create    Sandbox.create() served from the warm pool (pool full before each timed create)
 *   destroy   sandbox.close() (the DELETE returning), measured in the same loop as create
 *   exec      hot runCode("print(6*7)") round trip on one sandbox, and the Jupyter peer
 *   jupyter   the Jupyter peer alone (ipykernel, same statement)
 *   cycle     create → runCode → close
 *   nonet     create with egress:false on the pool-miss path (on-demand start)
 *   ondemand  create with egress:true on the pool-miss path (on-demand start)
 *   fork5        fork(5) of a parent holding a 200 MB DataFrame (vs the hosted product's ~90 ms)
 *   fork1        fork(1) of a 10 MB and of a 1 GB parent, and how much the time grows
 *   forkvsnaive  fork(5) of a parent that imported pandas and read a 50 MB CSV, vs 5 fresh sandboxes
 *                doing that set-up themselves
 *   diff1000     a.diff(b) of two fork siblings with 1,000 changed files each
 *   checkpoint   checkpoint() and restore() of a sandbox holding 200 MB (bench/checkpoint.ts)
 *   atomic       runCode("print(1)", { atomic: true }) against a plain one
 *   ckptmem      PSS of 10 checkpoints of a 200 MB interpreter, each after a ~1 MB step
 *   forkmem      PSS of parent + 5 children right after fork(5) of a 300 MB state, vs before
 *   load         50 sandboxes × 8 concurrent clients running execs for 60 s (10 s with --quick;
 *                PODFLARE_BENCH_LOAD_SECONDS): zero errors, p50/p99 (bench/resilience.ts)
 *   crash        100 kill -9 / restart cycles with sandboxes at work (10 with --quick;
 *                PODFLARE_BENCH_CRASH_CYCLES): nothing leaked, restart p50/p99 (bench/resilience.ts)
 *   survive      100 kill -9 / restart cycles with 50 live sandboxes (10 with --quick;
 *                PODFLARE_BENCH_SURVIVE_CYCLES): 0 lost, 0 leaks, restart-to-first-exec p50/p99
 *   vm           the microVM runtime (bench/vm.ts): cold boot, create from the pool of clones,
 *                template restore, fork(1)/fork(5) beside the namespace runtime, idle clone PSS
 *   churn     1,000 back-to-back create → print(1) → close, default pool (bench/churn.ts)
 *   churn4    the same from 4 concurrent clients
 *   miss      create on a pool miss served by the zygote (pool off) vs a cold start, and `import pandas`
 *   fork5py   fork(5) of the 200 MB DataFrame parent timed at the Python SDK (bench/fork-python.ts)
 *   cluster      cluster mode (bench/cluster.ts): 3 nodes in network namespaces + a gateway + PostgreSQL;
 *                create p50/p99 and creates/s with 8 clients through the gateway, the gateway's
 *                paired overhead on exec, 3 nodes × N live sandboxes with 8 clients at work
 *   ports        an exposed port's HTTP GET through the proxy vs direct into the sandbox, paired (bench/ports.ts)
 *   pty          PTY keystroke echo round trip over the WebSocket (bench/ports.ts)
 *   paired       fork(1) and diff of this build against a baseline build of an earlier commit, in
 *                one run (bench/paired.ts); only with --baseline DIR (scripts/bench-baseline.sh)
 * The two on-demand measures use a second server whose pool is off (size 0): with a pool, a key
 * that misses once is kept warm afterwards, so later creates would not take the miss path.
 * The fork measures (bench/fork.ts) use a third server, pool as the main one; they use fewer runs.
 */
import { mkdtemp, rm, access } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Client, Sandbox } from 'podflare';
import { loadConfig, startServer, type RunningServer, type ServerConfig } from '@podflare/server';
import { CHECKPOINT_MEASURES, measureAtomic, measureCheckpoint, measureCheckpointMemory } from './checkpoint.js';
import { FORK_MEASURES, measureDiff1000, measureFork1, measureFork5, measureForkMem, measureForkVsNaive } from './fork.js';
import { runJupyterPeer, PEER_PYTHON, type JupyterResult } from './jupyter.js';
import { sandboxMemoryByNamespace } from './memory.js';
import { detail, Failures, failLimit, failureState, notes, rows, status, timingRow, type Row } from './report.js';
import { fmtMB, fmtMs, summarize, type Summary } from './stats.js';
import { formatTable } from './table.js';
import { measurePythonSdk } from './python-sdk.js';
import { measureCrashCycles, measureLoad, measureSurvival, RESILIENCE_MEASURES } from './resilience.js';

import { measureVmPooled, measureVmUnpooled } from './vm.js';
import { measurePaired } from './paired.js';
import { measureTemplates, TEMPLATE_MEASURES } from './templates.js';
import { measurePorts, measurePtyEcho, PORT_MEASURES } from './ports.js';
import { measureCluster } from './cluster.js';
import { CHURN_MEASURES, measureChurn, measureMiss } from './churn.js';
import { measureFork5Python } from './fork-python.js';

const MEASURES = [
  'memory', 'create', 'destroy', 'exec', 'python', 'jupyter', 'cycle', 'nonet', 'ondemand', ...FORK_MEASURES, ...CHECKPOINT_MEASURES, ...RESILIENCE_MEASURES,
  ...TEMPLATE_MEASURES, ...CHURN_MEASURES, 'fork5py', 'vm', 'paired', 'cluster', ...PORT_MEASURES,
] as const;
type MeasureName = (typeof MEASURES)[number];

const IMAGES_DIR = process.env.PODFLARE_IMAGES_DIR ?? '/var/lib/podflare/images';
const POOL_SIZE = Number(process.env.PODFLARE_BENCH_POOL_SIZE ?? 8);
const CODE = 'print(6*7)';
const EXPECTED = '42\n';

// Targets (ms, bytes).
const TARGET = {
  createP50: 5,
  execP50: 3,
  execVsJupyter: 2,
  cycleP50: 15,
  memoryPss: 25 * 1024 * 1024,
};

// ---------------------------------------------------------------------------------------------
// Arguments

interface Options {
  quick: boolean;
  only: Set<MeasureName>;
  n: number;
  warmup: number;
  /** A built checkout of an earlier commit, for the paired measure. */
  baseline: string | null;
}

function usage(message?: string): never {
  if (message) console.error(`bench: ${message}`);
  console.error(`usage: node --import tsx bench/run.ts [--quick] [--only ${MEASURES.join(',')}] [--n <runs>] [--baseline <built checkout>]`);
  process.exit(2);
}

function parseArgs(argv: string[]): Options {
  let quick = false;
  let n: number | undefined;
  let baseline: string | null = process.env.PODFLARE_BENCH_BASELINE ?? null;
  const only = new Set<MeasureName>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const eq = a.indexOf('=');
      if (eq !== -1) return a.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      return v;
    };
    if (a === '--quick') quick = true;
    else if (a === '--only' || a.startsWith('--only=')) {
      for (const name of value().split(',').map((s) => s.trim()).filter(Boolean)) {
        if (!(MEASURES as readonly string[]).includes(name)) usage(`unknown measure "${name}"`);
        only.add(name as MeasureName);
      }
    } else if (a === '--n' || a.startsWith('--n=')) {
      n = Number(value());
      if (!Number.isInteger(n) || n < 1) usage('--n must be a positive integer');
    } else if (a === '--baseline' || a.startsWith('--baseline=')) baseline = value();
    else if (a === '--help' || a === '-h') usage();
    else usage(`unknown argument "${a}"`);
  }
  if (only.has('paired') && !baseline) usage('the paired measure needs --baseline <a built checkout> (scripts/bench-baseline.sh)');
  // A full run includes the paired measure only when a baseline is given.
  const all = MEASURES.filter((m) => m !== 'paired' || baseline);
  return {
    baseline,
    quick,
    only: only.size ? only : new Set(all),
    n: n ?? (quick ? 40 : 200),
    warmup: quick ? 3 : 10,
  };
}

// ---------------------------------------------------------------------------------------------
// Results

let crashed = false;

/**
 * The server logs (warn level) to this process's stderr. Sandbox starts that fail in the background
 * (pool refills) never reach a timed call, so they are counted here from the log lines, which are
 * still passed through.
 */
const serverWarnings = new Map<string, number>();
const stderrWrite = process.stderr.write.bind(process.stderr);
process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
  const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
  for (const line of text.split('\n')) {
    if (!line.startsWith('{"ts"')) continue;
    try {
      const entry = JSON.parse(line) as { level?: string; msg?: string; error?: string; reason?: string };
      if (entry.level !== 'warn' && entry.level !== 'error') continue;
      const key = `${entry.msg ?? '?'}: ${entry.error ?? entry.reason ?? ''}`;
      serverWarnings.set(key, (serverWarnings.get(key) ?? 0) + 1);
    } catch { /* not a log line */ }
  }
  return (stderrWrite as (...a: unknown[]) => boolean)(chunk, ...rest);
}) as typeof process.stderr.write;

/** Node process warnings (e.g. listener leaks in the in-process server), still printed by Node. */
const processWarnings = new Map<string, number>();
process.on('warning', (w) => {
  const key = `${w.name}: ${w.message}`;
  processWarnings.set(key, (processWarnings.get(key) ?? 0) + 1);
});

interface ExecResult { summary: Summary; failures: Failures }

async function guarded(measure: string, fn: () => Promise<void>): Promise<void> {
  const started = performance.now();
  process.stderr.write(`bench: ${measure}…\n`);
  try {
    await fn();
  } catch (err) {
    crashed = true;
    const e = err as Error;
    rows.push({ measure, n: '–', p50: '–', p99: '–', target: '–', peer: '–', status: 'ERROR' });
    notes.push(`${measure}: ERROR ${e.stack ?? e.message}`);
  }
  process.stderr.write(`bench: ${measure} done in ${((performance.now() - started) / 1000).toFixed(1)} s\n`);
}

// ---------------------------------------------------------------------------------------------
// Servers

interface BenchServer {
  server: RunningServer;
  client: Client;
  stateDir: string;
}

const servers = new Set<BenchServer>();

async function startBenchServer(overrides: Partial<ServerConfig>): Promise<BenchServer> {
  // Short and free of ':' and ',' (overlayfs option separators).
  const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-bench-'));
  try {
    const config = loadConfig(
      { port: 0, logLevel: (process.env.BENCH_LOG_LEVEL as 'warn' | undefined) ?? 'warn', imagesDir: IMAGES_DIR, stateDir, ...overrides },
      { ...process.env, PODFLARE_API_KEYS: '' },
    );
    const server = await startServer(config);
    const bs = { server, client: new Client({ host: server.url }), stateDir };
    servers.add(bs);
    return bs;
  } catch (err) {
    await rm(stateDir, { recursive: true, force: true });
    throw err;
  }
}

async function stopBenchServer(bs: BenchServer): Promise<void> {
  if (!servers.delete(bs)) return;
  bs.client.close();
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('the server did not close within 60 s')), 60_000);
  });
  try {
    await Promise.race([bs.server.close(), timeout]);
  } finally {
    clearTimeout(timer);
    await rm(bs.stateDir, { recursive: true, force: true });
  }
}

/** Counters of the pool bucket that `create({egress})` draws from. */
function bucket(bs: BenchServer, egress: boolean): { hits: number; misses: number; ready: number; target: number } {
  const b = bs.server.manager.poolStats.find((p) => p.template === 'default' && p.egress === egress);
  return b ?? { hits: 0, misses: 0, ready: 0, target: 0 };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------------
// Measures

async function measureMemory(bs: BenchServer, opts: Options): Promise<void> {
  await bs.server.manager.waitPoolFull(120_000);
  // Let the freshly started sandboxes go quiet (agent imports done, start-up pages settled).
  await sleep(opts.quick ? 1000 : 3000);
  await bs.server.manager.waitPoolFull(120_000);
  const live = bs.server.manager.liveCount;
  const pooled = bs.server.manager.poolStats.reduce((s, p) => s + p.ready, 0);
  // Pooled sandboxes forked from a zygote are nested in its bwrap tree: each is counted on its own.
  const byNs = await sandboxMemoryByNamespace();
  const found = [...byNs.children, ...byNs.plain];
  if (found.length === 0) throw new Error('no sandbox process found under this process');
  const pss = found.map((s) => s.pssBytes);
  const avg = pss.reduce((s, x) => s + x, 0) / pss.length;
  const max = Math.max(...pss);
  const withSlirp = found.filter((s) => s.slirpPid !== null).length;
  const procs = found.map((s) => s.pids.length + (s.slirpPid ? 1 : 0));
  rows.push({
    measure: 'idle pooled sandbox memory (PSS)', n: String(found.length), p50: `avg ${fmtMB(avg)}`, p99: `max ${fmtMB(max)}`,
    target: `avg ≤ ${fmtMB(TARGET.memoryPss)}`, peer: '–', status: status(avg <= TARGET.memoryPss),
  });
  notes.push(`memory: ${found.length} sandboxes found (pool ready ${pooled}, live ${live}); ${withSlirp} with slirp4netns; ` +
    `${Math.min(...procs)}–${Math.max(...procs)} processes each; min ${fmtMB(Math.min(...pss))}`);
  for (const z of byNs.zygotes) {
    notes.push(`memory: a zygote (what the pooled sandboxes are forked from, its template's modules imported) holds ${fmtMB(z.pssBytes)} PSS of its own ` +
      `(${z.pids.length} processes); its pages are shared with its ${byNs.children.length} children, whose PSS counts their share`);
  }
  if (found.length !== pooled + live) notes.push(`memory: WARNING found ${found.length} bwrap processes but the server reports ${pooled} pooled + ${live} live`);
}

async function measureCreateDestroy(bs: BenchServer, opts: Options, want: Set<MeasureName>): Promise<void> {
  const create: number[] = [];
  const destroy: number[] = [];
  const createFailures = new Failures('create', failLimit(opts.n));
  const destroyFailures = new Failures('destroy', failLimit(opts.n));
  let hits = 0;
  let misses = 0;
  for (let i = 0; i < opts.warmup + opts.n; i++) {
    await bs.server.manager.waitPoolFull(120_000);
    const before = bucket(bs, true);
    const t0 = performance.now();
    const sbx = await createFailures.attempt('create', () => Sandbox.create({ client: bs.client }));
    const t1 = performance.now();
    if (!sbx) continue;
    const hit = bucket(bs, true).hits > before.hits;
    let t2 = 0;
    let t3 = 0;
    let closed: true | undefined;
    try {
      // Destroy is timed on a quiet server too: the refill this create set off has finished.
      await bs.server.manager.waitPoolFull(120_000);
    } finally {
      t2 = performance.now();
      closed = await destroyFailures.attempt('close', async () => { await sbx.close(); return true as const; });
      t3 = performance.now();
    }
    if (i < opts.warmup) continue;
    if (closed) destroy.push(t3 - t2);
    if (hit) { hits++; create.push(t1 - t0); } else misses++;
  }
  const total = hits + misses;
  if (want.has('create')) {
    if (create.length === 0) throw new Error(`no create hit the warm pool (${misses} misses, ${createFailures.count} failed)`);
    const s = summarize(create);
    rows.push(timingRow('create (warm pool hit)', s, `p50 ≤ ${TARGET.createP50} ms`, '–', createFailures.report(status(s.p50 <= TARGET.createP50))));
    notes.push(`create: pool hit rate ${((100 * hits) / total).toFixed(1)}% (${hits}/${total}; misses excluded from the figures); ${detail('create', s)}`);
  }
  if (want.has('destroy')) {
    const s = summarize(destroy);
    rows.push(timingRow('destroy (close → DELETE 204)', s, '– (no target)', '–', destroyFailures.report('–')));
    notes.push(detail('destroy', s));
  }
}

async function measureExec(bs: BenchServer, opts: Options): Promise<ExecResult> {
  await bs.server.manager.waitPoolFull(120_000);
  const sbx = await Sandbox.create({ client: bs.client });
  const samples: number[] = [];
  const failures = new Failures('exec', failLimit(opts.n));
  try {
    await bs.server.manager.waitPoolFull(120_000);
    for (let i = 0; i < opts.warmup * 2; i++) await sbx.runCode(CODE);
    for (let i = 0; i < opts.n; i++) {
      const t0 = performance.now();
      const ex = await failures.attempt('runCode', () => sbx.runCode(CODE));
      const t1 = performance.now();
      if (!ex) continue;
      if (ex.stdout !== EXPECTED || ex.exitCode !== 0) {
        failures.record('runCode', new Error(`wrong answer: stdout ${JSON.stringify(ex.stdout)}, exit code ${ex.exitCode}`));
      } else samples.push(t1 - t0);
    }
  } finally {
    await sbx.close();
  }
  const s = summarize(samples);
  notes.push(detail('exec', s));
  return { summary: s, failures };
}

async function measureJupyter(opts: Options): Promise<JupyterResult> {
  const r = await runJupyterPeer({ n: opts.n, warmup: opts.warmup * 2 });
  if (r.wrongOutput) throw new Error(`${r.wrongOutput}/${opts.n} Jupyter executions did not print ${JSON.stringify(EXPECTED)}`);
  const v = r.versions;
  notes.push(`jupyter: ${PEER_PYTHON} ${v.python}, jupyter_client ${v.jupyter_client}, ipykernel ${v.ipykernel}, pyzmq ${v.pyzmq}; ` +
    `timed from execute_request sent to status:idle on iopub (sync zmq sockets); ${detail('jupyter', summarize(r.samplesMs))}`);
  return r;
}

function execRows(execResult: ExecResult | null, jupyter: JupyterResult | null, jupyterError: Error | null): void {
  const j = jupyter ? summarize(jupyter.samplesMs) : null;
  if (execResult) {
    const exec = execResult.summary;
    const ratio = j ? j.p50 / exec.p50 : Number.NaN;
    const peer = j ? `jupyter p50 ${fmtMs(j.p50)} → ${ratio.toFixed(2)}× faster` : `jupyter unavailable`;
    const ok = exec.p50 <= TARGET.execP50 && (j ? ratio >= TARGET.execVsJupyter : false);
    rows.push(timingRow(`hot runCode("${CODE}")`, exec, `p50 ≤ ${TARGET.execP50} ms, ≥ ${TARGET.execVsJupyter}× jupyter`, peer,
      execResult.failures.report(j ? status(ok) : `${status(exec.p50 <= TARGET.execP50)} (no peer)`)));
  }
  if (j) rows.push(timingRow(`  peer: ipykernel execute("${CODE}")`, j, '(peer)', '–', '–'));
  else if (jupyterError) {
    rows.push({ measure: `  peer: ipykernel execute("${CODE}")`, n: '–', p50: '–', p99: '–', target: '(peer)', peer: '–', status: 'ERROR' });
    notes.push(`jupyter: ERROR ${jupyterError.message}`);
    crashed = true;
  }
}

async function measureCycle(bs: BenchServer, opts: Options): Promise<void> {
  const samples: number[] = [];
  const phases = { create: [] as number[], run: [] as number[], close: [] as number[] };
  const failures = new Failures('cycle', failLimit(opts.n));
  let hits = 0;
  for (let i = 0; i < opts.warmup + opts.n; i++) {
    await bs.server.manager.waitPoolFull(120_000);
    const before = bucket(bs, true);
    const t0 = performance.now();
    const sbx = await failures.attempt('create', () => Sandbox.create({ client: bs.client }));
    if (!sbx) continue;
    const hit = bucket(bs, true).hits > before.hits;
    const tCreated = performance.now();
    let tRan = tCreated;
    let ex;
    let closed: true | undefined;
    try {
      ex = await failures.attempt('runCode', () => sbx.runCode(CODE));
      tRan = performance.now();
    } finally {
      closed = await failures.attempt('close', async () => { await sbx.close(); return true as const; });
    }
    const t1 = performance.now();
    if (!ex || !closed) continue;
    if (ex.stdout !== EXPECTED) {
      failures.record('runCode', new Error(`wrong answer: stdout ${JSON.stringify(ex.stdout)}`));
      continue;
    }
    if (i < opts.warmup) continue;
    samples.push(t1 - t0);
    phases.create.push(tCreated - t0);
    phases.run.push(tRan - tCreated);
    phases.close.push(t1 - tRan);
    if (hit) hits++;
  }
  const s = summarize(samples);
  rows.push(timingRow('create → runCode → close', s, `p50 ≤ ${TARGET.cycleP50} ms`, '–', failures.report(status(s.p50 <= TARGET.cycleP50))));
  const p50 = (xs: number[]) => fmtMs(summarize(xs).p50);
  notes.push(`cycle: pool hit rate ${((100 * hits) / s.n).toFixed(1)}% (${hits}/${s.n}); ${detail('cycle', s)}; ` +
    `phases p50: create ${p50(phases.create)}, runCode ${p50(phases.run)}, close ${p50(phases.close)} ` +
    `(the pool refill set off by each create runs meanwhile)`);
}

async function measureOnDemand(bs: BenchServer, opts: Options, egress: boolean): Promise<void> {
  const samples: number[] = [];
  const name = egress ? 'ondemand' : 'nonet';
  const failures = new Failures(name, failLimit(opts.n));
  let misses = 0;
  // Starts take long: fewer warm-ups are enough.
  const warmup = Math.min(opts.warmup, 3);
  for (let i = 0; i < warmup + opts.n; i++) {
    const before = bucket(bs, egress);
    const t0 = performance.now();
    const sbx = await failures.attempt('create', () => Sandbox.create({ client: bs.client, egress }));
    const t1 = performance.now();
    if (!sbx) continue;
    const missed = bucket(bs, egress).misses > before.misses;
    await failures.attempt('close', () => sbx.close());
    if (i < warmup) continue;
    samples.push(t1 - t0);
    if (missed) misses++;
  }
  const s = summarize(samples);
  const label = `create egress:${egress} (pool miss, on demand)`;
  rows.push(timingRow(label, s, '– (no target)', '–', failures.report('–')));
  notes.push(`${name}: server with pool size 0, ${misses}/${s.n} timed creates took the miss path; ${detail(label, s)}`);
}

// ---------------------------------------------------------------------------------------------

async function imageReady(): Promise<boolean> {
  try {
    await access(IMAGES_DIR);
    return true;
  } catch {
    return false;
  }
}

async function cleanup(): Promise<void> {
  for (const bs of [...servers]) {
    try {
      await stopBenchServer(bs);
    } catch (err) {
      crashed = true;
      notes.push(`shutdown: ERROR ${(err as Error).message}`);
    }
  }
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  const want = opts.only;
  const has = (...names: MeasureName[]) => names.some((n) => want.has(n));

  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      process.stderr.write(`bench: ${sig}, stopping the servers…\n`);
      void cleanup().finally(() => process.exit(130));
    });
  }

  console.log(`Podflare benchmark${opts.quick ? ' (quick)' : ''}: ${opts.n} runs per measure after ${opts.warmup} warm-ups`);
  console.log(`host: ${os.cpus()[0]?.model ?? 'unknown cpu'}, ${os.availableParallelism()} cpus, ` +
    `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB, Linux ${os.release()}, node ${process.version}, ` +
    `load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(`server: in-process, runtime ns, pool size ${POOL_SIZE}, images ${IMAGES_DIR}${(await imageReady()) ? '' : ' (missing: it will be built)'}`);
  console.log('');

  let exec = null as ExecResult | null;
  let jupyter = null as JupyterResult | null;
  let jupyterError = null as Error | null;

  if (has('memory', 'create', 'destroy', 'exec', 'python', 'cycle', 'ports', 'pty')) {
    let bs = null as BenchServer | null;
    await guarded('server start', async () => {
      bs = await startBenchServer({ poolSize: POOL_SIZE });
      await bs.server.manager.waitPoolFull(120_000);
    });
    if (bs) {
      const main: BenchServer = bs;
      if (has('memory')) await guarded('memory', () => measureMemory(main, opts));
      if (has('create', 'destroy')) await guarded('create/destroy', () => measureCreateDestroy(main, opts, want));
      if (has('exec')) await guarded('exec', async () => { exec = await measureExec(main, opts); });
      if (has('python')) await guarded('python', () => measurePythonSdk(main.server.url, opts.n));
      if (has('cycle')) await guarded('cycle', () => measureCycle(main, opts));
      if (has('ports')) await guarded('ports', () => measurePorts(main.server, main.client, opts));
      if (has('pty')) await guarded('pty', () => measurePtyEcho(main.client, opts));
      await guarded('server stop', () => stopBenchServer(main));
    }
  }
  // The peer runs with no Podflare server up, so neither disturbs the other.
  if (has('exec', 'jupyter')) {
    process.stderr.write('bench: jupyter peer…\n');
    try {
      jupyter = await measureJupyter(opts);
    } catch (err) {
      jupyterError = err as Error;
    }
  }
  if (has('exec', 'jupyter')) execRows(exec, jupyter, jupyterError);
  if (has('memory') && jupyter?.kernelPssBytes) {
    const row = rows.find((r) => r.measure.startsWith('idle pooled'));
    if (row) row.peer = `ipykernel ${fmtMB(jupyter.kernelPssBytes)}`;
  }

  if (has('nonet', 'ondemand')) {
    let bs = null as BenchServer | null;
    await guarded('server start (pool off)', async () => { bs = await startBenchServer({ poolSize: 0 }); });
    if (bs) {
      const noPool: BenchServer = bs;
      if (has('nonet')) await guarded('nonet', () => measureOnDemand(noPool, opts, false));
      if (has('ondemand')) await guarded('ondemand', () => measureOnDemand(noPool, opts, true));
      await guarded('server stop (pool off)', () => stopBenchServer(noPool));
    }
  }

  if (has(...FORK_MEASURES, 'fork5py', ...CHECKPOINT_MEASURES)) {
    let bs = null as BenchServer | null;
    await guarded('server start (fork measures)', async () => {
      // Parents started by bwrap as before zygotes: forkmem reads the parent's own bwrap tree (a
      // sandbox forked from a zygote shares its tree with its pool siblings).
      bs = await startBenchServer({ poolSize: POOL_SIZE, zygote: false });
      await bs.server.manager.waitPoolFull(120_000);
    });
    if (bs) {
      const forkServer: BenchServer = bs;
      if (has('fork5')) await guarded('fork5', () => measureFork5(forkServer, opts));
      if (has('fork5py')) await guarded('fork5py', () => measureFork5Python(forkServer.server.url, opts.quick));
      if (has('fork1')) await guarded('fork1', () => measureFork1(forkServer, opts));
      if (has('forkvsnaive')) await guarded('forkvsnaive', () => measureForkVsNaive(forkServer, opts));
      if (has('diff1000')) await guarded('diff1000', () => measureDiff1000(forkServer, opts));
      if (has('forkmem')) await guarded('forkmem', () => measureForkMem(forkServer, opts));
      if (has('checkpoint')) await guarded('checkpoint', () => measureCheckpoint(forkServer, opts));
      if (has('atomic')) await guarded('atomic', () => measureAtomic(forkServer, opts));
      if (has('ckptmem')) await guarded('ckptmem', () => measureCheckpointMemory(forkServer, opts));
      await guarded('server stop (fork measures)', () => stopBenchServer(forkServer));
    }
  }

  if (has(...CHURN_MEASURES)) {
    const churnOpts = { quick: opts.quick, start: startBenchServer, stop: stopBenchServer };
    if (has('churn')) await guarded('churn', () => measureChurn(churnOpts, 1));
    if (has('churn4')) await guarded('churn4', () => measureChurn(churnOpts, 4));
    if (has('miss')) await guarded('miss', () => measureMiss(churnOpts));
  }

  if (has('paired')) {
    await guarded('paired', () => measurePaired({ quick: opts.quick, n: opts.n, warmup: opts.warmup, imagesDir: IMAGES_DIR, baselineDir: opts.baseline! }));
  }

  if (has('cluster')) await guarded('cluster', () => measureCluster(opts));
  // Each against its own `podflare serve` child process.
  if (has('templates')) await guarded('templates', () => measureTemplates({ imagesDir: IMAGES_DIR, quick: opts.quick }));
  if (has('load')) await guarded('load', () => measureLoad(opts));
  if (has('crash')) await guarded('crash', () => measureCrashCycles(opts));
  if (has('survive')) await guarded('survive', () => measureSurvival(opts));
  if (has('vm')) {
    // Two VM templates boot here (seconds each under TCG); a small pool: every clone is a QEMU.
    let bs = null as BenchServer | null;
    await guarded('server start (vm, pool 2)', async () => { bs = await startBenchServer({ poolSize: 2 }); });
    if (bs) {
      const vmServer: BenchServer = bs;
      await guarded('vm (pooled)', () => measureVmPooled(vmServer, opts));
      await guarded('server stop (vm, pool 2)', () => stopBenchServer(vmServer));
    }
    bs = null;
    await guarded('server start (vm, pool off)', async () => { bs = await startBenchServer({ poolSize: 0 }); });
    if (bs) {
      const vmServer: BenchServer = bs;
      await guarded('vm (pool off)', () => measureVmUnpooled(vmServer, opts));
      await guarded('server stop (vm, pool off)', () => stopBenchServer(vmServer));
    }
  }

  await cleanup();
  for (const [m, k] of serverWarnings) notes.push(`server warned ${k}× ${m}`);
  for (const [m, k] of processWarnings) notes.push(`node warned ${k}× ${m}`);
  notes.push(`load average at the end: ${os.loadavg().map((l) => l.toFixed(2)).join(' ')} (other work on this host skews the figures)`);

  // Rows in a fixed order, whatever order they were measured in.
  const order = ['create (', 'hot runCode', '  peer', 'create → run', 'idle pooled', 'destroy', 'create egress:false', 'create egress:true'];
  const rank = (r: Row) => { const i = order.findIndex((p) => r.measure.startsWith(p)); return i === -1 ? order.length : i; };
  const sorted = rows.map((r, i) => ({ r, i })).sort((a, b) => rank(a.r) - rank(b.r) || a.i - b.i).map((x) => x.r);

  console.log(formatTable(
    ['measure', 'n', 'p50', 'p99', 'target', 'vs peer', 'status'],
    sorted.map((r) => [r.measure, r.n, r.p50, r.p99, r.target, r.peer, r.status]),
  ));
  if (notes.length) {
    console.log('');
    for (const n of notes) console.log(`- ${n}`);
  }
}

main().then(
  () => {
    if (failureState.anyFailed) console.log('\nbench: some operations failed (see FAILED above): exit 1');
    process.exit(crashed || failureState.anyFailed ? 1 : 0);
  },
  async (err) => {
    console.error('bench: crashed:', err);
    await cleanup();
    process.exit(1);
  },
);
