/**
 * The runtime conformance suite: what every runtime driver must do, checked through a real server
 * (the sandbox manager, the HTTP API, the SDK) whose default runtime is the driver under test.
 * Checks that need a capability run only where the runtime declares it (`RuntimeCapabilities`);
 * the others hold for every driver. One server and one long-lived sandbox per run: a VM under TCG
 * boots its template once.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { RuntimeCapabilities } from '@podflare/runtime';
import { BadRequestError, Sandbox } from 'podflare';
import { cgroupsOf } from './leaks.js';
import { startTestHost } from './netns.js';
import type { TestServer } from './server.js';

export interface ConformanceTarget {
  /** The runtime's registered name. */
  runtime: string;
  /** Starts a server whose default runtime is this one. */
  start(): Promise<TestServer>;
  /** Per-test timeout (a VM under TCG is slow). @default 120 s */
  timeoutMs?: number;
}

/** Host processes of a sandbox: its id in their command line (a QEMU's directory) or environment (an agent's). */
export function processesOfSandbox(id: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      const env = readFileSync(`/proc/${pid}/environ`, 'utf8');
      if (cmd.includes(id) || env.split('\0').includes(`PODFLARE_SANDBOX_ID=${id}`)) found.push(`${pid}: ${cmd.replace(/\0/g, ' ').slice(0, 160)}`);
    } catch { /* gone, or a kernel thread */ }
  }
  return found;
}

/** Files and directories named by the sandbox's id, a few levels below the state directory. */
export function filesOfSandbox(stateDir: string, id: string, depth = 3): string[] {
  const found: string[] = [];
  const walk = (dir: string, left: number) => {
    let names: string[];
    try { names = readdirSync(dir); } catch { return; }
    for (const name of names) {
      const p = path.join(dir, name);
      if (name.includes(id)) found.push(path.relative(stateDir, p));
      // Not into other sandboxes' roots: those are whole filesystems.
      else if (left > 1 && !/^sbx_/.test(name)) walk(p, left - 1);
    }
  };
  walk(stateDir, depth);
  return found;
}

async function until(what: string, timeoutMs: number, probe: () => string[]): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let left = probe();
  while (left.length && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    left = probe();
  }
  assert.deepEqual(left, [], `${what} still there`);
}

