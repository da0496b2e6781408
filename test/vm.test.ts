/**
 * The microVM runtime through the real server: QEMU microvm guests (TCG here, so a template boot
 * takes seconds) cloned from one frozen template that every test shares. Few tests, on purpose.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { readFileSync, readdirSync, readlinkSync, existsSync } from 'node:fs';
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { processesMentioning } from './helpers/leaks.js';
import { startTestHost } from './helpers/netns.js';
import { IMAGES_DIR, startTestServer, type TestServer } from './helpers/server.js';

/** A QEMU's command line: QEMU by name from PATH, or at a path of its own (a newer one installed aside). */
const isQemu = (cmd: string) => path.basename(cmd.slice(0, cmd.indexOf('\0'))) === 'qemu-system-x86_64';

/** Host pid of the QEMU running a sandbox (its directory, named by the id, is on its command line). */
function qemuPidOf(id: string): number | undefined {
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (isQemu(cmd) && cmd.includes(`/vm/${id}/`)) return Number(pid);
    } catch { /* gone */ }
  }
  return undefined;
}

/** Every sandbox QEMU of this server: its sandbox id and pid. */
function qemuPids(stateDir: string): Array<{ id: string; pid: number }> {
  const out: Array<{ id: string; pid: number }> = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      const m = new RegExp(`${stateDir}/vm/(sbx_[0-9a-f]+)/`).exec(cmd);
      if (isQemu(cmd) && m) out.push({ id: m[1]!, pid: Number(pid) });
    } catch { /* gone */ }
  }
  return out;
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined> | T | undefined): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Processes holding a memfd whose name starts with `prefix`, as "pid: name". */
function memfdHolders(prefix: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    let fds: string[] = [];
    try { fds = readdirSync(`/proc/${pid}/fd`); } catch { continue; }
    for (const fd of fds) {
      try {
        const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
        if (target.startsWith(`/memfd:${prefix}`)) found.push(`${pid}: ${target}`);
      } catch { /* closed meanwhile */ }
    }
  }
  return found;
}

/** The guest's clock minus the host's, at the middle of the call that read it. */
async function clockSkewMs(sbx: Sandbox): Promise<number> {
  const before = Date.now();
  const r = await sbx.runCode('import time\nprint(time.time_ns())');
  return Number(BigInt(r.stdout.trim()) / 1_000_000n) - (before + Date.now()) / 2;
}

/**
 * A VM's mapping of its shared RAM (a sealed memfd: its template's, or a fork point's): how much
 * of it is shared with other processes, how much its own.
 */
function ramMapping(sandboxId: string, of: 'template' | 'fork point'): { sharedKb: number; privateKb: number } {
  const smaps = readFileSync(`/proc/${qemuPidOf(sandboxId)}/smaps`, 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/);
  const name = of === 'template' ? /^[0-9a-f]+-[0-9a-f]+ rw-p .*\/memfd:podflare-[0-9a-f]{10}-\d+-t[0-9a-f]+\.ram \(deleted\)\n/
    : /^[0-9a-f]+-[0-9a-f]+ rw-p .*\/memfd:podflare-[0-9a-f]{10}-\d+-p[0-9a-f]+\.ram \(deleted\)\n/;
  const ram = smaps.find((m) => name.test(m));
  assert.ok(ram, `the VM does not map its ${of}'s RAM copy-on-write`);
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(ram)?.[1]);
  // (tmpfs pages count as dirty: Shared_Dirty, not Shared_Clean)
  return { sharedKb: kb('Shared_Clean') + kb('Shared_Dirty'), privateKb: kb('Private_Clean') + kb('Private_Dirty') };
}

