/**
 * fork(n), diff and merge_into against real sandboxes: inheritance, isolation both ways, open file
 * handles, lineage, memory sharing, bad input, and no leftovers.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { BadRequestError, NotFoundError, Sandbox } from 'podflare';
import { forkLayersIn, overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer, type TestServer } from './helpers/server.js';

async function call(base: string, method: string, path: string, body?: string) {
  const res = await fetch(base + path, { method, body, headers: { 'content-type': 'application/json' } });
  const text = await res.text();
  return { status: res.status, json: text ? (JSON.parse(text) as { error?: string; code?: string; field?: string }) : {} };
}

describe('fork, diff, merge_into', () => {
  let server: TestServer;
  const opened: Sandbox[] = [];
  const make = async () => {
    const s = await Sandbox.create({ host: server.url });
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

  it('runs the seed workflow: load a CSV, fork(5), a statement each, merge the winner', async () => {
    const parent = await make();
    await parent.upload('/root/data.csv', 'a,b,c\n' + Array.from({ length: 200 }, (_, i) => `${i},${i * 2},${i % 7}`).join('\n') + '\n');
    const setup = await parent.runCode('import pandas as pd\ndf = pd.read_csv("/root/data.csv")\nlen(df)');
    assert.equal(setup.results[0]?.text, '200');
    const children = await parent.fork(5);
    opened.push(...children);
    assert.equal(children.length, 5);
    const statements = ['df.head()', 'df.describe()', 'df.corr()', 'df.dtypes', 'df.memory_usage()'];
    const runs = await Promise.all(children.map((c, i) => c.runCode(`result = ${statements[i]}\nopen("/root/winner.txt", "w").write("${i}")\nresult`)));
    for (const r of runs) {
      assert.equal(r.exitCode, 0, r.stderr);
      assert.ok(r.results[0]?.text, 'each statement returns a value');
    }
    const winner = children[2]!;
    await parent.mergeInto(winner);
    const after = await parent.runCode('print(type(result).__name__, open("/root/winner.txt").read())');
    assert.equal(after.stdout, 'DataFrame 2\n');
    await winner.close(); // a no-op after the merge
    await assert.rejects(winner.runCode('1'), NotFoundError);
    // Siblings live on.
    assert.equal((await children[0]!.runCode('print(len(df))')).stdout, '200\n');
  });

  it('isolates parent, children and siblings both ways, in memory and on disk', async () => {
    const parent = await make();
    await parent.runCode('shared = "before"\nopen("/tmp/keep.txt", "w").write("keep")');
    const [a, b] = await parent.fork(2);
    opened.push(a!, b!);
    await a!.runCode('child_only = 1\nopen("/root/a.txt", "w").write("a")\nimport os\nos.remove("/tmp/keep.txt")');
    await parent.runCode('shared = "after"\nopen("/root/p.txt", "w").write("p")');
    const probe = 'import os\nprint(globals().get("child_only"), shared, os.path.exists("/root/a.txt"), os.path.exists("/root/p.txt"), os.path.exists("/tmp/keep.txt"))';
    assert.equal((await parent.runCode(probe)).stdout, 'None after False True True\n');
    assert.equal((await b!.runCode(probe)).stdout, 'None before False False True\n');
    assert.equal((await a!.runCode(probe)).stdout, '1 before True False False\n');
  });

  it('continues open file handles from the same offset, in each child its own copy', async () => {
    const parent = await make();
    await parent.runCode('open("/root/lines.txt", "w").write("".join(f"line{i}\\n" for i in range(10)))\nf = open("/root/lines.txt")\nfor _ in range(5): f.readline()\nw = open("/root/log.txt", "a")\nw.write("parent\\n"); w.flush()');
    const [c1, c2] = await parent.fork(2);
    opened.push(c1!, c2!);
    assert.equal((await c1!.runCode('print(f.readline().strip())')).stdout, 'line5\n');
    assert.equal((await c2!.runCode('print(f.readline().strip())')).stdout, 'line5\n');
    await c1!.runCode('w.write("child\\n"); w.flush()');
    assert.equal((await parent.runCode('print(open("/root/log.txt").read(), end="")')).stdout, 'parent\n');
    assert.equal((await c1!.runCode('print(open("/root/log.txt").read(), end="")')).stdout, 'parent\nchild\n');
    assert.equal((await parent.runCode('print(f.readline().strip())')).stdout, 'line5\n');
  });

  it('gives each child its own hostname and fresh randomness', async () => {
    const parent = await make();
    await parent.runCode('import random, uuid, socket\nimport numpy as np');
    const kids = await parent.fork(3);
    opened.push(...kids);
    const outs = await Promise.all(kids.map((k) => k.runCode('print(socket.gethostname(), random.random(), np.random.rand(), uuid.uuid4())')));
    const lines = outs.map((o) => o.stdout.trim().split(' '));
    for (const column of [0, 1, 2, 3]) assert.equal(new Set(lines.map((l) => l[column])).size, 3, `column ${column} repeats: ${JSON.stringify(lines)}`);
  });

  it('forks while code in the parent signals every process it can (the children wait for their roots)', async () => {
    const parent = await make();
    // SIGUSR2 is what tells a fork child its root is ready: a stray one must only mean another look.
    await parent.runCode(`import os, signal, threading, time
signal.signal(signal.SIGUSR2, lambda *a: None)
def storm():
    while True:
        try:
            os.kill(-1, signal.SIGUSR2)
        except OSError:
            pass
        time.sleep(0.0002)
threading.Thread(target=storm, daemon=True).start()`);
    const kids = await parent.fork(3);
    opened.push(...kids);
    const names = await Promise.all(kids.map(async (k) => (await k.runCode('import socket\nopen("/tmp/mine", "w").write("x")\nprint(socket.gethostname())')).stdout.trim()));
    assert.equal(new Set(names).size, 3);
    const parentName = (await parent.runCode('import socket, os\nprint(socket.gethostname(), os.path.exists("/tmp/mine"))')).stdout.trim();
    assert.ok(!names.some((n) => parentName.startsWith(`${n} `)), `${parentName} vs ${names}`);
    assert.match(parentName, / False$/);
  });

  it('forks a parent that has drawn a matplotlib figure (its open font files come along)', async () => {
    const parent = await make();
    const drawn = await parent.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\nprint("drawn")');
    assert.equal(drawn.stdout, 'drawn\n');
    const kids = await parent.fork(2);
    opened.push(...kids);
    for (const k of kids) assert.equal((await k.runCode('plt.plot([3, 2, 1])\nplt.show()\nprint("again")')).stdout, 'again\n');
  });

  it('leaves no zombie in the parent once its children are closed, even before its next Python exec', async () => {
    const parent = await make();
    await parent.runCode('x = 1');
    const kids = await parent.fork(2);
    await Promise.all(kids.map((k) => k.close()));
    // A bash exec does not wake the interpreter: the interpreter reaps its ended children itself.
    const zombies = () => parent.runCode('awk \'$3 == "Z"\' /proc/[0-9]*/stat 2>/dev/null | wc -l', { language: 'bash' });
    let left = '';
    for (let i = 0; i < 100; i++) {
      left = (await zombies()).stdout.trim();
      if (left === '0') break;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(left, '0');
  });

  it('supports grandchildren, and children survive their parent', async () => {
    const parent = await make();
    await parent.runCode('depth = 0');
    const [child] = await parent.fork(1);
    opened.push(child!);
    await child!.runCode('depth = 1');
    const [grandchild] = await child!.fork(1);
    opened.push(grandchild!);
    assert.equal((await grandchild!.runCode('print(depth)')).stdout, '1\n');
    const info = await child!.info();
    assert.equal(info.parent, parent.id);
    assert.deepEqual(info.children, [grandchild!.id]);
    const family = await Sandbox.list({ host: server.url, ancestor: parent.id });
    assert.deepEqual(family.map((s) => s.id).sort(), [child!.id, grandchild!.id].sort());
    await parent.close();
    assert.equal((await child!.runCode('print(depth + 1)')).stdout, '2\n');
    assert.equal((await grandchild!.runCode('print(depth + 10)')).stdout, '11\n');
    await child!.close();
    assert.equal((await grandchild!.runCode('print("alone")')).stdout, 'alone\n');
  });

  it('keeps a deep fork chain right and shallow: layers are squashed as it grows', async () => {
    // Each generation adds a file, deletes its grandparent's, replaces a directory with a file
    // and back, and rewrites a shared file: the last one must see exactly the sum of it all.
    let sbx = await make();
    await sbx.runCode('mkdir -p /root/chain/swap && echo 0 > /root/chain/shared && touch /root/chain/gen-0', 'bash');
    const generations = 9;
    for (let g = 1; g <= generations; g++) {
      const [child] = await sbx.fork(1);
      opened.push(child!);
      const swap = g % 2 ? 'rm -rf /root/chain/swap && echo file > /root/chain/swap' : 'rm -f /root/chain/swap && mkdir /root/chain/swap && touch /root/chain/swap/in-dir';
      await child!.runCode(`touch /root/chain/gen-${g}; rm -f /root/chain/gen-${g - 2}; echo ${g} > /root/chain/shared; ${swap}`, 'bash');
      if (g > 1) await sbx.close(); // the chain's middle generations go: their layers must stay in use
      sbx = child!;
    }
    const r = await sbx.runCode('cd /root/chain && ls -p | tr "\\n" " "; echo; cat shared; if [ -d swap ]; then ls swap; else cat swap; fi', 'bash');
    assert.equal(r.stdout, `gen-${generations - 1} gen-${generations} shared swap \n${generations}\nfile\n`);
    // The root is an overlay of at most a few fork layers over the image, however deep the chain.
    const lowers = (await sbx.runCode("grep -o 'lowerdir=[^,]*' /proc/self/mountinfo | head -1 | tr ':' '\\n' | wc -l", 'bash')).stdout.trim();
    assert.ok(Number(lowers) <= 4 + 1 + 2, `${lowers} lower layers`);
  });

  it('diffs files (added, removed, modified, replaced directories), content and variables', async () => {
    const parent = await make();
    await parent.runCode('import os\nos.makedirs("/root/dir", exist_ok=True)\nopen("/root/dir/x", "w").write("x")\nopen("/root/mod.txt", "w").write("one\\ntwo\\n")\nopen("/root/gone.txt", "w").write("bye")\nkeep = 1\nchange = "a"\ndrop = 3');
    const [child] = await parent.fork(1);
    opened.push(child!);
    await child!.runCode('import os, shutil\nopen("/root/new.txt", "w").write("hello\\n")\nos.remove("/root/gone.txt")\nopen("/root/mod.txt", "w").write("one\\nTWO\\n")\nshutil.rmtree("/root/dir")\nopen("/root/dir", "w").write("now a file")\nopen("/root/bin.dat", "wb").write(bytes(range(256)))\nchange = "b"\ndel drop\nadded = [1, 2]');
    const d = await parent.diff(child!, { content: true, vars: true });
    assert.ok(d.added.includes('/root/new.txt'), JSON.stringify(d));
    assert.ok(d.added.includes('/root/bin.dat'));
    assert.ok(d.removed.includes('/root/gone.txt'));
    assert.ok(d.modified.includes('/root/mod.txt'));
    assert.ok(d.modified.includes('/root/dir') || (d.removed.includes('/root/dir/x') && d.added.includes('/root/dir')), JSON.stringify(d));
    const content = d.content as Record<string, string>;
    assert.match(content['/root/mod.txt']!, /-two\n\+TWO/);
    assert.deepEqual(d.binary, ['/root/bin.dat']);
    const vars = d.vars!;
    assert.deepEqual(vars.added.map((v) => v.name), ['added']);
    assert.deepEqual(vars.removed.map((v) => v.name), ['drop']);
    assert.deepEqual(vars.changed.map((v) => [v.name, v.before, v.after]), [['change', "'a'", "'b'"]]);
    const only = await parent.diff(child!, { paths: ['/root/new.txt'] });
    assert.deepEqual([only.added, only.removed, only.modified], [['/root/new.txt'], [], []]);
  });

  it('merges only chosen paths, keeping the parent interpreter', async () => {
    const parent = await make();
    await parent.runCode('mine = "parent"');
    const [child] = await parent.fork(1);
    opened.push(child!);
    await child!.runCode('import os\nos.makedirs("/root/out/sub", exist_ok=True)\nopen("/root/out/a.txt", "w").write("A")\nopen("/root/out/sub/b.txt", "w").write("B")\nopen("/root/other.txt", "w").write("no")\nmine = "child"');
    await parent.mergeInto(child!, { paths: ['/root/out'] });
    const r = await parent.runCode('import os\nprint(mine, open("/root/out/a.txt").read(), open("/root/out/sub/b.txt").read(), os.path.exists("/root/other.txt"))');
    assert.equal(r.stdout, 'parent A B False\n');
    assert.equal((await child!.runCode('print(mine)')).stdout, 'child\n', 'a selective merge keeps the winner');
  });

  it('answers bad fork and merge requests clearly', async () => {
    const parent = await make();
    for (const n of [0, 33, 'x']) {
      const r = await call(server.url, 'POST', `/v1/sandboxes/${parent.id}/fork`, JSON.stringify({ n }));
      assert.equal(r.status, 400, `n=${n}`);
      assert.equal(r.json.field, 'n');
    }
    const unknown = 'sbx_' + 'f'.repeat(32);
    assert.equal((await call(server.url, 'POST', `/v1/sandboxes/${unknown}/fork`, '{}')).status, 404);
    const self = await call(server.url, 'POST', `/v1/sandboxes/${parent.id}/merge_into/${parent.id}`);
    assert.equal(self.status, 400);
    const stranger = await make();
    const notMine = await call(server.url, 'POST', `/v1/sandboxes/${parent.id}/merge_into/${stranger.id}`);
    assert.equal(notMine.status, 400);
    const [child] = await parent.fork(1);
    opened.push(child!);
    await parent.mergeInto(child!);
    const twice = await call(server.url, 'POST', `/v1/sandboxes/${parent.id}/merge_into/${child!.id}`);
    assert.equal(twice.status, 404);
    await assert.rejects(parent.mergeInto(parent), BadRequestError);
  });

  it('waits for a running exec before forking', async () => {
    const parent = await make();
    const running = parent.runCode('import time\ntime.sleep(0.5)\nstep = "done"');
    await new Promise((r) => setTimeout(r, 100));
    const [child] = await parent.fork(1);
    opened.push(child!);
    await running;
    assert.equal((await child!.runCode('print(step)')).stdout, 'done\n');
  });

  it('shares memory copy-on-write: five children of a 300 MB parent add little', async () => {
    const parent = await make();
    await parent.runCode('import numpy as np\nbig = np.random.rand(300 * 1024 * 1024 // 8)\nbig.sum()');
    const before = await server.manager.memoryOf(parent.id);
    const kids = await parent.fork(5);
    opened.push(...kids);
    // Each child's interpreter process (started by its first exec) shares the pages too: with
    // them all up, the family's processes stay put while their PSS is read one by one.
    await Promise.all(kids.map((k) => k.runCode('pass')));
    const total = (await server.manager.memoryOf(parent.id)) + (await Promise.all(kids.map((k) => server.manager.memoryOf(k.id)))).reduce((a, b) => a + b, 0);
    assert.ok(total < before * 1.3, `parent ${Math.round(before / 2 ** 20)} MB, family ${Math.round(total / 2 ** 20)} MB`);
    assert.equal((await kids[4]!.runCode('print(big.shape[0] == 300 * 1024 * 1024 // 8)')).stdout, 'True\n');
  });

  it('leaves no process, mount or layer behind once everything is deleted', async () => {
    const parent = await make();
    const kids = await parent.fork(3);
    const grand = await kids[0]!.fork(2);
    await Promise.all([parent, ...kids, ...grand].map((s) => s.close()));
    await server.close();
    assert.deepEqual(processesMentioning(server.stateDir), []);
    assert.deepEqual(overlayMountsUnder(server.stateDir), []);
    assert.deepEqual(sandboxDirsIn(server.stateDir), []);
    assert.deepEqual(forkLayersIn(server.stateDir), []);
  });
});
