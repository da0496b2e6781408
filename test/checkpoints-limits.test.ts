/**
 * Checkpoints against the sandbox's own limits (issue 23, namespace runtime): checkpoints and
 * restored states hold one disk limit between them — the sandbox's — and a sandbox can be
 * restored any number of times (a restore nests no pid namespace).
 *
 * Before checkpoints were held inside their sandbox, each checkpoint (and each restored state) was
 * a fork child with a directory and disk quota of its own: a sandbox with n checkpoints could hold
 * (n + 1) times its disk limit, and about 28 restores exhausted the pid namespace depth (409).
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

describe('checkpoints count against their sandbox\'s limits', () => {
  let server: TestServer;
  const opened: Sandbox[] = [];
  const make = async (opts: Parameters<typeof Sandbox.create>[0] = {}) => {
    const s = await Sandbox.create({ host: server.url, ...opts });
    opened.push(s);
    return s;
  };

  before(async () => {
    server = await startTestServer({ poolSize: 0 });
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
  });

  it('holds the sandbox, its checkpoints and its restored states within one disk limit', async () => {
    const sbx = await make({ limits: { diskMb: 96 } });
    // 60 MB of distinct data (random: no compression or dedup on the way).
    const write = (name: string) => sbx.runCode(`dd if=/dev/urandom of=/root/${name} bs=1M count=60 status=none && sync && echo ok`, 'bash');
    assert.equal((await write('a.bin')).stdout, 'ok\n');
    const cp = await sbx.checkpoint('with a');
    await sbx.restore(cp);
    // a.bin lives on in the checkpoint's layer (and the restored root's lowers): 60 + 60 > 96.
    await sbx.runCode('rm -f /root/a.bin', 'bash');
    const b = await write('b.bin');
    assert.notEqual(b.exitCode, 0, `a second 60 MB file fit beside a checkpoint holding 60 MB, in a 96 MB limit: ${b.stdout}`);
    assert.match(b.stderr, /quota|No space left/i);
    // The sandbox goes on (and gets its space back with its files).
    await sbx.runCode('rm -f /root/b.bin', 'bash');
    assert.equal((await sbx.runCode('print(6 * 7)')).stdout, '42\n');
  });

  it('restores a sandbox any number of times (no pid namespace per restore)', async () => {
    const sbx = await make();
    // The pid namespace the sandbox's code runs in (a restored fork child would run in a new one).
    const pidNs = async () => (await sbx.runCode('readlink /proc/self/ns/pid /proc/1/ns/pid', 'bash')).stdout;
    const before = await pidNs();
    await sbx.runCode('n = 0');
    const cp = await sbx.checkpoint();
    for (let i = 0; i < 40; i++) {
      await sbx.runCode(`n = ${i + 1}`);
      await sbx.restore(cp);
    }
    assert.equal((await sbx.runCode('print(n)')).stdout, '0\n');
    // The same pid namespace as before the restores.
    assert.equal(await pidNs(), before);
    // And it can still be forked and checkpointed.
    const [child] = await sbx.fork(1);
    opened.push(child!);
    assert.equal((await child!.runCode('print(n)')).stdout, '0\n');
    await sbx.checkpoint();
  });
});

describe('held checkpoints and the live interpreter', () => {
  let server: TestServer;
  before(async () => {
    server = await startTestServer({ poolSize: 1 });
  });
  after(async () => {
    await server?.stop();
  });

  it('outlive an interpreter killed for its timeout, and a sandbox fork, and stay restorable', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    try {
      await sbx.runCode('x = 1');
      const cp = await sbx.checkpoint();
      // Deaf to interrupts: the timeout kills the interpreter's whole process group and restarts it.
      const stuck = await sbx.runCode('import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nx = 2\nwhile True: time.sleep(0.05)',
        { timeoutMs: 500 });
      assert.equal(stuck.stateLost, true);
      const [child] = await sbx.fork(1);
      await child!.close();
      await sbx.restore(cp);
      assert.equal((await sbx.runCode('print(x)')).stdout, '1\n');
      // Restored again from the copy it kept.
      await sbx.runCode('x = 3');
      await sbx.restore(cp);
      assert.equal((await sbx.runCode('print(x)')).stdout, '1\n');
    } finally {
      await sbx.close();
    }
  });
});
