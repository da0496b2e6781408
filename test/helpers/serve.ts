/**
 * `podflare serve` as a child process (so it can be killed with SIGKILL), and one crash cycle:
 * sandboxes at work, kill -9, restart on the same state directory, then check that nothing of the
 * killed server's sandboxes is left unless they still work. Shared by test/crash-safety.test.ts
 * and the bench's 100-cycle run.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { cgroupsOf, forkLayersIn, overlayMountsUnder, processesMentioning, processesOf, sandboxDirsIn, stillRunning } from './leaks.js';
import { IMAGES_DIR } from './server.js';

const CLI = path.resolve(import.meta.dirname, '../../packages/cli/dist/main.js');

export interface ServeProcess {
  url: string;
  pid: number;
  child: ChildProcess;
  /** The tail of what it wrote on stderr. */
  stderr(): string;
  /** Resolves with its exit code (null: killed by a signal). */
  exited: Promise<number | null>;
  /** SIGTERM and wait for a clean exit. */
  stop(): Promise<void>;
  /** SIGKILL and wait until the process is gone. */
  kill9(): Promise<void>;
  create(body?: Record<string, unknown>): Promise<string>;
  /** Runs python code, resolves to its stdout (rejects on a non-zero exit). */
  run(id: string, code: string): Promise<string>;
  /** Starts an exec and does not wait for it (it may never end: the server gets killed). */
  runInFlight(id: string, code: string): void;
  fork(id: string, n: number): Promise<string[]>;
  info(id: string): Promise<{ id: string; state: string }>;
  destroy(id: string): Promise<void>;
}

/**
 * `detached`: in a process group of its own (pgid = its pid), to signal the whole group.
 * `onStop`: what a SIGTERM does with live sandboxes; 'destroy' unless asked (a test leaves nothing
 * running). It also decides a kill -9: 'keep' leaves them to the next server, 'destroy' ends them
 * with the server (their holders watch it).
 */
