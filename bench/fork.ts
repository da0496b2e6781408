/**
 * The fork measures (names for --only): fork5, fork1, forkvsnaive, diff1000, forkmem.
 *
 * They run on a server of their own (same pool size as the main one). Every fork's children are
 * closed outside the timed part, and before the next timed fork the benchmark waits until their
 * processes (and their slirp4netns) are really gone: the DELETE answers before the teardown ends,
 * and a teardown still running would otherwise share the 2 CPUs with the next fork.
 *
 * A fork run is heavy (n interpreters forked, n roots grafted, n networks attached, then n
 * teardowns waited for), so the fork timings use at most FORK_RUNS runs, fewer than the other
 * measures; the naive path of forkvsnaive (5 fresh sandboxes that each import pandas and parse a
 * 50 MB CSV) takes seconds per run, so it uses a handful.
 */
import { performance } from 'node:perf_hooks';
import { Sandbox, type Client } from 'podflare';
import type { RunningServer } from '@podflare/server';
import { childrenMap, findSandboxBwrap, processes, spawnedSlirps, treeMemory, type TreeMemory } from './memory.js';
import { detail, Failures, failLimit, notes, rows, status, timingRow } from './report.js';
import { fmtMB, fmtMs, summarize } from './stats.js';

export const FORK_MEASURES = ['fork5', 'fork1', 'forkvsnaive', 'diff1000', 'forkmem'] as const;
export type ForkMeasureName = (typeof FORK_MEASURES)[number];

export interface ForkBenchServer {
  server: RunningServer;
  client: Client;
}

export interface ForkOptions {
  quick: boolean;
  n: number;
  warmup: number;
}

export const FORK_TARGET = {
  fork5P50: 40,
  /** The hosted product reports ~80–101 ms for fork(5): the middle is the reference. */
  hostedFork5: 90,
  fork1P50: 15,
  fork1Growth: 1.3,
  forkVsNaive: 10,
  diffP50: 200,
  forkMemRatio: 1.3,
};

/** Upper bound on timed runs of the fork timings (fork5, fork1 per parent, the fork side of forkvsnaive). */
const FORK_RUNS = 100;
const SETUP_TIMEOUT_MS = 180_000;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs Python that must succeed (set-up steps, untimed); returns its stdout. */
async function py(sbx: Sandbox, code: string, what: string): Promise<string> {
  const ex = await sbx.runCode(code, { timeoutMs: SETUP_TIMEOUT_MS });
  if (ex.error || ex.exitCode !== 0) {
    const why = ex.error ? `${ex.error.name}: ${ex.error.value}` : `exit code ${ex.exitCode}`;
    throw new Error(`${what} failed in ${sbx.id}: ${why}${ex.stderr ? ` (stderr: ${ex.stderr.trim().slice(-300)})` : ''}`);
  }
  return ex.stdout;
}

/**
 * Processes of every sandbox of this process: the bwrap trees and the slirp4netns (not the host
 * helpers), live ones and zombies apart.
 */
async function sandboxProcesses(): Promise<{ live: number; zombies: number }> {
  const procs = await processes();
  const byPid = new Map(procs.map((p) => [p.pid, p]));
  const children = childrenMap(procs);
  let live = 0;
  let zombies = 0;
  const roots = [...(children.get(process.pid) ?? []).filter((p) => p.comm === 'bwrap'), ...spawnedSlirps(children)];
  const queue = roots.map((p) => p.pid);
  while (queue.length) {
    const pid = queue.shift()!;
    if (byPid.get(pid)?.state === 'Z') zombies++;
    else live++;
    queue.push(...(children.get(pid) ?? []).map((c) => c.pid));
  }
  return { live, zombies };
}

/**
 * Waits for a quiet server before a timed run: the pool full and no live sandbox process beyond
 * `baseline` (the count taken when only the measure's long-lived sandboxes were up).
 *
 * Closed fork children stay zombies under their parent's interpreter: the agent reaps them only
 * after an exec. Left alone they pile up (one per child per run) in the parent's process tree,
 * which the server walks on every fork; so when there are any, an untimed `pass` runs on each
 * parent, as a user's code between two forks would, and the notes say how many there were.
 */
class Settler {
  baseline = 0;
  timeouts = 0;
  reaps = 0;
  maxZombies = 0;
  leftZombies = 0;
  parents: Sandbox[] = [];
  constructor(private readonly bs: ForkBenchServer, private readonly measure: string) {}

