/**
 * The host helper (root; the namespace runtime's mounts, layer copies and diffs) never stalls,
 * never silently breaks and never crashes the server:
 * - every worker killed with SIGKILL: replaced with its set-up (idmap) replayed, so the next
 *   create, fork and diff work; each death is an error in the logs and a count in /v1/metrics;
 * - one worker stopped (SIGSTOP) in the middle of a call: other tenants' forks and diffs go on
 *   through the other workers; the stuck call fails after its timeout, naming the op; the
 *   stopped worker is killed and replaced;
 * - an overlay prepared by one worker is attached or discarded by that worker; once it has died,
 *   an attach fails saying so and a discard has nothing left to do;
 * - a helper that writes garbage, an endless line, or stops reading its stdin: the call fails
 *   with an error saying so and the helper is killed; nothing is thrown at the server;
 * - `podflare serve` whose whole process group gets SIGTERM or SIGINT (systemd, Ctrl-C,
 *   `timeout`): exits 0 with no unhandled error or Python traceback, and leaves no sandbox
 *   directory, mount or process.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { HelperProcess, type HelperExit } from '../packages/server/src/helper-process.js';
import { createLogger } from '../packages/server/src/log.js';
import { HostHelper } from '../packages/server/src/runtime/namespace/hostd.js';
import { overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startServe } from './helpers/serve.js';
import { captureServerLogs, type CapturedLogs } from './helpers/logs.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const WORKERS = 3;
/** Diffs and squashes: short, so the stuck call's test does not wait long. */
const SLOW_TIMEOUT_MS = 12_000;

interface Proc { pid: number; ppid: number; pgrp: number; state: string; cmd: string }

