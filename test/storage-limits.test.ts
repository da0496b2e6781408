/**
 * Hostile tenants against the sandboxes' storage and process lifetime (issue 18, "Storage"):
 * - a failed fork leaves no fork layer behind, and fork layers count against the forking
 *   sandbox's disk limit: forking again and again cannot take more than that limit;
 * - the disk volume is reserved on the host at its configured size, and a host without that
 *   room refuses to start (and `podflare doctor` says so);
 * - a full quota or a full volume answers 507 to the writer (OSError inside an exec), and the
 *   other tenants go on writing and forking;
 * - a process in a pid namespace nested in a sandbox dies with the sandbox's DELETE, while its
 *   fork child lives on;
 * - nothing inside a sandbox shows host paths of the state directory.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, statfsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { loadConfig, runDoctor, startServer } from '@podflare/server';
import { InsufficientStorageError, PodflareError, Sandbox } from 'podflare';
import { forkLayersIn, sandboxDirsIn } from './helpers/leaks.js';
import { IMAGES_DIR, startTestServer, TEST_DISK_VOLUME_BYTES, type TestServer } from './helpers/server.js';

const MB = 1024 * 1024;
const KEYS = ['tenant-a-key', 'tenant-b-key'];

/** Bytes in use on the disk volume (after a sync: btrfs accounts delayed writes late). */
function volumeUsed(stateDir: string): number {
  execFileSync('sync', ['-f', path.join(stateDir, 'sandboxes')]);
  const s = statfsSync(path.join(stateDir, 'sandboxes'));
  return (s.blocks - s.bfree) * s.bsize;
}

/** Waits until `check` holds (the runtime removes what sandboxes leave in the background). */
async function eventually(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) assert.fail(what);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Host processes whose command line is exactly `cmd`. */
function hostProcesses(cmd: string): number[] {
  const found: number[] = [];
  for (const name of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').replace(/\0/g, ' ').trim() === cmd) found.push(Number(name));
    } catch { /* gone */ }
  }
  return found;
}