  async mark(...parents: Sandbox[]): Promise<void> {
    this.parents = parents;
    await this.bs.server.manager.waitPoolFull(120_000);
    await sleep(200);
    this.baseline = (await sandboxProcesses()).live;
  }

  async settle(timeoutMs = 20_000): Promise<void> {
    await this.bs.server.manager.waitPoolFull(120_000);
    const deadline = performance.now() + timeoutMs;
    let quiet = false;
    while (!quiet && performance.now() < deadline) {
      quiet = (await sandboxProcesses()).live <= this.baseline;
      if (!quiet) await sleep(10);
    }
    if (!quiet) this.timeouts++;
    const { zombies } = await sandboxProcesses();
    if (!zombies) return;
    this.maxZombies = Math.max(this.maxZombies, zombies);
    this.reaps++;
    for (const p of this.parents) await p.runCode('pass');
    let left = zombies;
    for (let i = 0; i < 20 && left; i++) {
      await sleep(10);
      left = (await sandboxProcesses()).zombies;
    }
    this.leftZombies = Math.max(this.leftZombies, left);
  }

  report(): void {
    if (this.timeouts) notes.push(`${this.measure}: WARNING ${this.timeouts}× the closed children's processes were not all gone after 20 s; the next run went on anyway`);
    if (this.reaps) {
      notes.push(`${this.measure}: closed fork children were left as zombies under the parent's interpreter before ${this.reaps} run${this.reaps === 1 ? '' : 's'} (up to ${this.maxZombies} at once): ` +
        `an untimed exec ("pass") on the parent reaped them before the next timed run` +
        (this.leftZombies ? `; WARNING up to ${this.leftZombies} zombies were still there after it` : ''));
    }
  }
}

async function closeAll(sandboxes: Sandbox[], failures: Failures): Promise<void> {
  await Promise.all(sandboxes.map((s) => failures.attempt('close', () => s.close())));
}

/** One timed fork(n): the call resolving means every child's agent answered. Children closed after. */
async function timedFork(parent: Sandbox, n: number, failures: Failures, check?: (kids: Sandbox[]) => Promise<void>): Promise<number | undefined> {
  const t0 = performance.now();
  const kids = await failures.attempt('fork', () => parent.fork(n));
  const t1 = performance.now();
  if (!kids) return undefined;
  try {
    if (kids.length !== n) {
      failures.record('fork', new Error(`asked for ${n} children, got ${kids.length}`));
      return undefined;
    }
    if (check) {
      try {
        await check(kids);
      } catch (err) {
        failures.record('fork child check', err);
        return undefined;
      }
    }
    return t1 - t0;
  } finally {
    await closeAll(kids, failures);
  }
}

/** A check that every child still holds the parent's state: `code` must print `expected`. */
function stateCheck(code: string, expected: string) {
  return async (kids: Sandbox[]) => {
    await Promise.all(kids.map(async (k) => {
      const ex = await k.runCode(code);
      if (ex.stdout !== expected) throw new Error(`child ${k.id} printed ${JSON.stringify(ex.stdout)} instead of ${JSON.stringify(expected)}${ex.error ? ` (${ex.error.name}: ${ex.error.value})` : ''}`);
    }));
  };
}

const forkRuns = (opts: ForkOptions) => Math.min(opts.n, opts.quick ? 20 : FORK_RUNS);
const forkWarmup = (opts: ForkOptions) => Math.min(opts.warmup, 3);

// ---------------------------------------------------------------------------------------------
// fork5: fork(5) of a parent holding a 200 MB DataFrame

const DF_CODE = 'import numpy as np, pandas as pd\ndf = pd.DataFrame(np.random.rand(3_276_800, 8))\nprint(int(df.memory_usage(index=True).sum()))';