export async function startServe(
  stateDir: string, opts: { poolSize?: number; env?: Record<string, string>; detached?: boolean; onStop?: 'keep' | 'destroy'; cli?: string; logLevel?: string } = {},
): Promise<ServeProcess> {
  const child = spawn(process.execPath, [opts.cli ?? CLI, 'serve', '--port', '0', '--state-dir', stateDir, '--images-dir', IMAGES_DIR,
    '--pool-size', String(opts.poolSize ?? 1), '--log-level', opts.logLevel ?? 'warn', '--on-stop', opts.onStop ?? 'destroy'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // A modest disk volume (reserved on the host; see TEST_DISK_VOLUME_BYTES in server.ts).
    env: { ...process.env, PODFLARE_API_KEYS: '', PODFLARE_DISK_VOLUME_MB: '1024', ...opts.env },
    detached: opts.detached === true,
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-4000); });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`podflare serve did not start: ${stderr}`)), 60_000);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /http:\/\/127\.0\.0\.1:\d+/.exec(out);
      if (m) { clearTimeout(timer); resolve(m[0]); }
    });
    void exited.then((code) => { clearTimeout(timer); reject(new Error(`podflare serve exited (${code}): ${stderr.trim()}`)); });
  });
  const api = async (method: string, p: string, body?: unknown) => {
    const res = await fetch(url + p, { method, headers: { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${text}`);
    return text;
  };
  const run = async (id: string, code: string) => {
    const lines = (await api('POST', `/v1/sandboxes/${id}/exec`, { code })).trim().split('\n').map((l) => JSON.parse(l) as { type: string; data: unknown });
    const exit = lines.find((e) => e.type === 'exit');
    if (exit?.data !== 0) throw new Error(`exec exited ${String(exit?.data)}: ${JSON.stringify(lines.slice(-3))}`);
    return lines.filter((e) => e.type === 'stdout').map((e) => e.data as string).join('');
  };
  return {
    url,
    pid: child.pid!,
    child,
    stderr: () => stderr,
    exited,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const code = await exited;
      if (code !== 0) throw new Error(`podflare serve exited with ${code ?? child.signalCode}: ${stderr}`);
    },
    async kill9() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
    async create(body = {}) {
      return (JSON.parse(await api('POST', '/v1/sandboxes', body)) as { id: string }).id;
    },
    run,
    runInFlight(id, code) {
      void fetch(url + `/v1/sandboxes/${id}/exec`, { method: 'POST', body: JSON.stringify({ code }), headers: { 'content-type': 'application/json' } })
        .then((res) => res.text()).catch(() => undefined);
    },
    async fork(id, n) {
      return (JSON.parse(await api('POST', `/v1/sandboxes/${id}/fork`, { n })) as { children: string[] }).children;
    },
    async info(id) {
      return JSON.parse(await api('GET', `/v1/sandboxes/${id}`)) as { id: string; state: string };
    },
    async destroy(id) {
      await api('DELETE', `/v1/sandboxes/${id}`);
    },
  };
}

export interface CrashCycleResult {
  restarted: ServeProcess;
  /** The killed server's sandboxes. */
  sandboxes: string[];
  verdicts: Array<{ id: string; state: string; working: boolean }>;
  /** How long the restart took (spawn to listening, reconciliation included), ms. */
  restartMs: number;
  /** What was found left over or wrong after the restart (empty when all is well). */
  problems: string[];
}

/**
 * One cycle: on `serve`, sandboxes with work in flight (an idle one with state, its fork child,
 * a long exec, a child process, `inflight` more busy ones), kill -9, restart, check leftovers.
 * Throws only if the cycle could not be set up; what the restart left wrong is in `problems`.
 * `serve` should run with `--on-stop keep` (a destroy-mode server's sandboxes end with it, so none
 * would be adopted); the restarted server runs with `onStop` (default 'keep', for the next cycle).
 */
export async function crashCycle(serve: ServeProcess, stateDir: string, opts: { inflight?: number; onStop?: 'keep' | 'destroy' } = {}): Promise<CrashCycleResult> {
  const idle = await serve.create();
  assert.equal(await serve.run(idle, 'x = 41\nprint(x + 1)'), '42\n');
  const [child] = await serve.fork(idle, 1);
  const sleeper = await serve.create();
  await serve.run(sleeper, 'import subprocess\np = subprocess.Popen(["sleep", "1000"])\nprint(p.pid)');
  serve.runInFlight(sleeper, 'import time\ntime.sleep(600)');
  const busy = await Promise.all(Array.from({ length: opts.inflight ?? 1 }, () => serve.create({ egress: false })));
  for (const id of busy) serve.runInFlight(id, 'import time\nfor i in range(6000):\n    print(i, flush=True)\n    time.sleep(0.01)');
  const ids = [idle, child!, sleeper, ...busy];
  // Let the execs start: the kill lands while they run.
  for (let i = 0; i < 50 && (await serve.info(sleeper)).state !== 'running'; i++) await new Promise((r) => setTimeout(r, 20));

  const stamps = processesOf(ids, serve.pid);
  // Pooled sandboxes have a directory but no record: they must go too.
  const dirsBefore = sandboxDirsIn(stateDir);
  assert.ok(stamps.length >= ids.length, `found the sandboxes' processes (${stamps.length})`);
  await serve.kill9();
  // The sandboxes live on under their holders, for the next server to adopt. One of them dies
  // while no server runs (its holder killed: bwrap dies with it); stand in for what it could
  // leave behind: a process of its own that survived, an overlay mounted on the host.
  for (const line of processesMentioning(`holders/${sleeper}.sock`)) {
    try { process.kill(Number(line.split(':')[0]), 'SIGKILL'); } catch { /* gone */ }
  }
  const survivor = spawn('sleep', ['1000'], { env: { PODFLARE_SANDBOX_ID: sleeper }, stdio: 'ignore', detached: true });
  survivor.unref();
  stamps.push(...processesOf([sleeper]).filter((p) => p.pid === survivor.pid));
  assert.equal(stillRunning(stamps).filter((p) => p.pid === survivor.pid).length, 1, 'the stand-in survivor runs');
  const hostMount = path.join(stateDir, 'sandboxes', sleeper, 'root');
  await mkdir(hostMount, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', 'tmpfs', hostMount]);

  const t0 = performance.now();
  const restarted = await startServe(stateDir, { onStop: opts.onStop ?? 'keep' });
  const restartMs = performance.now() - t0;

  const verdicts: CrashCycleResult['verdicts'] = [];
  for (const id of ids) {
    const { state } = await restarted.info(id);
    let working = false;
    if (state === 'ready' || state === 'running') working = (await restarted.run(id, 'print("alive")').catch(() => '')) === 'alive\n';
    verdicts.push({ id, state, working });
  }
  // What is left of the sandboxes not adopted is removed behind the restart (the adopted ones
  // answer meanwhile): it must be gone soon, not at once.
  let problems = await leftoverProblems(restarted, stateDir, verdicts, sleeper, stamps, dirsBefore);
  for (let i = 0; problems.length && i < LEFTOVER_POLLS; i++) {
    await new Promise((r) => setTimeout(r, 250));
    problems = await leftoverProblems(restarted, stateDir, verdicts, sleeper, stamps, dirsBefore);
  }
  return { restarted, sandboxes: ids, verdicts, restartMs, problems };
}

/**
 * Sandboxes the server keeps only as parents of others (its records in <state>/holders/: a husk,
 * or the parent named by a sandbox that is held): a zygote whose pool children live, a deleted
 * parent of live fork children. Their processes and directories are not leftovers.
 */
function husksKeptFor(stateDir: string): string[] {
  const dir = path.join(stateDir, 'holders');
  if (!existsSync(dir)) return [];
  const records = readdirSync(dir).filter((n) => n.endsWith('.json')).flatMap((n) => {
    try {
      return [JSON.parse(readFileSync(path.join(dir, n), 'utf8')) as { spec?: { id?: string }; parentId?: string | null; husk?: boolean }];
    } catch {
      return []; // being written or removed
    }
  });
  const ids = new Set<string>();
  for (const r of records) {
    if (r.husk && r.spec?.id) ids.add(r.spec.id);
    if (r.parentId) ids.add(r.parentId);
  }
  return [...ids];
}

/** Polls of leftoverProblems, 250 ms apart, before a crash cycle's leftovers count as leaked. */
const LEFTOVER_POLLS = 80;

/** What is left of a crash cycle's sandboxes that were not adopted (empty when all is well). */
async function leftoverProblems(
  restarted: ServeProcess, stateDir: string, verdicts: CrashCycleResult['verdicts'], sleeper: string,
  stamps: ReturnType<typeof processesOf>, dirsBefore: string[],
): Promise<string[]> {
  const problems: string[] = [];
  const expect = (ok: boolean, problem: string) => { if (!ok) problems.push(problem); };
  for (const { id, state, working } of verdicts) {
    if (working) continue;
    expect(state === 'lost', `${id}: neither working nor recorded lost (state ${state})`);
    // Cleaned up completely: nothing of it in the process table, the mount table or on disk.
    const procs = processesMentioning(id);
    expect(procs.length === 0, `${id}: processes left: ${procs.join('; ')}`);
    const mounts = overlayMountsUnder(path.join(stateDir, 'sandboxes', id));
    expect(mounts.length === 0, `${id}: mounts left: ${mounts.join(' ')}`);
    expect(!sandboxDirsIn(stateDir).includes(id), `${id}: its directory is left`);
    const groups = cgroupsOf(id);
    expect(groups.length === 0, `${id}: cgroups left: ${groups.join(' ')}`);
  }
  expect(verdicts.find((v) => v.id === sleeper)?.state === 'lost', `${sleeper}: its holder was killed, yet it is not lost`);
  // What may survive the killed server: the sandboxes adopted (working), their processes and holders,
  // and the husks kept for them: a parent (a pool's zygote, a deleted parent) of a sandbox that lives.
  const working = verdicts.filter((v) => v.working).map((v) => v.id);
  const keptFor = husksKeptFor(stateDir);
  const kept = [...working, ...keptFor];
  const theirs = new Set([...processesOf(kept).map((p) => p.pid), ...kept.flatMap((id) => processesMentioning(id).map((l) => Number(l.split(':')[0])))]);
  const survivors = stillRunning(stamps).filter((p) => !theirs.has(p.pid));
  expect(survivors.length === 0, `processes of the killed server survive: ${survivors.map((p) => `${p.pid} ${p.cmd}`).join('; ')}`);
  // Sandboxes of earlier cycles adopted once more are live too: only what nobody drives is a leftover.
  const live = async (id: string) => ['ready', 'running'].includes((await restarted.info(id).catch(() => ({ state: 'none' }))).state);
  const dirsLeft: string[] = [];
  for (const d of sandboxDirsIn(stateDir).filter((x) => dirsBefore.includes(x) && !keptFor.includes(x))) if (!(await live(d))) dirsLeft.push(d);
  expect(dirsLeft.length === 0, `directories of the killed server's sandboxes left: ${dirsLeft.join(' ')}`);
  const layers: string[] = [];
  for (const l of forkLayersIn(stateDir)) if (!(await live(l.split('/')[1] ?? ''))) layers.push(l);
  expect(layers.length === 0, `fork layers left: ${layers.join(' ')}`);
  return problems;
}