function processes(): Proc[] {
  const out: Proc[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const cmd = readFileSync(`/proc/${name}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
      out.push({ pid: Number(name), state: f[0]!, ppid: Number(f[1]), pgrp: Number(f[2]), cmd });
    } catch { /* gone */ }
  }
  return out;
}

/** This test process's host helper workers (live, not zombies). */
function hostHelpers(): number[] {
  return processes().filter((p) => p.ppid === process.pid && p.state !== 'Z' && p.cmd.includes('podflare_hostd.py')).map((p) => p.pid);
}

function alive(pid: number): boolean {
  const p = processes().find((q) => q.pid === pid);
  return p !== undefined && p.state !== 'Z';
}

async function waitFor<T>(what: string, probe: () => T | undefined | false, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = probe();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Fails instead of hanging forever (today's single helper, once stopped, answers nobody). */
function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(timer));
}

async function restarts(url: string): Promise<Record<string, number>> {
  const text = await (await fetch(url + '/v1/metrics')).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^podflare_host_helper_restarts_total\{reason="(\w+)"\} (\d+)$/gm)) out[m[1]!] = Number(m[2]);
  return out;
}

describe('host helper workers', () => {
  let server: TestServer;
  let captured: CapturedLogs | undefined;
  let logs: Array<Record<string, unknown>> = [];
  const opened: Sandbox[] = [];

  before(async () => {
    captured = captureServerLogs();
    logs = captured.lines;
    server = await startTestServer({
      poolSize: 0, logLevel: 'warn', hostHelper: { workers: WORKERS, fastTimeoutMs: 10_000, slowTimeoutMs: SLOW_TIMEOUT_MS },
    });
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await server?.stop();
    captured?.restore();
  });

  const make = async () => {
    const s = await Sandbox.create({ host: server.url });
    opened.push(s);
    return s;
  };

  it('replaces every worker killed with SIGKILL, set-up included: create, fork and diff work; logged and counted', async () => {
    const first = await make(); // the runtime is prepared: every worker is up, idmap done
    const before = await restarts(server.url);
    const killed = hostHelpers();
    assert.equal(killed.length, WORKERS, `the host helper runs ${WORKERS} workers: ${killed.join(' ')}`);
    for (const pid of killed) process.kill(pid, 'SIGKILL');
    await waitFor('the killed workers to be gone', () => killed.every((pid) => !alive(pid)));

    // A create with no warm pool: overlay (through the idmapped image) on a replacement worker.
    const sbx = await within(60_000, 'create', make());
    // The image is seen through the idmap: its root-owned files are owned by the sandbox's root.
    assert.equal((await sbx.runCode('import os\nst = os.stat("/usr/bin/python3")\nprint(st.st_uid, st.st_gid)')).stdout, '0 0\n');
    await sbx.runCode('x = 41\nopen("/root/base.txt", "w").write("base\\n")');
    const [child] = await within(60_000, 'fork', sbx.fork(1));
    opened.push(child!);
    assert.equal((await child!.runCode('print(x + 1)')).stdout, '42\n');
    await child!.runCode('open("/root/new.txt", "w").write("new\\n")');
    const d = await within(60_000, 'diff', sbx.diff(child!));
    assert.deepEqual(d.added, ['/root/new.txt']);
    assert.equal((await first.runCode('print("still here")')).stdout, 'still here\n');

    const now = hostHelpers();
    assert.equal(now.length, WORKERS, 'as many workers as before');
    assert.ok(now.every((pid) => !killed.includes(pid)), 'all of them new');
    const after = await restarts(server.url);
    assert.equal((after.exit ?? 0) - (before.exit ?? 0), WORKERS, `restarts counted by reason: ${JSON.stringify(after)}`);
    const deaths = logs.filter((l) => l.level === 'error' && /host helper worker exited/.test(String(l.msg)));
    assert.equal(deaths.length, WORKERS, JSON.stringify(logs.slice(-5)));
    for (const l of deaths) {
      assert.equal(l.signal, 'SIGKILL');
      assert.ok(killed.includes(l.pid as number), `names the dead worker: ${JSON.stringify(l)}`);
    }
  });

  it("fails a stuck call after its timeout, naming the op, while other tenants' forks and diffs go on", async () => {
    // Tenant A: pairs of fork siblings, each pair diffed (the manager runs one diff per sandbox
    // at a time, so concurrent diffs need disjoint pairs). Tenant B: a sandbox to fork and diff.
    const a = await make();
    await a.runCode('open("/root/a.txt", "w").write("a\\n")');
    const kids = await a.fork(2 * (WORKERS + 1));
    opened.push(...kids);
    const pairs = Array.from({ length: WORKERS + 1 }, (_, i) => [kids[2 * i]!, kids[2 * i + 1]!] as const);
    for (const [, second] of pairs) await second.runCode('open("/root/a2.txt", "w").write("a2\\n")');
    const b = await make();
    await b.runCode('y = 6');
    const before = await restarts(server.url);

    const workers = hostHelpers();
    assert.equal(workers.length, WORKERS);
    const stuck = workers[0]!;
    process.kill(stuck, 'SIGSTOP');
    try {
      // As many diffs as workers, plus one: each idle worker gets one in turn, so one of them
      // lands on the stopped worker and hangs there.
      const started = Date.now();
      let settledAt = 0;
      let answered = 0;
      const diffsA = Promise.allSettled(pairs.map(([first, second]) => first.diff(second).finally(() => { answered++; })))
        .finally(() => { settledAt = Date.now(); });
      // All but one answered: that one is stuck on the stopped worker (which takes no other).
      await waitFor('all but the stuck diff to answer', () => answered === WORKERS, 60_000);

      // Meanwhile tenant B forks and diffs, through the other workers.
      const [b2] = await within(60_000, "tenant B's fork", b.fork(1));
      opened.push(b2!);
      assert.equal((await b2!.runCode('print(y * 7)')).stdout, '42\n');
      await b2!.runCode('open("/root/b2.txt", "w").write("b2\\n")');
      const db = await within(60_000, "tenant B's diff", b.diff(b2!));
      assert.deepEqual(db.added, ['/root/b2.txt']);
      assert.equal(settledAt, 0, "tenant B's fork and diff did not wait for tenant A's stuck call");

      const results = await within(SLOW_TIMEOUT_MS + 60_000, "tenant A's diffs", diffsA);
      const failed = results.filter((r) => r.status === 'rejected');
      assert.equal(failed.length, 1, `exactly the stuck diff failed: ${JSON.stringify(results.map((r) => r.status))}`);
      assert.match(String(failed[0]!.reason), new RegExp(`host helper: diff timed out after ${SLOW_TIMEOUT_MS} ms`));
      assert.ok(Date.now() - started >= SLOW_TIMEOUT_MS - 500, 'not before its timeout');
      for (const r of results) if (r.status === 'fulfilled') assert.deepEqual(r.value.added, ['/root/a2.txt']);
    } finally {
      try { process.kill(stuck, 'SIGCONT'); } catch { /* killed already */ }
    }

    // The stopped worker is gone (killed and reaped) and replaced.
    await waitFor('the stuck worker to be gone', () => !alive(stuck));
    const now = await waitFor('a replacement worker', () => { const p = hostHelpers(); return p.length === WORKERS && p; });
    assert.ok(!now.includes(stuck));
    const after = await restarts(server.url);
    assert.equal((after.timeout ?? 0) - (before.timeout ?? 0), 1, JSON.stringify(after));
    assert.ok(logs.some((l) => l.level === 'error' && l.reason === 'timeout' && l.pid === stuck && /diff timed out/.test(String(l.error))),
      JSON.stringify(logs.slice(-3)));
    // And the replacement works: tenant A diffs again.
    assert.deepEqual((await within(60_000, 'diff after the restart', pairs[0]![0].diff(pairs[0]![1]))).added, ['/root/a2.txt']);
  });
});

describe('podflare serve stopped by a signal to its whole process group', () => {
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    it(`${signal}: exits 0, no unhandled error or traceback, no sandbox directory, mount or process left`, async () => {
      const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-group-'));
      let group = 0;
      try {
        const serve = await startServe(stateDir, { poolSize: 1, detached: true });
        group = serve.pid;
        const id = await serve.create();
        assert.equal(await serve.run(id, 'x = 1\nprint(x)'), '1\n');
        const children = await serve.fork(id, 2); // the host helper's mounts, fork layers
        assert.equal(await serve.run(children[0]!, 'print(x + 1)'), '2\n');
        const busy = await serve.create({ egress: false });
        serve.runInFlight(busy, 'import time\ntime.sleep(600)'); // a stop with an exec in flight
        for (let i = 0; i < 100 && (await serve.info(busy)).state !== 'running'; i++) await new Promise((r) => setTimeout(r, 20));
        assert.ok(processes().some((p) => p.pgrp === group && p.cmd.includes('podflare_hostd.py')), 'the host helpers are in the group');

        process.kill(-group, signal);
        const code = await within(120_000, 'podflare serve to exit', serve.exited);
        const stderr = serve.stderr();
        assert.equal(code, 0, stderr);
        assert.doesNotMatch(stderr, /EPIPE|Unhandled|Traceback|KeyboardInterrupt|uncaught/i, stderr);

        // The helpers exit once the server is gone; nothing of the group is left.
        const left = await waitFor('the process group to end', () => {
          const rest = processes().filter((p) => p.pgrp === group && p.state !== 'Z');
          return rest.length === 0 ? [] : undefined;
        }).catch(() => processes().filter((p) => p.pgrp === group).map((p) => `${p.pid} ${p.cmd}`));
        assert.deepEqual(left, []);
        assert.deepEqual(processesMentioning(stateDir), []);
        assert.deepEqual(overlayMountsUnder(stateDir), [], 'no mount under the state directory (overlays, the disk volume)');
        assert.deepEqual(sandboxDirsIn(stateDir), []);
      } finally {
        // Whatever a failed stop left, so that this test's failure is the one reported.
        try { if (group) process.kill(-group, 'SIGKILL'); } catch { /* none left */ }
        for (const m of overlayMountsUnder(stateDir).reverse()) {
          try { execFileSync('umount', ['-l', m]); } catch { /* gone */ }
        }
        await rm(stateDir, { recursive: true, force: true }).catch(() => undefined);
      }
    });
  }
});

describe('a helper process that misbehaves', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(path.join(os.tmpdir(), 'pf-helper-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  /** A real helper process running `body` (Python); resolves its first call's outcome and its exit. */
  async function misbehave(name: string, body: string, timeoutMs?: number) {
    const script = path.join(dir, `${name}.py`);
    await writeFile(script, body);
    let exit!: (e: HelperExit) => void;
    const exited = new Promise<HelperExit>((resolve) => { exit = resolve; });
    const helper = new HelperProcess({ script, name: `test helper ${name}`, maxLineBytes: 1024 * 1024, onExit: (e) => exit(e) });
    const outcome = await helper.call({ op: 'ping' }, { timeoutMs }).then(() => new Error('answered'), (err: Error) => err);
    // Writes to it after it is gone or deaf (EPIPE) must not reach the server as an error either.
    const later = await helper.call({ op: 'again' }, { timeoutMs: 2_000 }).then(() => null, (err: Error) => err);
    helper.close();
    return { outcome, exit: await within(10_000, 'its exit', exited), later };
  }

  it('kills a helper whose reply line never ends (bounded buffer)', async () => {
    const { outcome, exit } = await misbehave('endless', 'import sys\nsys.stdin.readline()\nwhile True:\n    sys.stdout.write("x" * 65536)\n    sys.stdout.flush()\n');
    assert.match(outcome.message, /test helper endless: a reply line is longer than 1048576 bytes/);
    assert.equal(exit.signal, 'SIGKILL');
    assert.match(String(exit.reason?.message), /longer than/);
  });

  it('kills a helper that answers something other than JSON', async () => {
    const { outcome, exit } = await misbehave('garbage', 'import sys, time\nsys.stdin.readline()\nprint("{not json", flush=True)\ntime.sleep(60)\n');
    assert.match(outcome.message, /test helper garbage: unreadable reply .*\{not json/);
    assert.equal(exit.signal, 'SIGKILL');
  });

  it('survives a helper that stopped reading its stdin (EPIPE): the call times out, naming the op', async () => {
    const { outcome, later } = await misbehave('deaf', 'import os, time\nos.close(0)\ntime.sleep(60)\n', 1_000);
    assert.match(outcome.message, /test helper deaf: ping timed out after 1000 ms/);
    assert.ok(later instanceof Error, 'a call after that fails too (or a new helper is started and times out)');
  });
});

describe('overlay handles pinned to the worker that holds them', () => {
  it('attaches through the worker that prepared; once it died, attach fails clearly and discard is a no-op', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'pf-handles-'));
    const hostd = new HostHelper({ workers: 2, log: createLogger('silent') });
    /** An overlay's directories; its lower holds `name.txt` saying `name`. */
    const layer = async (name: string) => {
      const [lower, upper, work] = ['lower', 'upper', 'work'].map((d) => path.join(dir, name, d));
      await Promise.all([lower, upper, work].map((d) => mkdir(d!, { recursive: true })));
      await writeFile(path.join(lower!, `${name}.txt`), name);
      return { lowers: [lower!], upper: upper!, work: work! };
    };
    const target = path.join(dir, 'target');
    try {
      await mkdir(target);
      // Several prepared at once, spread over the workers (whose own handle numbers overlap):
      // each attach finds its own mounts.
      const handles = await Promise.all(['a', 'b', 'c'].map(async (name) => hostd.prepareOverlay(await layer(name))));
      for (const [i, name] of [[1, 'b'], [0, 'a']] as const) {
        await hostd.attachOverlay(handles[i]!, process.pid, target);
        assert.deepEqual(readdirSync(target), [`${name}.txt`]);
        await hostd.unmount(target);
      }

      const workers = hostHelpers();
      assert.equal(workers.length, 2);
      for (const pid of workers) process.kill(pid, 'SIGKILL');
      await waitFor('the workers to be gone', () => workers.every((pid) => !alive(pid)));
      await assert.rejects(hostd.attachOverlay(handles[2]!, process.pid, target),
        /host helper: overlay_attach needs worker #\d, which held what it works on and has exited/);
      const orphan = await hostd.prepareOverlay(await layer('d'));
      for (const pid of hostHelpers()) process.kill(pid, 'SIGKILL');
      await hostd.discardOverlay(orphan); // its mounts died with the worker
      await assert.rejects(hostd.discardOverlay(orphan), /no prepared overlay/);
      assert.deepEqual(overlayMountsUnder(dir), []);
    } finally {
      hostd.close();
      for (const m of overlayMountsUnder(dir).reverse()) {
        try { execFileSync('umount', ['-l', m]); } catch { /* gone */ }
      }
      await rm(dir, { recursive: true, force: true });
    }
  });
});