export async function measureFork5(bs: ForkBenchServer, opts: ForkOptions): Promise<void> {
  const runs = forkRuns(opts);
  const warmup = forkWarmup(opts);
  const failures = new Failures('fork5', failLimit(runs));
  const settler = new Settler(bs, 'fork5');
  const parent = await Sandbox.create({ client: bs.client });
  const samples: number[] = [];
  let dfBytes = 0;
  try {
    dfBytes = Number(await py(parent, DF_CODE, 'building the 200 MB DataFrame'));
    await settler.mark(parent);
    for (let i = 0; i < warmup + runs; i++) {
      await settler.settle();
      // The first warm-up also checks that every child holds the DataFrame.
      const ms = await timedFork(parent, 5, failures, i === 0 ? stateCheck('print(df.shape)', '(3276800, 8)\n') : undefined);
      if (ms !== undefined && i >= warmup) samples.push(ms);
    }
  } finally {
    await parent.close();
  }
  settler.report();
  const s = summarize(samples);
  const vsHosted = FORK_TARGET.hostedFork5 / s.p50;
  const peer = `vs hosted (~${FORK_TARGET.hostedFork5} ms): ${vsHosted >= 1 ? `${vsHosted.toFixed(2)}× faster` : `${(1 / vsHosted).toFixed(2)}× slower`}`;
  rows.push(timingRow('fork(5), parent holds a 200 MB DataFrame', s, `p50 ≤ ${FORK_TARGET.fork5P50} ms`, peer,
    failures.report(status(s.p50 <= FORK_TARGET.fork5P50))));
  notes.push(`fork5: parent DataFrame ${fmtMB(dfBytes)} (pd.DataFrame(np.random.rand(3_276_800, 8))); timed from the fork call to its answer ` +
    `(every child's agent answered; the children have egress like their parent, and each child's network and cgroups are attached right after, before its first request is served); children closed outside the timing and ` +
    `their teardown waited for before the next run; ${runs} runs after ${warmup} warm-ups (fewer than the other measures: each run is heavy); ` +
    `vs hosted = ${FORK_TARGET.hostedFork5} ms / p50 (hosted reports ~80–101 ms); ${detail('fork(5)', s)}`);
}

// ---------------------------------------------------------------------------------------------
// fork1: fork(1) of a 10 MB and of a 1 GB parent, interleaved

export async function measureFork1(bs: ForkBenchServer, opts: ForkOptions): Promise<void> {
  const runs = forkRuns(opts);
  const warmup = forkWarmup(opts);
  const failures = new Failures('fork1', failLimit(2 * runs));
  const settler = new Settler(bs, 'fork1');
  const small = await Sandbox.create({ client: bs.client });
  let big: Sandbox | undefined;
  const samples = { small: [] as number[], big: [] as number[] };
  const bytes = { small: 0, big: 0 };
  try {
    big = await Sandbox.create({ client: bs.client, limits: { memoryMb: 4096 } }); // 1 GB of state, past the 1 GB default
    bytes.small = Number(await py(small, 'import numpy as np\na = np.ones(10 * 1024 * 1024 // 8)\nprint(a.nbytes)', 'building the 10 MB array'));
    bytes.big = Number(await py(big, 'import numpy as np\na = np.ones(128 * 1024 * 1024)\nprint(a.nbytes)', 'building the 1 GB array'));
    await settler.mark(small, big);
    // Interleaved, so drift on the host weighs on both parents alike.
    for (let i = 0; i < warmup + runs; i++) {
      for (const [key, parent] of [['small', small], ['big', big]] as const) {
        await settler.settle();
        const check = i === 0 ? stateCheck('print(a.nbytes)', `${bytes[key]}\n`) : undefined;
        const ms = await timedFork(parent, 1, failures, check);
        if (ms !== undefined && i >= warmup) samples[key].push(ms);
      }
    }
  } finally {
    await Promise.all([small.close(), big?.close()]);
  }
  settler.report();
  const s10 = summarize(samples.small);
  const s1g = summarize(samples.big);
  const growth = s1g.p50 / s10.p50;
  const st = failures.report('');
  rows.push(timingRow('fork(1), 10 MB parent', s10, `p50 ≤ ${FORK_TARGET.fork1P50} ms`, '–', status(s10.p50 <= FORK_TARGET.fork1P50) + st));
  rows.push(timingRow('fork(1), 1 GB parent', s1g, `p50 ≤ ${FORK_TARGET.fork1P50} ms`, '–', status(s1g.p50 <= FORK_TARGET.fork1P50) + st));
  rows.push({
    measure: '  fork(1) growth, 1 GB / 10 MB p50', n: `${s1g.n}+${s10.n}`, p50: `${growth.toFixed(2)}×`, p99: `${(s1g.p99 / s10.p99).toFixed(2)}×`,
    target: `≤ ${FORK_TARGET.fork1Growth}×`, peer: '–', status: status(growth <= FORK_TARGET.fork1Growth),
  });
  notes.push(`fork1: parents hold np.ones arrays of ${fmtMB(bytes.small)} and ${fmtMB(bytes.big)}; the two parents' forks alternate; ` +
    `${runs} runs each after ${warmup} warm-ups; growth p99 column = ratio of the p99s; ${detail('fork(1) 10 MB', s10)}; ${detail('fork(1) 1 GB', s1g)}`);
}

