/**
 * Hostile code against the resource limits: each attack gets a clear result, the sandbox is
 * recoverable (or cleanly dead), the server and a neighbouring sandbox carry on, and nothing is
 * left behind (cgroups, subvolumes, mounts).
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { BadRequestError, ConflictError, InsufficientStorageError, Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

/** p50 of `n` round trips of a trivial exec. */
async function execP50(sbx: Sandbox, n = 15): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await sbx.runCode('1');
    times.push(performance.now() - t);
  }
  return times.sort((a, b) => a - b)[Math.floor(n / 2)]!;
}

/** While `attack` runs, the neighbour's exec p50 (the attack is started first and awaited after). */
async function neighbourLatencyDuring(neighbour: Sandbox, attack: Promise<unknown>): Promise<number> {
  await new Promise((r) => setTimeout(r, 300)); // let the attack get going
  const p50 = await execP50(neighbour);
  await attack;
  return p50;
}

describe('limits and hostile code', () => {
  let server: TestServer;
  let neighbour: Sandbox;
  let idleP50: number;

  before(async () => {
    server = await startTestServer();
    neighbour = await Sandbox.create({ host: server.url });
    await execP50(neighbour, 5);
    idleP50 = await execP50(neighbour);
  });
  after(async () => {
    await neighbour?.close();
    await server?.stop();
  });

  /** Allowed slack for "within 2x of idle" on a 2-core machine where ms-level noise dominates. */
  const within2x = (during: number) => assert.ok(during <= Math.max(2 * idleP50, idleP50 + 5), `neighbour exec p50 ${during.toFixed(2)} ms vs idle ${idleP50.toFixed(2)} ms`);

  it('applies the limits asked for, shows them, and refuses ones past the maximums with a 400 naming the field', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { cpus: 1, memoryMb: 256, diskMb: 200, processes: 100 } });
    try {
      assert.deepEqual((await sbx.info()).limits, { cpus: 1, memoryMb: 256, diskMb: 200, processes: 100 });
      const [child] = await sbx.fork(1);
      assert.deepEqual((await child!.info()).limits, { cpus: 1, memoryMb: 256, diskMb: 200, processes: 100 });
      await child!.close();
    } finally {
      await sbx.close();
    }
    assert.deepEqual((await neighbour.info()).limits, { cpus: 2, memoryMb: 1024, diskMb: 4096, processes: 512 });
    await assert.rejects(Sandbox.create({ host: server.url, limits: { memoryMb: 10 ** 7 } }), (e: unknown) => e instanceof BadRequestError && /limits\.memory_mb/.test(e.message));
    await assert.rejects(Sandbox.create({ host: server.url, limits: { processes: 5 } }), (e: unknown) => e instanceof BadRequestError && /processes/.test(e.message));
  });

  it('kills what exceeds the memory limit and says so (MemoryLimitExceeded); the interpreter restarts', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { memoryMb: 256 } });
    try {
      await sbx.runCode('kept = 1');
      const attack = sbx.runCode('x = bytearray(10**10)\nblocks = []\nwhile True: blocks.append(bytearray(64 * 1024 * 1024))');
      within2x(await neighbourLatencyDuring(neighbour, attack));
      const r = await attack;
      assert.equal(r.error?.name, 'MemoryLimitExceeded', JSON.stringify(r.error));
      assert.match(r.error!.value, /256 MB/);
      // A bash child killed for memory is reported too, though bash itself goes on.
      const b = await sbx.runCode('python3 -c "b = bytearray(600 * 1024 * 1024)"; echo still here', 'bash');
      assert.equal(b.error?.name, 'MemoryLimitExceeded');
      assert.match(b.stdout, /still here/);
      // The sandbox works on (the interpreter's state was lost with it).
      assert.equal((await sbx.runCode('"kept" in globals(), 6 * 7')).text, '(False, 42)');
      // A fork child is limited and accounted on its own.
      const [child] = await sbx.fork(1);
      const c = await child!.runCode('x = bytearray(600 * 1024 * 1024)');
      assert.equal(c.error?.name, 'MemoryLimitExceeded');
      assert.equal((await sbx.runCode('1 + 1')).text, '2');
      await child!.close();
    } finally {
      await sbx.close();
    }
  });

  it('contains a fork bomb (ProcessLimitExceeded); the sandbox recovers and its neighbour is not slowed', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { processes: 128, cpus: 1 } });
    try {
      const attack = sbx.runCode('bomb() { bomb | bomb & }; bomb; sleep 3; echo survived', { language: 'bash', timeoutMs: 8000 });
      within2x(await neighbourLatencyDuring(neighbour, attack));
      const r = await attack;
      assert.equal(r.error?.name, 'ProcessLimitExceeded', JSON.stringify(r.error));
      // Processes of the bomb still forking may replace killed ones: kill until none is left.
      // From the interpreter (no new process needed while the table may be full).
      await sbx.runCode([
        'import os, time',
        'def bomb_pids():',
        '    found = []',
        '    for p in filter(str.isdigit, os.listdir("/proc")):',
        '        try:',
        '            if b"bomb" in open(f"/proc/{p}/cmdline", "rb").read(): found.append(int(p))',
        '        except OSError: pass',
        '    return found',
        'for _ in range(100):',
        '    left = bomb_pids()',
        '    if not left: break',
        '    for p in left:',
        '        try: os.kill(p, 9)',
        '        except OSError: pass',
        '    time.sleep(0.05)',
      ].join('\n'));
      // A fork refused by the limit is a 409 naming it, not a 500.
      await sbx.runCode('import subprocess\nhogs = []\ntry:\n    while True: hogs.append(subprocess.Popen(["sleep", "60"]))\nexcept OSError: pass');
      await assert.rejects(sbx.fork(1), (e: unknown) => e instanceof ConflictError && /limit of 128 processes/.test(e.message));
      await sbx.runCode('for h in hogs: h.kill(); h.wait()');
      assert.equal((await sbx.runCode('echo ok', 'bash')).stdout, 'ok\n');
      const [child] = await sbx.fork(1);
      await child!.close();
    } finally {
      await sbx.close();
    }
  });

  it('stops a sandbox filling its disk at its limit (Disk quota exceeded); others and the host are untouched', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { diskMb: 100 } });
    try {
      const r = await sbx.runCode('dd if=/dev/zero of=/root/fill bs=1M count=300; sync; stat -c %s /root/fill', 'bash');
      assert.match(r.stderr, /Disk quota exceeded/);
      const written = Number(r.stdout.trim().split('\n').pop());
      assert.ok(written <= 100 * 1024 * 1024 && written > 50 * 1024 * 1024, `wrote ${written} bytes`);
      // An upload into the full sandbox: 507, its own error class.
      await assert.rejects(sbx.files.upload('/root/up.bin', Buffer.alloc(1024 * 1024)), (e: unknown) => e instanceof InsufficientStorageError && e.status === 507);
      // Free space again: the sandbox is usable.
      await sbx.runCode('rm /root/fill', 'bash');
      assert.equal((await sbx.runCode('dd if=/dev/zero of=/root/small bs=1M count=10 2>/dev/null && echo ok', 'bash')).stdout, 'ok\n');
      // The neighbour's own quota is its own.
      assert.equal((await neighbour.runCode('dd if=/dev/zero of=/root/n bs=1M count=150 2>/dev/null && echo ok; rm /root/n', 'bash')).stdout, 'ok\n');
    } finally {
      await sbx.close();
    }
  });

  it('ends an infinite loop at its timeout and keeps the sandbox usable', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { cpus: 1 } });
    try {
      const attack = sbx.runCode('while True: pass', { timeoutMs: 2000 });
      within2x(await neighbourLatencyDuring(neighbour, attack));
      const r = await attack;
      assert.equal(r.error?.name, 'TimeoutError');
      assert.equal((await sbx.runCode('6 * 7')).text, '42');
    } finally {
      await sbx.close();
    }
  });

  it('caps what one exec may print: 1 GB of stdout ends with a truncation notice, the server unhurt', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    try {
      const r = await sbx.runCode('head -c 1073741824 /dev/zero | tr "\\0" "x"; echo', { language: 'bash', timeoutMs: 120_000 });
      assert.equal(r.exitCode, 0);
      assert.ok(r.stdout.length <= 64 * 1024 * 1024 + 1, `kept ${r.stdout.length} characters`);
      assert.match(r.stderr, /output truncated/);
      assert.equal((await sbx.runCode('1 + 1')).text, '2');
    } finally {
      await sbx.close();
    }
  });

  it('survives code that kills PID 1 or closes the agent\'s channels', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    try {
      // PID 1 of a pid namespace ignores signals it has no handler for, even SIGKILL, from inside.
      const k = await sbx.runCode('kill -9 1; kill -TERM 1; echo sent', 'bash');
      assert.equal(k.stdout, 'sent\n');
      assert.equal((await sbx.runCode('6 * 7')).text, '42');
      // Closing every descriptor the interpreter holds (its pipes to the agent included).
      const r = await sbx.runCode('import os\nos.closerange(0, 4096)\nprint("unreachable")');
      // The interpreter cannot talk to the agent any more and ends: a failed exec, state lost.
      assert.notEqual(r.exitCode, 0);
      assert.equal(r.stateLost, true);
      assert.doesNotMatch(r.stdout, /unreachable/);
      assert.equal((await sbx.runCode('6 * 7')).text, '42');
    } finally {
      await sbx.close();
    }
  });

  it('leaves no cgroup, subvolume or mount behind once its sandboxes are gone', async () => {
    const sbx = await Sandbox.create({ host: server.url, limits: { memoryMb: 300 } });
    const [child] = await sbx.fork(1);
    await child!.close();
    await sbx.close();
    await new Promise((r) => setTimeout(r, 200));
    for (const controller of ['memory', 'pids']) {
      const root = path.join('/sys/fs/cgroup', controller, 'podflare');
      if (!existsSync(root)) continue;
      for (const scope of readdirSync(root, { withFileTypes: true }).filter((e) => e.isDirectory())) {
        const groups = readdirSync(path.join(root, scope.name), { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
        for (const id of [sbx.id, child!.id]) assert.ok(!groups.includes(id), `cgroup ${controller}/${id} left`);
      }
    }
    for (const id of [sbx.id, child!.id]) assert.ok(!existsSync(path.join(server.stateDir, 'sandboxes', id)), `directory of ${id} left`);
    const mounts = await readFile('/proc/self/mountinfo', 'utf8');
    assert.ok(!mounts.includes(sbx.id) && !mounts.includes(child!.id));
  });
});