describe('storage limits and process lifetime', () => {
  let server: TestServer;
  const tenant = (i: number, more: Parameters<typeof Sandbox.create>[0] = {}) => Sandbox.create({ host: server.url, apiKey: KEYS[i], ...more });

  before(async () => {
    // A small volume, so filling it is quick: every sandbox shares these 512 MB.
    server = await startTestServer({ apiKeys: KEYS, diskVolumeBytes: 512 * MB, poolSize: 1 });
  });
  after(async () => {
    await server?.stop();
  });

  it('reserves the disk volume on the host at its configured size (no sparse image)', () => {
    const image = statSync(path.join(server.stateDir, 'disk.img'));
    assert.equal(image.size, 512 * MB);
    assert.ok(image.blocks * 512 >= 512 * MB, `only ${Math.round((image.blocks * 512) / MB)} MB of the image are allocated on the host`);
  });

  it('repeated forks stay within the parent\'s disk limit, and forks refused for it leave no fork layer', async () => {
    const parent = await tenant(0, { limits: { diskMb: 100 } });
    const children: Sandbox[] = [];
    const before = volumeUsed(server.stateDir);
    try {
      // Write 60 MB, fork (the child keeps the frozen layer), rewrite, fork again...: without
      // accounting, every round would pin 60 MB more of the volume.
      const refused: string[] = [];
      for (let round = 0; round < 4; round++) {
        await parent.runCode('rm -f /root/blob; head -c 62914560 /dev/urandom > /root/blob 2>/dev/null; sync; true', 'bash');
        try {
          children.push(...(await parent.fork(1)));
        } catch (err) {
          assert.ok(err instanceof PodflareError, String(err));
          refused.push(`${err.status} ${err.code}: ${err.message}`);
        }
      }
      const grown = volumeUsed(server.stateDir) - before;
      assert.ok(grown <= 100 * MB * 1.25, `the parent (disk limit 100 MB) and its forks took ${Math.round(grown / MB)} MB of the volume`);
      for (const r of refused) assert.match(r, /^507 insufficient_storage: .*disk/);
      // Refused forks left nothing: the only layers are those the live children use.
      assert.ok(forkLayersIn(server.stateDir).length <= children.length, forkLayersIn(server.stateDir).join(', '));
      // The parent is still usable once it frees space, and forks again.
      await parent.runCode('rm -f /root/blob', 'bash');
      for (const c of children.splice(0)) await c.close();
      await eventually(() => forkLayersIn(server.stateDir).length === 0, `fork layers left: ${forkLayersIn(server.stateDir).join(', ')}`);
      const [child] = await parent.fork(1);
      children.push(child!);
    } finally {
      for (const c of children) await c.close();
      await parent.close();
    }
    await eventually(() => forkLayersIn(server.stateDir).length === 0, `fork layers left: ${forkLayersIn(server.stateDir).join(', ')}`);
  });

  it('a full quota answers 507 to uploads and OSError to execs; another tenant still writes and forks', async () => {
    const a = await tenant(0, { limits: { diskMb: 64 } });
    const b = await tenant(1);
    try {
      const dd = await a.runCode('dd if=/dev/zero of=/root/fill bs=1M count=100 2>&1; true', 'bash');
      assert.match(dd.stdout, /Disk quota exceeded/);
      const py = await a.runCode('open("/root/more", "wb").write(b"x" * (8 << 20))');
      assert.equal(py.error?.name, 'OSError', JSON.stringify(py.error));
      assert.match(py.error!.value, /Disk quota exceeded/);
      await assert.rejects(a.files.upload('/root/upload.bin', Buffer.alloc(4 * MB, 1)), (e: unknown) => {
        assert.ok(e instanceof InsufficientStorageError, `${(e as Error).name}: ${(e as Error).message}`);
        assert.equal(e.status, 507);
        assert.equal(e.code, 'insufficient_storage');
        return true;
      });
      // The other tenant is untouched: it writes, reads back and forks.
      await b.files.upload('/root/b.bin', Buffer.alloc(4 * MB, 2));
      assert.equal((await b.runCode('stat -c %s /root/b.bin', 'bash')).stdout.trim(), String(4 * MB));
      const [bc] = await b.fork(1);
      assert.equal((await bc!.runCode('stat -c %s /root/b.bin', 'bash')).stdout.trim(), String(4 * MB));
      await bc!.close();
      // Freed, the first tenant writes again.
      await a.runCode('rm -f /root/fill /root/more', 'bash');
      await a.files.upload('/root/upload.bin', Buffer.alloc(4 * MB, 1));
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('a full volume answers 507 to the writer and stays writable: once freed, every tenant writes', async () => {
    const a = await tenant(0, { limits: { diskMb: 2048 } }); // more than the whole volume
    const b = await tenant(1);
    try {
      const fill = await a.runCode('dd if=/dev/zero of=/root/fill bs=4M count=200 2>&1; true', { language: 'bash', timeoutMs: 120_000 });
      assert.match(fill.stdout, /No space left on device/);
      await assert.rejects(a.files.upload('/root/upload.bin', Buffer.alloc(16 * MB, 1)), (e: unknown) => e instanceof InsufficientStorageError && e.status === 507);
      const py = await a.runCode('open("/root/more", "wb").write(b"x" * (64 << 20))');
      assert.equal(py.error?.name, 'OSError', JSON.stringify(py.error));
      assert.match(py.error!.value, /No space left on device/);
      await a.runCode('rm -f /root/fill /root/more /root/upload.bin; sync', 'bash');
      // Not forced read-only: both tenants write again.
      await b.files.upload('/root/b.bin', Buffer.alloc(8 * MB, 2));
      await a.files.upload('/root/a.bin', Buffer.alloc(8 * MB, 3));
      const [bc] = await b.fork(1);
      assert.equal((await bc!.runCode('echo ok > /root/c && cat /root/c', 'bash')).stdout, 'ok\n');
      await bc!.close();
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('kills processes in nested pid namespaces when their sandbox is deleted, while the fork child lives on', async () => {
    const parent = await tenant(0);
    const [child] = await parent.fork(1);
    const unique = () => `sleep ${100_000 + Math.floor(Math.random() * 800_000)}`;
    // Each in a pid namespace of its own below the sandbox's, in a session of its own (out of
    // reach of the exec's process group): `unshare -fp`, and the same by hand from Python.
    const [viaUnshare, viaPython] = [unique(), unique()];
    const leaked: number[] = [];
    try {
      await parent.runCode(`setsid unshare -fp --mount-proc ${viaUnshare} > /dev/null 2>&1 &\nsleep 0.2`, 'bash');
      await parent.runCode([
        'import ctypes, os',
        'assert ctypes.CDLL(None, use_errno=True).unshare(0x20000000) == 0  # CLONE_NEWPID',
        'if os.fork() == 0:',
        '    os.setsid()',
        `    os.execvp("sleep", ${JSON.stringify(viaPython.split(' '))})`,
      ].join('\n'));
      await eventually(() => hostProcesses(viaUnshare).length === 1 && hostProcesses(viaPython).length === 1, 'the nested processes did not start');
      await parent.close();
      await eventually(() => hostProcesses(viaUnshare).length + hostProcesses(viaPython).length === 0, 'a nested process outlived its sandbox')
        .catch((err: Error) => {
          leaked.push(...hostProcesses(viaUnshare), ...hostProcesses(viaPython));
          throw err;
        });
      assert.equal((await child!.runCode('6 * 7')).text, '42');
    } finally {
      for (const pid of leaked) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      await child!.close();
      await parent.close().catch(() => undefined);
    }
  });

  it('shows no host path of the state directory in /proc/self/mountinfo, in a sandbox and in its fork child', async () => {
    const sbx = await tenant(0);
    try {
      const [child] = await sbx.fork(1);
      for (const s of [sbx, child!]) {
        const mountinfo = (await s.runCode('cat /proc/self/mountinfo', 'bash')).stdout;
        assert.match(mountinfo, / \/ /); // it did read the table
        assert.ok(!mountinfo.includes(server.stateDir), `host paths seen in ${s.id}:\n${mountinfo}`);
        assert.ok(!mountinfo.includes(path.dirname(server.stateDir) + '/pf-'), mountinfo);
      }
      await child!.close();
    } finally {
      await sbx.close();
    }
  });
});

describe('a fork failing while its layer is being made (its children refused)', () => {
  it('leaves no fork layer behind once its sandboxes are gone', async () => {
    // A state directory short enough for the holders' sockets (<state>/holders/<id>.sock, checked at
    // start) but too long for a fork child's (<state>/sandboxes/<id>/run/agent.sock): every fork
    // fails while its layer is still being frozen.
    const base = await mkdtemp(path.join(os.tmpdir(), 'pf-long-'));
    await chmod(base, 0o711); // the sandboxes' uid walks through it
    const stateDir = path.join(base, 'x'.repeat(57 - base.length - 1));
    const server = await startServer(loadConfig({
      // No zygote: these checks count every sandbox directory, and a zygote's rightly stays while
      // the server runs (test/zygote.test.ts checks that it goes at stop).
      port: 0, poolSize: 0, zygote: false, logLevel: 'silent', imagesDir: IMAGES_DIR, stateDir, diskVolumeBytes: 512 * MB,
    }, { ...process.env, PODFLARE_API_KEYS: '' }));
    try {
      const sbx = await Sandbox.create({ host: server.url });
      try {
        // Many files: freezing them into a fork layer takes a while, the failure comes first.
        await sbx.runCode('import os\nos.makedirs("/root/many", exist_ok=True)\nfor i in range(6000): open(f"/root/many/{i}", "w").write(str(i))');
        for (let i = 0; i < 3; i++) await assert.rejects(sbx.fork(1), /socket path too long/);
        assert.equal((await sbx.runCode('6 * 7')).text, '42');
      } finally {
        await sbx.close();
      }
      await eventually(() => forkLayersIn(stateDir).length === 0, `fork layers left by failed forks: ${forkLayersIn(stateDir).join(', ')}`);
      await eventually(() => sandboxDirsIn(stateDir).length === 0, `left: ${sandboxDirsIn(stateDir).join(', ')}`);
    } finally {
      await server.close();
      await rm(base, { recursive: true, force: true });
    }
  });
});

describe('a fork interrupted by its parent\'s DELETE', () => {
  let server: TestServer;
  before(async () => { server = await startTestServer({ poolSize: 0, zygote: false }); }); // no zygote: see above
  after(async () => { await server?.stop(); });

  it('leaves no fork layer and no child directory behind, however often a tenant does it', async () => {
    for (let round = 0; round < 3; round++) {
      const parent = await Sandbox.create({ host: server.url });
      // Many files: the layer is still being frozen when the DELETE comes.
      await parent.runCode('import os\nos.makedirs("/root/many", exist_ok=True)\nfor i in range(6000): open(f"/root/many/{i}", "w").write(str(i))');
      const forking = parent.fork(2).then((children) => Promise.all(children.map((c) => c.close())), () => undefined);
      await new Promise((r) => setTimeout(r, 30));
      await parent.close();
      await forking;
    }
    await eventually(() => forkLayersIn(server.stateDir).length === 0, `fork layers left: ${forkLayersIn(server.stateDir).join(', ')}`);
    await eventually(() => sandboxDirsIn(server.stateDir).filter((d) => !d.startsWith('.trash/')).length === 0,
      `left: ${sandboxDirsIn(server.stateDir).join(', ')}`);
  });
});

describe('a host without the disk volume\'s room', () => {
  let mountPoint: string;
  before(async () => {
    // A small filesystem of the test's own stands for a host disk with little free space.
    mountPoint = await mkdtemp(path.join(os.tmpdir(), 'pf-small-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m,mode=0711', 'tmpfs', mountPoint]);
  });
  after(() => {
    execFileSync('umount', ['-l', mountPoint]);
    rmSync(mountPoint, { recursive: true, force: true });
  });

  it('refuses to start with an error naming the space needed and the setting', async () => {
    const stateDir = path.join(mountPoint, 'state');
    mkdirSync(stateDir);
    const config = loadConfig({ port: 0, poolSize: 0, logLevel: 'silent', imagesDir: IMAGES_DIR, stateDir, diskVolumeBytes: TEST_DISK_VOLUME_BYTES },
      { ...process.env, PODFLARE_API_KEYS: '' });
    // (A server that starts regardless is closed again, so the failure is this assertion's.)
    await assert.rejects(startServer(config).then(async (started) => { await started.close(); return started; }), (e: Error) => {
      assert.match(e.message, /needs 1024 MB reserved/);
      assert.match(e.message, /6\d MB free/);
      assert.match(e.message, /PODFLARE_DISK_VOLUME_MB/);
      return true;
    });
    assert.ok(!existsSync(path.join(stateDir, 'disk.img')), 'a partial image was left');
    assert.ok(!readFileSync('/proc/self/mountinfo', 'utf8').includes(`${stateDir}/sandboxes`), 'a mount was left');
  });

  it('podflare doctor fails the disk volume check there, and passes it where there is room', async () => {
    const small = await runDoctor({ imagesDir: IMAGES_DIR, stateDir: path.join(mountPoint, 'doctor'), diskVolumeBytes: TEST_DISK_VOLUME_BYTES });
    const check = small.checks.find((c) => c.name === 'disk volume');
    assert.ok(check && !check.ok && check.required, JSON.stringify(check));
    assert.match(check.detail, /needs 1024 MB/);
    assert.equal(small.ok, false);
    const roomy = await runDoctor({ imagesDir: IMAGES_DIR, stateDir: path.join(os.tmpdir(), 'pf-doctor-none'), diskVolumeBytes: 256 * MB });
    assert.equal(roomy.checks.find((c) => c.name === 'disk volume')?.ok, true);
  });
});