// ---------------------------------------------------------------------------------------------
// forkvsnaive: fork(5) of a set-up parent vs 5 fresh sandboxes doing the set-up

const CSV_PATH = '/root/data.csv';
const CSV_ROWS = 600_000;
/**
 * 600,000 × 10 floats at full precision make a ~120 MB CSV; 5 decimals bring the same rows to
 * ~52 MB (≈ 50 MB asked for).
 */
const CSV_CODE = `import numpy as np, pandas as pd, os\npd.DataFrame(np.random.rand(${CSV_ROWS}, 10)).to_csv('${CSV_PATH}', float_format='%.5f')\nprint(os.path.getsize('${CSV_PATH}'))`;
const SETUP_CODE = `import pandas as pd\ndf = pd.read_csv('${CSV_PATH}')\nprint(df.shape)`;
const SETUP_OUT = `(${CSV_ROWS}, 11)\n`;

export async function measureForkVsNaive(bs: ForkBenchServer, opts: ForkOptions): Promise<void> {
  const forkN = opts.quick ? 5 : 20;
  const naiveN = opts.quick ? 3 : 8;
  const failures = new Failures('forkvsnaive', failLimit(forkN + naiveN));
  const settler = new Settler(bs, 'forkvsnaive');
  const parent = await Sandbox.create({ client: bs.client });
  const forkSamples: number[] = [];
  const naive = { total: [] as number[], create: [] as number[], setup: [] as number[] };
  let csvBytes = 0;
  let poolHits = 0;
  let creates = 0;
  try {
    csvBytes = Number(await py(parent, CSV_CODE, 'writing the CSV'));
    if (csvBytes < 40 * 2 ** 20 || csvBytes > 60 * 2 ** 20) throw new Error(`the CSV is ${fmtMB(csvBytes)}, not ≈ 50 MB`);
    // The very bytes the naive sandboxes will get.
    const csv = await parent.files.download(CSV_PATH);
    if (csv.length !== csvBytes) throw new Error(`downloaded ${csv.length} bytes of the CSV, expected ${csvBytes}`);
    const out = await py(parent, SETUP_CODE, 'the set-up in the parent');
    if (out !== SETUP_OUT) throw new Error(`the parent's set-up printed ${JSON.stringify(out)}`);
    await settler.mark(parent);

    // Fork side: the parent already imported pandas and parsed the CSV.
    for (let i = 0; i < 2 + forkN; i++) {
      await settler.settle();
      const ms = await timedFork(parent, 5, failures, i === 0 ? stateCheck('print(df.shape)', SETUP_OUT) : undefined);
      if (ms !== undefined && i >= 2) forkSamples.push(ms);
    }

    // Naive side: 5 fresh sandboxes (from the warm pool, as a user would get them), created in
    // parallel (timed), the CSV uploaded to each (not timed), the pool refilled (not timed), then
    // `import pandas` + read_csv in all five in parallel (timed). Naive = both timed phases.
    for (let i = 0; i < 1 + naiveN; i++) {
      await settler.settle();
      const hitsBefore = poolHitsOf(bs);
      const t0 = performance.now();
      const made = await Promise.all(Array.from({ length: 5 }, () => failures.attempt('naive create', () => Sandbox.create({ client: bs.client }))));
      const t1 = performance.now();
      const boxes = made.filter((b): b is Sandbox => b !== undefined);
      try {
        if (boxes.length < 5) continue;
        if (i >= 1) { creates += 5; poolHits += poolHitsOf(bs) - hitsBefore; }
        const uploaded = await Promise.all(boxes.map((b) => failures.attempt('naive upload', () => b.upload(CSV_PATH, csv))));
        if (uploaded.some((u) => !u || u.size !== csvBytes)) continue;
        await bs.server.manager.waitPoolFull(120_000);
        const t2 = performance.now();
        const exs = await Promise.all(boxes.map((b) => failures.attempt('naive set-up', () => b.runCode(SETUP_CODE, { timeoutMs: SETUP_TIMEOUT_MS }))));
        const t3 = performance.now();
        if (exs.some((ex) => !ex)) continue; // recorded by attempt
        const bad = exs.find((ex) => ex!.stdout !== SETUP_OUT);
        if (bad) {
          failures.record('naive set-up', new Error(`printed ${JSON.stringify(bad.stdout)}${bad.error ? ` (${bad.error.name}: ${bad.error.value})` : ''}`));
          continue;
        }
        if (i < 1) continue;
        naive.create.push(t1 - t0);
        naive.setup.push(t3 - t2);
        naive.total.push(t1 - t0 + (t3 - t2));
      } finally {
        await closeAll(boxes, failures);
      }
    }
  } finally {
    await parent.close();
  }
  settler.report();
  const f = summarize(forkSamples);
  const nv = summarize(naive.total);
  const ratio = nv.p50 / f.p50;
  rows.push(timingRow('fork(5) of a set-up parent (pandas + 50 MB CSV read)', f, `≥ ${FORK_TARGET.forkVsNaive}× faster than naive`,
    `naive p50 ${fmtMs(nv.p50)} → ${ratio.toFixed(1)}× faster`, failures.report(status(ratio >= FORK_TARGET.forkVsNaive))));
  rows.push(timingRow('  naive: 5 fresh sandboxes, each import pandas + read_csv', nv, '(peer)', '–', '–'));
  const p50 = (xs: number[]) => fmtMs(summarize(xs).p50);
  notes.push(`forkvsnaive: CSV ${fmtMB(csvBytes)} (${csvBytes} bytes; ${CSV_ROWS.toLocaleString('en-US')} rows × 10 floats with 5 decimals + index), ` +
    `written once in the parent, downloaded and uploaded byte for byte to each naive sandbox before its timing; ` +
    `naive = create ×5 in parallel (${poolHits}/${creates} warm-pool hits) + [upload and pool refill, not timed] + ` +
    `"import pandas; pd.read_csv" in the 5 in parallel; naive phases p50: create ${p50(naive.create)}, set-up ${p50(naive.setup)}; ` +
    `${nv.n} naive runs after 1 warm-up, ${f.n} fork runs after 2 warm-ups (naive is slow: few runs, so p99 ≈ max); ` +
    `each fork also copies the parent's upper layer (the 50 MB CSV) into a fork layer; ${detail('fork(5)', f)}; ${detail('naive', nv)}`);
}

