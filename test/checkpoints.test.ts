/**
 * Checkpoints, restore, atomic execs and rewind (issue 23) against real sandboxes: state that comes
 * back (DataFrames, deleted directories, file offsets, cwd, env), what does not (sockets opened
 * since), isolation between sandboxes, waiting for a running exec, bad input, and no leftovers.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { ConflictError, NotFoundError, Sandbox } from 'podflare';
import { forkLayersIn, overlayMountsUnder, processesOf, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer, type TestServer } from './helpers/server.js';

async function call(base: string, method: string, path: string, body?: unknown) {
  const res = await fetch(base + path, { method, body: body === undefined ? undefined : JSON.stringify(body), headers: { 'content-type': 'application/json' } });
  const text = await res.text();
  return { status: res.status, json: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

async function eventually(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('checkpoints, restore, atomic, rewind', () => {
  let server: TestServer;
  const opened: Sandbox[] = [];
  const make = async (opts: { history?: number } = {}) => {
    const s = await Sandbox.create({ host: server.url, ...opts });
    opened.push(s);
    return s;
  };

  before(async () => {
    server = await startTestServer({ poolSize: 2 });
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
  });

  it('brings back a DataFrame a bad cell overwrote, with rewind()', async () => {
    const sbx = await make({ history: 5 });
    await sbx.runCode('import pandas as pd\ndf = pd.DataFrame({"x": range(1000)})');
    await sbx.runCode('df = df[df.x < 0]  # the bad cell');
    assert.equal((await sbx.runCode('print(len(df))')).stdout, '0\n');
    // Each exec is a step: undo the print and the bad cell.
    await sbx.rewind(2);
    assert.equal((await sbx.runCode('print(len(df), df.x.sum())')).stdout, '1000 499500\n');
    const history = await sbx.checkpoints();
    assert.ok(history.every((c) => c.kind === 'history' && c.sandbox === sbx.id));
  });

  it('brings back a deleted directory and keeps the checkpoint for another restore', async () => {
    const sbx = await make();
    await sbx.runCode('import os\nos.makedirs("/root/work/sub", exist_ok=True)\nopen("/root/work/sub/a.txt", "w").write("precious")');
    const cp = await sbx.checkpoint('before rm');
    assert.match(cp.id, /^ckpt_[0-9a-f]{24}$/);
    assert.equal(cp.name, 'before rm');
    await sbx.runCode('rm -rf /root/work', 'bash');
    const diff = await sbx.diffCheckpoint(cp, { paths: ['/root'] });
    assert.ok(diff.removed.includes('/root/work/sub/a.txt'), JSON.stringify(diff));
    await sbx.restore(cp);
    assert.equal((await sbx.runCode('print(open("/root/work/sub/a.txt").read())')).stdout, 'precious\n');
    await sbx.runCode('import shutil\nshutil.rmtree("/root/work")\ngone = True');
    await sbx.restore(cp);
    assert.equal((await sbx.runCode('print(open("/root/work/sub/a.txt").read(), "gone" in globals())')).stdout, 'precious False\n');
    assert.deepEqual((await sbx.checkpoints()).map((c) => c.id), [cp.id]);
    await sbx.deleteCheckpoint(cp);
    assert.deepEqual(await sbx.checkpoints(), []);
    await assert.rejects(sbx.restore(cp), NotFoundError);
  });

  it('shows the variables changed since a checkpoint', async () => {
    const sbx = await make();
    await sbx.runCode('a = 1\nb = 2');
    const cp = await sbx.checkpoint();
    await sbx.runCode('b = 3\nc = 4\ndel a');
    const diff = await sbx.diffCheckpoint(cp, { vars: true });
    assert.deepEqual(diff.vars?.added.map((v) => v.name), ['c']);
    assert.deepEqual(diff.vars?.removed.map((v) => v.name), ['a']);
    assert.deepEqual(diff.vars?.changed.map((v) => [v.name, v.before, v.after]), [['b', '2', '3']]);
  });

  it('undoes an atomic exec that raises halfway: no variable, no file; the output stays', async () => {
    const sbx = await make();
    await sbx.runCode('kept = "yes"');
    const ex = await sbx.runCode('import os\nhalf = 1\nopen("/root/half.txt", "w").write("x")\nos.makedirs("/tmp/made")\nprint("before the error")\nraise ValueError("boom")', { atomic: true });
    assert.equal(ex.exitCode, 1);
    assert.equal(ex.rolledBack, true);
    assert.equal(ex.error?.name, 'ValueError');
    assert.equal(ex.stdout, 'before the error\n');
    const probe = await sbx.runCode('import os\nprint("half" in globals(), os.path.exists("/root/half.txt"), os.path.exists("/tmp/made"), kept)');
    assert.equal(probe.stdout, 'False False False yes\n');
    // bash: a non-zero exit is a failure too.
    const b = await sbx.runCode('touch /root/bash.txt; exit 3', { language: 'bash', atomic: true });
    assert.equal(b.exitCode, 3);
    assert.equal(b.rolledBack, true);
    assert.equal((await sbx.runCode('test -e /root/bash.txt && echo there || echo absent', 'bash')).stdout, 'absent\n');
    // Its own checkpoint is not left behind.
    assert.deepEqual(await sbx.checkpoints(), []);
  });

  it('says rolled_back: false, and the sandbox lives on, when the code killed its own checkpoint', async () => {
    const sbx = await make();
    await sbx.runCode('kept = 1');
    // The checkpoint's processes are visible in the sandbox's pid namespace: code may kill them.
    const ex = await sbx.runCode([
      'import os',
      'mine = {1, os.getpid(), os.getppid()}',
      'for p in [int(p) for p in os.listdir("/proc") if p.isdigit()]:',
      '    if p not in mine:',
      '        try: os.kill(p, 9)',
      '        except OSError: pass',
      'import time; time.sleep(0.5)',
      'damage = 1',
      'raise RuntimeError("after killing the checkpoint")',
    ].join('\n'), { atomic: true });
    assert.equal(ex.exitCode, 1);
    assert.equal(ex.rolledBack, false);
    assert.equal((await sbx.runCode('print(kept, damage)')).stdout, '1 1\n');
  });

  it('keeps everything a successful atomic exec did', async () => {
    const sbx = await make();
    const ex = await sbx.runCode('v = 41 + 1\nopen("/root/ok.txt", "w").write("ok")\nprint(v)', { atomic: true });
    assert.equal(ex.exitCode, 0);
    assert.equal(ex.rolledBack, false);
    assert.equal((await sbx.runCode('print(v, open("/root/ok.txt").read())')).stdout, '42 ok\n');
    assert.deepEqual(await sbx.checkpoints(), []);
  });

  it('restores open file offsets, cwd and env; closes sockets opened since', async () => {
    const sbx = await make();
    await sbx.runCode([
      'import os, socket',
      'open("/root/lines.txt", "w").write("".join(f"line{i}\\n" for i in range(10)))',
      'f = open("/root/lines.txt")',
      'for _ in range(5): f.readline()',
      'os.makedirs("/tmp/here", exist_ok=True); os.chdir("/tmp/here")',
      'os.environ["STAGE"] = "checkpointed"',
    ].join('\n'));
    const cp = await sbx.checkpoint();
    await sbx.runCode([
      'for _ in range(3): f.readline()',
      'os.chdir("/"); os.environ["STAGE"] = "later"',
      'srv = socket.create_server(("127.0.0.1", 8765))',
    ].join('\n'));
    await sbx.restore(cp);
    const probe = await sbx.runCode([
      'import os, socket',
      'print(f.readline().strip(), os.getcwd(), os.environ["STAGE"], "srv" in globals())',
      'try:',
      '    socket.create_connection(("127.0.0.1", 8765), timeout=2).close(); print("listening")',
      'except OSError: print("closed")',
      'print(sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd") if fd.isdigit() and os.path.islink(f"/proc/self/fd/{fd}") and int(fd) > 2) <= 1)',
    ].join('\n'));
    assert.equal(probe.exitCode, 0, probe.stderr);
    assert.equal(probe.stdout, 'line5 /tmp/here checkpointed False\nclosed\nTrue\n');
  });

  it('gives the restored state the sandbox\'s network (egress: true), and none to a sandbox without', async () => {
    const probe = 'import socket\nprint(sorted(name for _, name in socket.if_nameindex()))';
    for (const [egress, expected] of [[true, "['lo', 'tap0']\n"], [false, "['lo']\n"]] as const) {
      const sbx = await Sandbox.create({ host: server.url, egress });
      opened.push(sbx);
      const cp = await sbx.checkpoint();
      await sbx.restore(cp);
      assert.equal((await sbx.runCode(probe)).stdout, expected, `egress ${egress} after restore`);
      const failed = await sbx.runCode('raise RuntimeError("undo me")', { atomic: true });
      assert.equal(failed.rolledBack, true);
      assert.equal((await sbx.runCode(probe)).stdout, expected, `egress ${egress} after a rollback`);
    }
  });

  it("never mixes two sandboxes' checkpoints", async () => {
    const [a, b] = [await make(), await make()];
    await a.runCode('owner = "a"');
    await b.runCode('owner = "b"');
    const cpA = await a.checkpoint('a');
    const cpB = await b.checkpoint('b');
    assert.deepEqual((await a.checkpoints()).map((c) => c.id), [cpA.id]);
    assert.deepEqual((await b.checkpoints()).map((c) => c.id), [cpB.id]);
    const wrong = await call(server.url, 'POST', `/v1/sandboxes/${b.id}/checkpoints/${cpA.id}/restore`);
    assert.equal(wrong.status, 404);
    assert.equal(wrong.json.code, 'checkpoint_not_found');
    assert.match(String(wrong.json.error), /another sandbox's/);
    await a.runCode('owner = "changed"');
    await a.restore(cpA);
    assert.equal((await a.runCode('print(owner)')).stdout, 'a\n');
    assert.equal((await b.runCode('print(owner)')).stdout, 'b\n');
  });

  it('makes a restore asked for during an exec wait for it (documented)', async () => {
    const sbx = await make();
    await sbx.runCode('step = 0');
    const cp = await sbx.checkpoint();
    const running = sbx.runCode('import time\ntime.sleep(1)\nstep = 1\nprint("finished")');
    await new Promise((r) => setTimeout(r, 200));
    let execDone = false;
    void running.then(() => { execDone = true; });
    await sbx.restore(cp);
    assert.equal(execDone, true, 'the restore answered only after the exec finished');
    assert.equal((await running).stdout, 'finished\n');
    assert.equal((await sbx.runCode('print(step)')).stdout, '0\n');
  });

  it('rewinds step by step, drops the oldest past history, and says how far it can go', async () => {
    const sbx = await make({ history: 2 });
    for (const v of [1, 2, 3]) await sbx.runCode(`n = ${v}`);
    assert.equal((await sbx.checkpoints()).length, 2);
    await sbx.rewind();
    assert.equal((await sbx.runCode('print(n)')).stdout, '2\n'); // this exec is a step too
    await sbx.rewind(2);
    assert.equal((await sbx.runCode('print(n)')).stdout, '1\n');
    await assert.rejects(sbx.rewind(5), ConflictError);
    const noHistory = await make();
    const r = await call(server.url, 'POST', `/v1/sandboxes/${noHistory.id}/rewind`, {});
    assert.equal(r.status, 409);
    assert.match(String(r.json.error), /history/);
  });

  it('answers bad input with 4xx naming the problem', async () => {
    const sbx = await make();
    const badId = await call(server.url, 'POST', `/v1/sandboxes/${sbx.id}/checkpoints/nope/restore`);
    assert.equal(badId.status, 400);
    assert.equal(badId.json.field, 'checkpoint');
    const badName = await call(server.url, 'POST', `/v1/sandboxes/${sbx.id}/checkpoints`, { name: 5 });
    assert.equal(badName.status, 400);
    const badSteps = await call(server.url, 'POST', `/v1/sandboxes/${sbx.id}/rewind`, { steps: 0 });
    assert.equal(badSteps.status, 400);
    const badHistory = await call(server.url, 'POST', '/v1/sandboxes', { history: 1000 });
    assert.equal(badHistory.status, 400);
    const unknown = await call(server.url, 'DELETE', `/v1/sandboxes/${sbx.id}/checkpoints/ckpt_${'0'.repeat(24)}`);
    assert.equal(unknown.status, 404);
  });
});

describe('checkpoints die with their sandbox', () => {
  it('leaves no process, mount, directory or layer once the sandbox is deleted', async () => {
    // No zygote either: its own directory would stay, rightly, while the server runs.
    const server = await startTestServer({ poolSize: 0, zygote: false });
    try {
      const sbx = await Sandbox.create({ host: server.url, history: 3 });
      await sbx.runCode('x = bytearray(8 * 1024 * 1024)');
      const one = await sbx.checkpoint('one');
      await sbx.checkpoint('two');
      await sbx.runCode('y = 1');
      await sbx.runCode('1/0', { atomic: true });
      // Restores are in place: the sandbox keeps its namespaces and directory (no husks).
      for (let i = 0; i < 5; i++) {
        await sbx.runCode(`step = ${i}`);
        await sbx.restore(one);
      }
      await sbx.rewind();
      assert.equal((await sbx.runCode('print(len(x), "step" in globals())')).stdout, '8388608 False\n');
      assert.ok(processesOf([sbx.id]).length > 4, 'checkpoints are processes of the sandbox while it lives');
      // Held in the sandbox's own directory (its disk limit): no directory of their own, layers in it.
      assert.equal(sandboxDirsIn(server.stateDir).length, 1, 'one directory: the sandbox\'s');
      assert.ok(forkLayersIn(server.stateDir).length >= 2, 'their files are fork layers in it');
      await sbx.close();
      // A checkpoint under way when the sandbox is deleted (a DELETE does not queue) is not left behind.
      const racing = await Sandbox.create({ host: server.url });
      const late = racing.checkpoint('late').catch((e: Error) => e);
      await new Promise((r) => setTimeout(r, 5));
      await racing.close();
      await late;
      await eventually(() => processesOf([sbx.id, racing.id]).length === 0, 'the processes of the sandboxes and their checkpoints to end');
      await eventually(() => sandboxDirsIn(server.stateDir).length === 0, 'the directories to go');
      assert.deepEqual(forkLayersIn(server.stateDir), []);
      // The disk volume itself stays mounted there until the server stops.
      assert.deepEqual(overlayMountsUnder(server.stateDir).filter((m) => m !== `${server.stateDir}/sandboxes`), []);
    } finally {
      await server.stop();
    }
  });
});