describe('vm runtime', { timeout: 600_000 }, () => {
  let server!: TestServer;
  let sbx!: Sandbox;

  before(async () => {
    // The default runtime stays ns: `runtime: "vm"` per request is what is tested.
    server = await startTestServer({ poolSize: 4 });
    sbx = await Sandbox.create({ host: server.url, runtime: 'vm' }); // boots and freezes the template
  });

  after(async () => {
    await sbx?.close().catch(() => undefined);
    await server?.stop();
  });

  it('creates a vm sandbox from the warm pool of template clones in milliseconds', async () => {
    const info = await sbx.info();
    assert.equal(info.runtime, 'vm');
    await until('a warm vm clone', 120_000, () => server.manager.poolStats.find((p) => p.runtime === 'vm' && p.ready > 0));
    const t = performance.now();
    const pooled = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const ms = performance.now() - t;
    try {
      assert.ok(ms < 500, `create from the vm pool took ${ms.toFixed(0)} ms`);
      assert.equal((await pooled.info()).runtime, 'vm');
      // Its QEMU is a batch task (SCHED_BATCH = 3): its wake-ups do not preempt the server.
      assert.match(readFileSync(`/proc/${qemuPidOf(pooled.id)}/sched`, 'utf8'), /^policy\s+:\s+3$/m);
      const r = await pooled.runCode('import os; os.environ["PODFLARE_SANDBOX_ID"]');
      assert.equal(r.results[0]?.text, `'${pooled.id}'`);
      // Clones of one snapshot must not share their randomness or the snapshot's clock.
      const a = await sbx.runCode('open("/dev/urandom","rb").read(16).hex() + " " + str(__import__("random").random())');
      const b = await pooled.runCode('open("/dev/urandom","rb").read(16).hex() + " " + str(__import__("random").random())');
      assert.notEqual(a.results[0]?.text, b.results[0]?.text);
      const clock = await pooled.runCode('import time; time.time()');
      assert.ok(Math.abs(Number(clock.results[0]?.text) - Date.now() / 1000) < 30, `guest clock ${clock.results[0]?.text}`);
    } finally {
      await pooled.close();
    }
  });

  it("leaves a fresh clone's disk alone while it idles", async () => {
    // An ext4 root whose inode tables were not zeroed at build has every VM zero them (ext4lazyinit),
    // ~50 MB of writes into each VM's overlay in its first seconds.
    const clone = await Sandbox.create({ host: server.url, runtime: 'vm' });
    try {
      const r = await clone.runCode([
        'import time',
        'written = lambda: next(int(l.split()[9]) for l in open("/proc/diskstats") if l.split()[2] == "vda")',
        'before = written(); time.sleep(2); print(written() - before)',
      ].join('\n'));
      assert.equal(r.exitCode, 0, r.stderr);
      // Lazy init wrote ~100,000 sectors in those 2 s. An idle guest may still flush one journal
      // commit now and then (8 sectors, seen on f3ed23c too); anything near lazy init fails.
      const sectors = Number(r.stdout.trim());
      assert.ok(Number.isInteger(sectors) && sectors <= 64, `${r.stdout.trim()} sectors written to the root by an idle VM`);
    } finally {
      await clone.close();
    }
  });

  it('keeps python state across calls, runs bash, moves files both ways', async () => {
    await sbx.runCode('x = 41\nimport json');
    const r = await sbx.runCode('x += 1\nprint(json.dumps({"x": x}))');
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stdout, '{"x": 42}\n');
    const sh = await sbx.runCode('echo hi from $(hostname) && pwd', { language: 'bash' });
    assert.equal(sh.exitCode, 0, sh.stderr);
    assert.match(sh.stdout, /^hi from sbx-[0-9a-f]{12}\n\/root\n$/);
    const data = Buffer.from(Array.from({ length: 300_000 }, (_, i) => i % 251));
    await sbx.upload('/tmp/in.bin', data);
    const sum = await sbx.runCode('import hashlib; hashlib.sha256(open("/tmp/in.bin","rb").read()).hexdigest()');
    assert.equal(sum.results[0]?.text, `'${createHash('sha256').update(data).digest('hex')}'`);
    await sbx.runCode('open("/root/out.txt","w").write("made in the guest\\n")');
    assert.equal((await sbx.download('/root/out.txt')).toString(), 'made in the guest\n');
  });

  it("runs the guest's own kernel and init, and sees none of the host's files", async () => {
    const r = await sbx.runCode('uname -r; tr "\\0" " " < /proc/1/cmdline; echo; cat /proc/cmdline', { language: 'bash' });
    assert.equal(r.exitCode, 0, r.stderr);
    const [release, init, cmdline] = r.stdout.split('\n');
    assert.notEqual(release, os.release());
    assert.match(release!, /-cloud-amd64$/);
    assert.equal(init!.trim(), '/usr/bin/python3 /opt/podflare/podflare_agent.py');
    assert.match(cmdline!, /tsc=reliable/); // the kernel command line QEMU gave the guest
    // Host-only paths: this checkout, the server's state directory, the host's machine id.
    const probe = await sbx.runCode(`import os; [os.path.exists(p) for p in (${JSON.stringify(process.cwd())}, ${JSON.stringify(server.stateDir)}, "/var/lib/podflare")]`);
    assert.equal(probe.results[0]?.text, '[False, False, False]');
    const hostMachineId = existsSync('/etc/machine-id') ? readFileSync('/etc/machine-id', 'utf8').trim() : '';
    const mounts = await sbx.runCode('cat /proc/mounts; cat /etc/machine-id 2>/dev/null', { language: 'bash' });
    assert.doesNotMatch(mounts.stdout, /overlay|\/work|podflare\/images/);
    if (hostMachineId) assert.ok(!mounts.stdout.includes(hostMachineId));
    // The emulator itself runs as an unprivileged host user of its own (never root: an id of the
    // VM range, past the VMs' group), holds no capabilities (and can gain none), under a seccomp filter.
    const status = readFileSync(`/proc/${qemuPidOf(sbx.id)}/status`, 'utf8');
    const { vmUidBase, vmUidCount } = server.config;
    const uid = Number(/^Uid:\s+(\d+)\s+\1\s+\1\s+\1$/m.exec(status)?.[1]);
    assert.ok(uid > vmUidBase && uid < vmUidBase + vmUidCount, `QEMU runs as uid ${uid}`);
    assert.match(status, new RegExp(`^Gid:\\s+${uid}\\s+${uid}\\s+${uid}\\s+${uid}$`, 'm'));
    assert.match(status, new RegExp(`^Groups:\\s+${vmUidBase}\\s*$`, 'm'));
    for (const cap of ['CapEff', 'CapPrm', 'CapBnd']) assert.match(status, new RegExp(`^${cap}:\\s+0+$`, 'm'), cap);
    assert.match(status, /^NoNewPrivs:\s+1$/m);
    assert.match(status, /^Seccomp:\s+2$/m);
  });

  it('forks a live VM three ways: children inherit memory, files and processes, then diverge', async () => {
    const parent = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const kids: Sandbox[] = [];
    try {
      await parent.runCode('import random\nimport numpy as np\ncounter = 10\nopen("/root/shared.txt", "w").write("from the parent")');
      // A few MB of random bytes in the parent's memory: every child must read them back intact
      // (a parent this small forks by copy: its own pages go to each child in its state, the rest
      // of its RAM is the template's RAM file).
      const blobHash = (await parent.runCode('import hashlib, os\nblob = os.urandom(6 * 1024 * 1024)\nhashlib.sha256(blob).hexdigest()')).results[0]?.text;
      assert.match(blobHash ?? '', /^'[0-9a-f]{64}'$/);
      // A process started before the fork, outside the interpreter.
      await parent.runCode('nohup sleep 1000 > /dev/null 2>&1 &\necho started', { language: 'bash' });
      kids.push(...(await parent.fork(3)));
      assert.equal(kids.length, 3);
      for (const [i, kid] of kids.entries()) {
        assert.equal((await kid.info()).runtime, 'vm');
        const r = await kid.runCode(`counter += ${i + 1}\n(counter, open("/root/shared.txt").read())`);
        assert.equal(r.results[0]?.text, `(${11 + i}, 'from the parent')`, r.stderr);
        assert.equal((await kid.runCode('hashlib.sha256(blob).hexdigest()')).results[0]?.text, blobHash, `child ${i} read the parent's memory wrong`);
        const sleeping = await kid.runCode('pgrep -x sleep', { language: 'bash' });
        assert.equal(sleeping.exitCode, 0, 'the background process is not running in the child');
        await kid.runCode(`open("/root/shared.txt", "w").write("child ${i}")`);
      }
      // The children map the template's RAM (copy-on-write) and share its pages
      // with the pool's clones; what is theirs alone is about what the parent had written.
      const ram = ramMapping(kids[0]!.id, 'template');
      assert.ok(ram.sharedKb >= 16_384, `only ${ram.sharedKb} kB of the template's RAM shared with other VMs`);
      assert.ok(ram.privateKb < 100 * 1024, `${ram.privateKb} kB of the child's RAM is its own`);
      // A grandchild: a fork of a fork child.
      const [grandchild] = await kids[0]!.fork(1);
      kids.push(grandchild!);
      const g = await grandchild!.runCode('(counter, open("/root/shared.txt").read(), hashlib.sha256(blob).hexdigest())');
      assert.equal(g.results[0]?.text, `(11, 'child 0', ${blobHash})`, g.stderr);
      await grandchild!.close();
      kids.pop();
      // Each diverged on its own: memory and files; the parent is untouched and still running.
      for (const [i, kid] of kids.entries()) {
        const r = await kid.runCode('(counter, open("/root/shared.txt").read())');
        assert.equal(r.results[0]?.text, `(${11 + i}, 'child ${i}')`);
      }
      const p = await parent.runCode('(counter, open("/root/shared.txt").read())');
      assert.equal(p.results[0]?.text, "(10, 'from the parent')");
      // Clocks: a child takes the host's time when it is restored; the parent's stood still while
      // it was paused for each fork and is set again once it continues (two more forks here, so a
      // parent left behind would be off by several hundred ms).
      for (let i = 0; i < 2; i++) await Promise.all((await parent.fork(1)).map((k) => k.close()));
      for (const x of [parent, ...kids]) {
        const skew = await clockSkewMs(x);
        assert.ok(Math.abs(skew) < 150, `${x.id === parent.id ? 'the parent' : 'a child'}'s clock is ${Math.round(skew)} ms off the host's`);
      }
      // diff at the filesystem level, through the agents.
      await kids[0]!.runCode('open("/root/new.txt", "w").write("new\\n")');
      const d = await parent.diff(kids[0]!, { paths: ['/root'], content: true });
      assert.deepEqual(d.added, ['/root/new.txt']);
      assert.deepEqual(d.modified, ['/root/shared.txt']);
      assert.match(d.content?.['/root/shared.txt'] ?? '', /^--- a\/root\/shared.txt\n\+\+\+ b\/root\/shared.txt\n[\s\S]*-from the parent[\s\S]*\+child 0/);
      const whole = await parent.diff(kids[1]!);
      assert.ok(whole.modified.includes('/root/shared.txt'), JSON.stringify(whole));
      assert.ok(whole.added.length + whole.removed.length + whole.modified.length < 20, `noise in a whole-filesystem diff: ${JSON.stringify(whole)}`);
      // Fresh randomness per child: the interpreter's and numpy's RNGs, and the kernel's.
      const draws = await Promise.all([parent, ...kids].map(async (x) => (await x.runCode('(random.random(), float(np.random.rand()), open("/dev/urandom","rb").read(8).hex())')).results[0]?.text));
      assert.equal(new Set(draws).size, 4, draws.join('\n'));
      const hosts = await Promise.all(kids.map(async (k) => (await k.runCode('hostname', { language: 'bash' })).stdout.trim()));
      assert.equal(new Set(hosts).size, 3);
    } finally {
      await Promise.all(kids.map((k) => k.close()));
      await parent.close();
    }
    await until('fork layers to go', 10_000, () => {
      const dir = `${server.stateDir}/vm/layers`;
      return !existsSync(dir) || readdirSync(dir).length === 0;
    });
  });

  it('checkpoints a VM and restores it under the same id; an atomic exec that fails is undone', async () => {
    const vm = await Sandbox.create({ host: server.url, runtime: 'vm' });
    try {
      await vm.runCode('x = 1\nopen("/root/f.txt", "w").write("one")');
      const cp = await vm.checkpoint('one');
      await vm.runCode('x = 2\nimport os\nos.remove("/root/f.txt")');
      await vm.restore(cp);
      assert.equal((await vm.runCode('print(x, open("/root/f.txt").read())')).stdout, '1 one\n');
      const failed = await vm.runCode('x = 3\n1/0', { atomic: true });
      assert.equal(failed.rolledBack, true);
      assert.equal((await vm.runCode('print(x)')).stdout, '1\n');
      assert.equal((await vm.info()).runtime, 'vm');
    } finally {
      await vm.close();
    }
  });

  it('forks a VM holding more than a fork copies through a fork point RAM file its children share', async () => {
    const parent = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const kids: Sandbox[] = [];
    // 96 MB, every page different (its number): more than the 64 MB a fork copies into each child.
    const sample = 'hashlib.sha256(big[::512]).hexdigest()';
    try {
      const made = await parent.runCode(`import hashlib\nbig = b"".join(n.to_bytes(4, "little") * 1024 for n in range(96 * 256))\n(len(big), ${sample})`);
      const expected = made.results[0]?.text;
      assert.match(expected ?? '', /^\(100663296, '[0-9a-f]{64}'\)$/, made.stderr);
      kids.push(...(await parent.fork(2)));
      for (const kid of kids) assert.equal((await kid.runCode(`(len(big), ${sample})`)).results[0]?.text, expected);
      // Its pages are in the fork point's RAM (a memfd the server let go of once the children mapped it), shared
      // by the children, not copied into each.
      const ram = ramMapping(kids[0]!.id, 'fork point');
      assert.ok(ram.sharedKb >= 96 * 1024, `only ${ram.sharedKb} kB of the fork point's RAM shared between the children`);
      // A fork of such a child (its RAM is not the template's) goes the same way.
      const [grandchild] = await kids[0]!.fork(1);
      kids.push(grandchild!);
      assert.equal((await grandchild!.runCode(`(len(big), ${sample})`)).results[0]?.text, expected);
      assert.equal((await parent.runCode(`(len(big), ${sample})`)).results[0]?.text, expected, 'the parent goes on with its memory');
    } finally {
      await Promise.all(kids.map((k) => k.close()));
      await parent.close();
    }
  });

  it('reaches out only with egress, never to the host loopback; without egress it has no network device', async () => {
    const testHost = await startTestHost();
    const web = http.createServer((_req, res) => res.end('host loopback'));
    await new Promise<void>((resolve) => web.listen(0, '127.0.0.1', resolve));
    const port = (web.address() as AddressInfo).port;
    const fetch = (url: string) => `import urllib.request\ntry:\n    r = urllib.request.urlopen("${url}", timeout=5).read().decode()\nexcept Exception as e:\n    r = type(e).__name__\nr`;
    const offline = await Sandbox.create({ host: server.url, runtime: 'vm', egress: false });
    try {
      const out = await sbx.runCode(fetch(`http://${testHost.ip}:${testHost.port}/`));
      assert.equal(out.results[0]?.text, "'hello from the test host'", out.stderr);
      // QEMU maps 10.0.2.2 to "the host"; here that is the QEMU's own network namespace.
      const loop = await sbx.runCode(fetch(`http://10.0.2.2:${port}/`));
      assert.notEqual(loop.results[0]?.text, "'host loopback'");
      const api = await sbx.runCode(fetch(`http://10.0.2.2:${new URL(server.url).port}/v1/sandboxes`));
      assert.match(api.results[0]?.text ?? '', /Error|Refused|timeout/i);
      const nics = await offline.runCode('ls /sys/class/net', { language: 'bash' });
      assert.equal(nics.stdout.trim(), 'lo');
      const off = await offline.runCode(fetch(`http://${testHost.ip}:${testHost.port}/`));
      assert.match(off.results[0]?.text ?? '', /Error/);
      assert.equal((await offline.info()).egress, false);
    } finally {
      await offline.close();
      web.close();
      testHost.close();
    }
  });

  it('notices a VM killed from outside: error state, resources released, pool refilled', async () => {
    const victim = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const pid = qemuPidOf(victim.id);
    assert.ok(pid, 'the QEMU of the sandbox was not found');
    process.kill(pid, 'SIGKILL');
    const info = await until('the error state', 20_000, async () => {
      const i = await victim.info();
      return i.state === 'error' ? i : undefined;
    });
    assert.equal(info.state, 'error');
    await until('its files to go', 10_000, () => !existsSync(`${server.stateDir}/vm/${victim.id}`));
    assert.equal(processesMentioning(`/vm/${victim.id}/`).length, 0);
    // A warm clone dying in the pool is replaced by a new one.
    const vmPool = () => server.manager.poolStats.find((p) => p.runtime === 'vm')!;
    await until('a full vm pool', 120_000, () => vmPool().ready >= vmPool().target);
    const pooled = qemuPids(server.stateDir).filter((p) => p.id !== sbx.id);
    assert.ok(pooled.length >= 1, 'no pooled clone found');
    process.kill(pooled[0]!.pid, 'SIGKILL');
    const fresh = await until('a replacement clone', 120_000, () => {
      const now = qemuPids(server.stateDir).filter((p) => p.id !== sbx.id && !pooled.some((o) => o.id === p.id));
      return now.length >= 1 && vmPool().ready >= vmPool().target ? now : undefined;
    });
    assert.ok(fresh.length >= 1);
    assert.ok(!existsSync(`${server.stateDir}/vm/${pooled[0]!.id}`), "the dead clone's files are gone");
  });

  it('freezes a persistent sandbox to disk and resumes it with its state, also across a server restart', async () => {
    const first = await startTestServer({ poolSize: 0 });
    let second: TestServer | undefined;
    try {
      const keep = await Sandbox.create({ host: first.url, runtime: 'vm', persistent: true });
      await keep.runCode('import random\nkept = "still here"');
      await keep.upload('/root/kept.txt', Buffer.from('file kept'));
      await keep.freeze();
      assert.equal((await keep.info()).state, 'frozen');
      assert.equal(qemuPidOf(keep.id), undefined, 'a frozen sandbox has no VM running');
      // The next call resumes it transparently.
      assert.equal((await keep.runCode('kept')).results[0]?.text, "'still here'");
      assert.equal((await keep.info()).state, 'ready');
      // A server shutting down freezes its live persistent sandboxes; the next server resumes them.
      await first.close();
      second = await startTestServer({ poolSize: 0, stateDir: first.stateDir });
      const again = await Sandbox.connect(keep.id, { host: second.url });
      assert.equal((await again.info()).state, 'frozen');
      const r = await again.runCode('kept + " after a restart"');
      assert.equal(r.results[0]?.text, "'still here after a restart'", r.stderr);
      assert.equal((await again.download('/root/kept.txt')).toString(), 'file kept');
      const clock = await again.runCode('import time; time.time()');
      assert.ok(Math.abs(Number(clock.results[0]?.text) - Date.now() / 1000) < 30, 'the resumed guest took the host clock');
      await again.close();
      assert.ok(!existsSync(`${first.stateDir}/frozen/${keep.id}`), 'nothing frozen left after delete');
    } finally {
      await second?.stop();
      await first.stop();
    }
  });

  it('freezes an idle persistent sandbox instead of destroying it', async () => {
    const idle = await Sandbox.create({ host: server.url, runtime: 'vm', persistent: true, idleTimeoutSeconds: 1 });
    try {
      await idle.runCode('answer = 42');
      await until('the idle freeze', 30_000, async () => ((await idle.info()).state === 'frozen' ? true : undefined));
      assert.equal(qemuPidOf(idle.id), undefined);
      assert.equal((await idle.runCode('answer')).results[0]?.text, '42');
    } finally {
      await idle.close();
    }
  });

  it('podflare image build --runtime vm names the guest image it built or found', async () => {
    const cli = path.resolve(import.meta.dirname, '../packages/cli/dist/main.js');
    const { stdout } = await promisify(execFile)(process.execPath, [cli, 'image', 'build', '--runtime', 'vm', '--images-dir', IMAGES_DIR]);
    assert.match(stdout, /^vm image [0-9a-f]{12}-[0-9a-f]{12} \(kernel [\w.-]+-cloud-amd64\)$/m);
    assert.match(stdout, /kernel: .*\/vmkernel-[0-9a-f]{12}\/vmlinux\n/);
    assert.match(stdout, /root: +.*\/vmroot-[0-9a-f]{12}\/rootfs\.ext4\n/);
  });

  it('refuses to freeze a namespace sandbox, saying why', async () => {
    const ns = await Sandbox.create({ host: server.url });
    try {
      await assert.rejects(ns.freeze(), (err: Error & { status?: number }) => {
        assert.equal(err.status, 400);
        assert.match(err.message, /ns runtime cannot freeze/);
        return true;
      });
      assert.equal((await ns.runCode('1 + 1')).results[0]?.text, '2');
    } finally {
      await ns.close();
    }
  });

  it('leaves no QEMU process, overlay, socket or RAM file once the server stops', async () => {
    const stateDir = server.stateDir;
    await sbx.close();
    await server.stop();
    assert.deepEqual(processesMentioning(`${stateDir}/`), []);
    assert.equal(existsSync(`${stateDir}/vm`), false);
    // Template RAM files are named after the state directory (other servers may have their own).
    const prefix = `podflare-${createHash('sha256').update(path.resolve(stateDir)).digest('hex').slice(0, 10)}-`;
    assert.deepEqual(readdirSync('/dev/shm').filter((n) => n.startsWith(prefix)), []);
    // Nor is any shared RAM (a memfd the spawner held) still held by a process.
    assert.deepEqual(memfdHolders(prefix), []);
  });
});