function poolHitsOf(bs: ForkBenchServer): number {
  return bs.server.manager.poolStats.reduce((s, p) => s + p.hits, 0);
}

// ---------------------------------------------------------------------------------------------
// diff1000: two siblings with 1,000 changed files each

const writeFilesCode = (tag: string) =>
  `import os\nos.makedirs('/root/out', exist_ok=True)\nfor i in range(1000):\n    with open(f'/root/out/f{i:04d}.txt', 'w') as f:\n        f.write(f'${tag} {i}\\n')\nprint(len(os.listdir('/root/out')))`;

export async function measureDiff1000(bs: ForkBenchServer, opts: ForkOptions): Promise<void> {
  const failures = new Failures('diff1000', failLimit(opts.n));
  const parent = await Sandbox.create({ client: bs.client });
  const samples: number[] = [];
  let kids: Sandbox[] = [];
  let shape = '';
  try {
    kids = await parent.fork(2);
    const [a, b] = kids as [Sandbox, Sandbox];
    for (const [sbx, tag] of [[a, 'a'], [b, 'b']] as const) {
      const count = await py(sbx, writeFilesCode(tag), 'writing 1,000 files');
      if (count !== '1000\n') throw new Error(`${sbx.id} has ${count.trim()} files in /root/out`);
    }
    await bs.server.manager.waitPoolFull(120_000);
    for (let i = 0; i < opts.warmup + opts.n; i++) {
      const t0 = performance.now();
      const d = await failures.attempt('diff', () => a.diff(b));
      const t1 = performance.now();
      if (!d) continue;
      const inOut = (xs: string[]) => xs.filter((p) => p.startsWith('/root/out/')).length;
      if (inOut(d.modified) !== 1000 || inOut(d.added) || inOut(d.removed)) {
        failures.record('diff', new Error(`wrong answer under /root/out: ${inOut(d.modified)} modified, ${inOut(d.added)} added, ${inOut(d.removed)} removed`));
        continue;
      }
      if (i === 0) shape = `${d.added.length} added, ${d.removed.length} removed, ${d.modified.length} modified in all`;
      if (i >= opts.warmup) samples.push(t1 - t0);
    }
  } finally {
    await closeAll(kids, failures);
    await parent.close();
  }
  const s = summarize(samples);
  rows.push(timingRow('diff of 2 siblings, 1,000 changed files each', s, `p50 ≤ ${FORK_TARGET.diffP50} ms`, '–',
    failures.report(status(s.p50 <= FORK_TARGET.diffP50))));
  notes.push(`diff1000: fork(2) of a fresh parent, each child writes /root/out/f0000…f0999.txt with its own contents; a.diff(b) with no options ` +
    `(whole filesystem, no content); answer: ${shape}; ${opts.n} runs after ${opts.warmup} warm-ups; ${detail('diff', s)}`);
}