/** Declares the suite (a `describe` block) for one driver. */
export function runtimeConformance(target: ConformanceTarget): void {
  describe(`runtime conformance: ${target.runtime}`, { timeout: 20 * (target.timeoutMs ?? 120_000) }, () => {
    let server: TestServer;
    let sbx: Sandbox;
    let caps: RuntimeCapabilities;
    /** The sandbox's home (its agent's working directory): where the suite writes. */
    let home: string;
    const opened: Sandbox[] = [];
    const create = async (opts: Parameters<typeof Sandbox.create>[0] = {}) => {
      const s = await Sandbox.create({ host: server.url, runtime: target.runtime, ...opts });
      opened.push(s);
      return s;
    };
    const timeout = target.timeoutMs ?? 120_000;

    before(async () => {
      server = await target.start();
      assert.equal(server.runtime, target.runtime, 'the runtime under test is the default');
      caps = server.manager.defaultRuntime.capabilities;
      sbx = await create();
      home = (await sbx.runCode('import os; print(os.getcwd())')).stdout.trim();
    }, { timeout });

    after(async () => {
      for (const s of opened) await s.close().catch(() => undefined);
      await server?.stop();
    }, { timeout });

    it('creates a sandbox of this runtime, ready, whose agent answers', { timeout }, async () => {
      const info = await sbx.info();
      assert.equal(info.runtime, target.runtime);
      assert.equal(info.state, 'ready');
      assert.equal((await sbx.runCode('6 * 7')).text, '42');
      assert.ok(path.isAbsolute(home), `home ${JSON.stringify(home)}`);
    });

    it('keeps interpreter state across execs; runs bash; reports errors and exit codes', { timeout }, async () => {
      await sbx.runCode('import math\ncounter = 41');
      assert.equal((await sbx.runCode('counter += 1\ncounter')).text, '42');
      assert.equal((await sbx.runCode('math.isqrt(counter * 42)')).text, '42');
      const bash = await sbx.runCode('echo "$((6 * 7))"; exit 3', 'bash');
      assert.equal(bash.stdout, '42\n');
      assert.equal(bash.exitCode, 3);
      const err = await sbx.runCode('1 / 0');
      assert.equal(err.error?.name, 'ZeroDivisionError');
      assert.equal((await sbx.runCode('counter')).text, '42', 'an error keeps the state');
    });

    it('moves files both ways, and the code sees them', { timeout }, async () => {
      const file = `${home}/conformance/data.bin`;
      const data = Buffer.from(Array.from({ length: 70_000 }, (_, i) => i % 251));
      await sbx.files.mkdir(`${home}/conformance`);
      await sbx.files.upload(file, data);
      assert.ok((await sbx.download(file)).equals(data));
      assert.equal((await sbx.runCode(`len(open(${JSON.stringify(file)}, "rb").read())`)).text, String(data.length));
      await sbx.runCode(`open(${JSON.stringify(`${home}/conformance/made.txt`)}, "w").write("by the code\\n")`);
      assert.equal((await sbx.download(`${home}/conformance/made.txt`)).toString(), 'by the code\n');
      assert.deepEqual((await sbx.files.list(`${home}/conformance`)).map((e) => e.name).sort(), ['data.bin', 'made.txt']);
      await sbx.files.remove(`${home}/conformance`, { recursive: true });
      assert.equal(await sbx.files.exists(file), false);
    });

    it('forks where it declares the capability (children inherit memory and files, then diverge), else refuses with 400', { timeout }, async () => {
      if (!caps.fork) {
        await assert.rejects(sbx.fork(1), (e: unknown) => e instanceof BadRequestError && /cannot fork/.test(e.message));
        return;
      }
      const parent = await create();
      await parent.runCode(`shared = ["parent"]\nopen(${JSON.stringify(`${home}/forked.txt`)}, "w").write("parent")`);
      const children = await parent.fork(2);
      opened.push(...children);
      const [a, b] = children as [Sandbox, Sandbox];
      await a.runCode(`shared.append("a")\nopen(${JSON.stringify(`${home}/forked.txt`)}, "w").write("a")`);
      assert.equal((await a.runCode('shared')).text, "['parent', 'a']");
      assert.equal((await b.runCode('shared')).text, "['parent']");
      assert.equal((await parent.runCode('shared')).text, "['parent']");
      assert.equal((await b.download(`${home}/forked.txt`)).toString(), 'parent');
      assert.equal((await parent.download(`${home}/forked.txt`)).toString(), 'parent');
      assert.equal((await a.info()).parent, parent.id);
    });

    it('diffs two sandboxes: what one wrote shows as added, changed or removed relative to the other', { timeout }, async () => {
      const a = await create();
      const b = await create();
      // Relative paths: each sandbox writes in its own home (a driver may give each its own).
      await a.runCode('open("same.txt", "w").write("same")\nopen("both.txt", "w").write("a")\nopen("only-a.txt", "w").write("a")');
      await b.runCode('open("same.txt", "w").write("same")\nopen("both.txt", "w").write("b")\nopen("only-b.txt", "w").write("b")');
      // Paths are shown as the first sandbox sees them (the toy driver: under its own directory).
      const aHome = (await a.runCode('import os; print(os.getcwd())')).stdout.trim();
      const d = await a.diff(b, [aHome]);
      assert.ok(d.added.includes(`${aHome}/only-b.txt`), JSON.stringify(d));
      assert.ok(d.removed.includes(`${aHome}/only-a.txt`), JSON.stringify(d));
      assert.ok(d.modified.includes(`${aHome}/both.txt`), JSON.stringify(d));
      for (const list of [d.added, d.removed, d.modified]) assert.ok(!list.includes(`${aHome}/same.txt`), JSON.stringify(d));
    });

    it('leaves nothing once destroyed: no process (one that left its session included), no file, no cgroup', { timeout }, async () => {
      const s = await Sandbox.create({ host: server.url, runtime: target.runtime });
      const escaped = await s.runCode('import subprocess\nsubprocess.Popen(["sleep", "600"], start_new_session=True).pid > 0');
      assert.equal(escaped.text, 'True');
      assert.ok(processesOfSandbox(s.id).length > 0 || filesOfSandbox(server.stateDir, s.id).length > 0, 'the check sees the live sandbox');
      await s.close();
      await until('its processes', timeout / 2, () => processesOfSandbox(s.id));
      await until('its files', timeout / 2, () => filesOfSandbox(server.stateDir, s.id));
      await until('its cgroups', timeout / 2, () => cgroupsOf(s.id));
    });

    it('enforces memory limits where it declares the capability (the exec says MemoryLimitExceeded, the sandbox works on)', { timeout }, async () => {
      const limited = await create({ limits: { memoryMb: 256 } });
      assert.equal((await limited.info()).limits.memoryMb, 256, 'the limits asked for are recorded whatever the runtime');
      if (!caps.limits) return;
      const r = await limited.runCode('x = bytearray(600 * 1024 * 1024)');
      assert.equal(r.error?.name, 'MemoryLimitExceeded', JSON.stringify(r.error));
      assert.equal((await limited.runCode('6 * 7')).text, '42');
    });

    it('has no network without egress, where it declares the capability: only a loopback device, a test host unreachable', { timeout }, async (t) => {
      if (!caps.egress) return t.skip('the runtime declares no egress capability');
      const testHost = await startTestHost();
      try {
        const offline = await create({ egress: false });
        assert.equal((await offline.info()).egress, false);
        const nics = await offline.runCode('import socket\nsorted(name for _, name in socket.if_nameindex())');
        assert.equal(nics.text, "['lo']");
        const reach = await offline.runCode(`import socket\ntry:\n    socket.create_connection((${JSON.stringify(testHost.ip)}, ${testHost.port}), timeout=5).close()\n    r = "reached"\nexcept OSError as e:\n    r = type(e).__name__\nr`);
        assert.notEqual(reach.text, "'reached'");
      } finally {
        testHost.close();
      }
    });
  });
}