// ---------------------------------------------------------------------------------------------
// forkmem: PSS of parent + 5 children right after fork(5) of a 300 MB state

export async function measureForkMem(bs: ForkBenchServer, opts: ForkOptions): Promise<void> {
  const runs = opts.quick ? 2 : 5;
  const failures = new Failures('forkmem', failLimit(runs));
  const settler = new Settler(bs, 'forkmem');
  const parent = await Sandbox.create({ client: bs.client });
  const ratios: number[] = [];
  const ratiosWithSlirp: number[] = [];
  const befores: TreeMemory[] = [];
  const afters: TreeMemory[] = [];
  let stateBytes = 0;
  try {
    stateBytes = Number(await py(parent, 'import numpy as np\nstate = np.random.rand(300 * 1024 * 1024 // 8)\nprint(state.nbytes)', 'building the 300 MB state'));
    const bwrap = await findSandboxBwrap(parent.id);
    if (bwrap === null) throw new Error(`no bwrap process of this server runs sandbox ${parent.id}`);
    await settler.mark(parent);
    for (let i = 0; i < runs; i++) {
      await settler.settle();
      await sleep(500); // the parent's own pages settle (no exec in flight)
      const before = await treeMemory(bwrap);
      const kids = await failures.attempt('fork', () => parent.fork(5));
      if (!kids) continue;
      try {
        const after = await treeMemory(bwrap);
        if (kids.length !== 5) { failures.record('fork', new Error(`got ${kids.length} children`)); continue; }
        if (after.pids.length < before.pids.length + 5) {
          failures.record('process tree', new Error(`the parent's tree went from ${before.pids.length} to ${after.pids.length} processes: the children are not in it`));
          continue;
        }
        befores.push(before);
        afters.push(after);
        ratios.push(after.treePssBytes / before.treePssBytes);
        ratiosWithSlirp.push((after.treePssBytes + after.slirpPssBytes) / (before.treePssBytes + before.slirpPssBytes));
      } finally {
        await closeAll(kids, failures);
      }
    }
  } finally {
    await parent.close();
  }
  settler.report();
  const r = summarize(ratios);
  const rs = summarize(ratiosWithSlirp);
  const mid = (xs: TreeMemory[], f: (t: TreeMemory) => number) => summarize(xs.map(f)).p50;
  rows.push({
    measure: 'PSS parent + 5 children after fork(5) of 300 MB', n: String(r.n),
    p50: `${r.p50.toFixed(2)}× (${fmtMB(mid(afters, (t) => t.treePssBytes))})`, p99: `max ${r.max.toFixed(2)}×`,
    target: `≤ ${FORK_TARGET.forkMemRatio}× pre-fork PSS (${fmtMB(mid(befores, (t) => t.treePssBytes))})`, peer: '–',
    status: failures.report(status(r.p50 <= FORK_TARGET.forkMemRatio)),
  });
  notes.push(`forkmem: parent state np.random.rand → ${fmtMB(stateBytes)}; PSS summed from /proc/<pid>/smaps_rollup over the whole process tree of the ` +
    `parent's bwrap (the children are nested in it: ${mid(befores, (t) => t.pids.length)} processes before, ${mid(afters, (t) => t.pids.length)} after), ` +
    `read once before the fork and right after it resolves (again until the set of processes holds still while it is read: a child starts its interpreter process within 50 ms); ${r.n} runs (children closed and gone between runs); ` +
    `with the slirp4netns processes (outside the tree; ${mid(befores, (t) => t.slirpPids.length)} before, ${mid(afters, (t) => t.slirpPids.length)} after: ` +
    `${fmtMB(mid(befores, (t) => t.slirpPssBytes))} → ${fmtMB(mid(afters, (t) => t.slirpPssBytes))}) the ratio is ${rs.p50.toFixed(2)}× (p50)`);
}
