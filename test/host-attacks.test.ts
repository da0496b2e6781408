/**
 * Hostile code in a sandbox against the host's root-owned helpers (issue #18): each test plants
 * what a sandbox can plant (symlinks in intermediate components, /proc, FIFOs, a swapped /.pf,
 * a directory exchanged with a symlink in a loop, writes into a fork's run directory) and checks
 * that nothing of the host was read, created, deleted or changed — canary files in a directory
 * of the test's own, outside the state directory — and that other sandboxes still create, exec,
 * fork and diff. Namespace runtime only (the helpers under attack are its).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { spawn } from 'node:child_process';
import { Sandbox } from 'podflare';
import { HostHelper } from '../packages/server/src/runtime/namespace/hostd.js';
import { createLogger } from '../packages/server/src/log.js';
import { sandboxDirs, trashDir } from '../packages/server/src/runtime/namespace/layout.js';
import { Trash } from '../packages/server/src/runtime/namespace/trash.js';
import { overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const CANARY_TEXT = 'CANARY-SECRET-7f3a9c';

/** Everything about a tree that an attack could change: names, types, modes, owners, times, contents. */
function snapshot(dir: string): string {
  const lines: string[] = [];
  const visit = (p: string) => {
    const st = lstatSync(p);
    let body = '';
    if (st.isFile()) body = createHash('sha256').update(readFileSync(p)).digest('hex');
    else if (st.isSymbolicLink()) body = readlinkSync(p);
    lines.push(`${path.relative(dir, p) || '.'} ${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.mtimeMs} ${st.size} ${body}`);
    if (st.isDirectory()) for (const name of readdirSync(p).sort()) visit(path.join(p, name));
  };
  visit(dir);
  return lines.join('\n');
}

/** A promise that must settle within `ms` (a hung host helper never answers). */
function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms); }),
  ]);
}

/** Python source that starts `code` in the background (its own session: it outlives the exec). */
function background(code: string): string {
  return `import subprocess, sys\nsubprocess.Popen([sys.executable, "-c", ${JSON.stringify(code)}], start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)`;
}

async function sh(s: Sandbox, code: string): Promise<string> {
  const r = await s.runCode(code);
  assert.equal(r.error ?? null, null, `${r.stderr}${JSON.stringify(r.error)}`);
  return r.stdout;
}

describe('host attacks: a sandbox cannot steer the host helpers', () => {
  let server: TestServer;
  let canary: string;
  let before_: string;
  const opened: Sandbox[] = [];
  const make = async () => {
    const s = await Sandbox.create({ host: server.url });
    opened.push(s);
    return s;
  };
  const fork = async (s: Sandbox, n = 1) => {
    const kids = await s.fork(n);
    opened.push(...kids);
    return kids;
  };

  /** After every attack: the canary is as it was, and another tenant still creates, execs, forks and diffs. */
  const assertHostIntact = async () => {
    assert.equal(snapshot(canary), before_, 'the canary directory is untouched');
    const other = await within(60_000, 'create', make());
    assert.equal(await within(30_000, 'exec', sh(other, 'print(6 * 7)')), '42\n');
    const [kid] = await within(60_000, 'fork', fork(other));
    await within(30_000, 'diff', other.diff(kid!));
    await Promise.all([kid!.close(), other.close()]);
  };

  before(async () => {
    canary = mkdtempSync(path.join(os.tmpdir(), 'pf-canary-'));
    writeFileSync(path.join(canary, 'secret.txt'), `${CANARY_TEXT}\n`);
    mkdirSync(path.join(canary, 'sub'));
    writeFileSync(path.join(canary, 'sub', 'secret.txt'), `${CANARY_TEXT}-sub\n`);
    before_ = snapshot(canary);
    server = await startTestServer({ poolSize: 1 });
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
    rmSync(canary, { recursive: true, force: true });
  });

  // Class: diff following a sandbox-made symlink in an intermediate component (host files and
  // another tenant's files read through diff).
  it('diff does not follow a symlinked intermediate directory to the host or to another tenant', { timeout: 180_000 }, async () => {
    const victim = await make();
    await sh(victim, 'open("/root/victim.txt", "w").write("VICTIM-SECRET\\n")');
    const victimUpper = path.join(server.stateDir, 'sandboxes', victim.id, 'upper', 'root');
    const parent = await make();
    await sh(parent, 'open("/root/plain.txt", "w").write("one\\n")');
    const [child] = await fork(parent);
    // The child has real files where the parent has symlinks to host directories.
    await sh(parent, `import os\nos.symlink(${JSON.stringify(canary)}, "/root/leak")\nos.symlink(${JSON.stringify(victimUpper)}, "/root/other")`);
    await sh(child!, 'import os\nos.makedirs("/root/leak/sub"); os.makedirs("/root/other")\nfor p in ("/root/leak/secret.txt", "/root/leak/sub/secret.txt", "/root/other/victim.txt"): open(p, "w").write("x\\n")\nopen("/root/plain.txt", "w").write("two\\n")');
    for (const [a, b] of [[parent, child!], [child!, parent]] as const) {
      const d = await within(30_000, 'diff', a.diff(b, { content: true }));
      const text = JSON.stringify(d);
      assert.ok(!text.includes('CANARY-SECRET') && !text.includes('VICTIM-SECRET'), `no host or other tenant's content: ${text.slice(0, 2000)}`);
      assert.ok(d.modified.includes('/root/plain.txt'), 'ordinary files still diff');
      assert.match((d.content as Record<string, string>)['/root/plain.txt']!, /[-+]one\n[-+]two\n|[-+]two\n[-+]one\n/);
    }
    await assertHostIntact();
  });

  // Class: size caps on st_size (procfs reports 0): unbounded reads of kernel files as root.
  it('diff through a path into /proc returns no content and stays bounded', { timeout: 180_000 }, async () => {
    const parent = await make();
    const [child] = await fork(parent);
    await sh(parent, 'import os\nos.symlink("/proc", "/root/p")\nos.symlink("/proc/1/root", "/root/hostroot")');
    await sh(child!, `import os\nos.makedirs("/root/p/self"); os.makedirs("/root/hostroot${canary}")\nfor p in ("/root/p/kallsyms", "/root/p/self/environ", "/root/hostroot${canary}/secret.txt"): open(p, "w").write("x\\n")`);
    // /proc itself (kernel files report st_size 0), then a magic link to the host's root.
    for (const paths of [['/root/p'], ['/root/hostroot']]) {
      const d = await within(30_000, 'diff', parent.diff(child!, { content: true, paths }));
      const text = JSON.stringify(d);
      assert.ok(text.length < 64 * 1024, `a bounded answer (${text.length} bytes)`);
      assert.ok(!/\b[0-9a-f]{16} [TtDdBbRr] /.test(text), 'no kernel symbol comes back');
      assert.ok(!text.includes('CANARY-SECRET'), 'no host file through /proc/1/root');
      for (const body of Object.values(d.content ?? {})) assert.ok(body.length < 1024, `no procfs content: ${body.slice(0, 200)}`);
    }
    await assertHostIntact();
  });

  // Class: an unbounded diff reply (one tenant's huge change set held in the server's memory).
  it('a huge change set gives a bounded diff that says it was cut', { timeout: 300_000 }, async () => {
    const parent = await make();
    const [child] = await fork(parent);
    await sh(child!, 'import os\nos.makedirs("/root/many")\nfor i in range(12000): open(f"/root/many/{i:05d}-" + "n" * 150, "w").write(f"{i}\\n")');
    const d = await within(120_000, 'diff', parent.diff(child!, { content: true }));
    assert.equal(d.truncated, true, 'the answer says it was cut');
    assert.ok(d.added.length + d.removed.length + d.modified.length <= 10_000, `at most 10,000 paths (${d.added.length})`);
    assert.ok(JSON.stringify(d).length < 16 * 1024 * 1024, 'a bounded answer');
    await assertHostIntact();
  });

  // Class: a FIFO (planted, or swapped in for a regular file between the stat and the open)
  // blocking the single host helper: every tenant's diffs and forks would stop.
  it('a FIFO, even one swapped in for a file in a loop, does not hang diff or anyone else', { timeout: 300_000 }, async () => {
    const parent = await make();
    await sh(parent, 'open("/root/f", "w").write("A" * 64)');
    const [child] = await fork(parent);
    await sh(child!, 'import os\nopen("/root/f", "w").write("B" * 64)\nos.mkfifo("/root/plainfifo")');
    await sh(parent, 'open("/root/plainfifo", "w").write("regular here")');
    // The parent's /root/f flips between a regular file of the same size and a FIFO, forever.
    await sh(parent, background('import os\nwhile True:\n    try: os.unlink("/root/f.fifo")\n    except FileNotFoundError: pass\n    os.mkfifo("/root/f.fifo"); os.rename("/root/f.fifo", "/root/f")\n    open("/root/f.reg", "w").write("A" * 64); os.rename("/root/f.reg", "/root/f")'));
    const bystander = await make();
    let stop = false;
    let bystanderRounds = 0;
    const meanwhile = (async () => {
      while (!stop) {
        const [kid] = await within(60_000, 'a bystander fork', bystander.fork(1));
        await within(30_000, 'a bystander diff', bystander.diff(kid!));
        await kid!.close();
        bystanderRounds++;
      }
    })();
    try {
      for (let i = 0; i < 150; i++) {
        const d = await within(30_000, `diff #${i}`, parent.diff(child!, { content: i % 2 === 0 }));
        assert.ok(d.modified.includes('/root/plainfifo'), 'the planted FIFO is reported as changed, never opened');
      }
    } finally {
      stop = true;
      await meanwhile;
    }
    assert.ok(bystanderRounds > 0, 'another sandbox forked and diffed meanwhile');
    await parent.close();
    await assertHostIntact();
  });

  // Class: /.pf (where fork mount points are made, by root, on the host) planted as a symlink to
  // a host directory — before the first fork, and swapped in after one.
  it('a /.pf symlinked to a host directory creates nothing on the host', { timeout: 180_000 }, async (t) => {
    const target = path.join(canary, 'sub');
    const outcomes: string[] = [];
    const refusals: string[] = [];
    const tryFork = async (s: Sandbox) => {
      try {
        const kids = await within(60_000, 'fork', fork(s));
        assert.equal(await sh(kids[0]!, 'print("alive")'), 'alive\n');
        await kids[0]!.close();
        outcomes.push('forked');
      } catch (err) {
        refusals.push((err as Error).message);
        outcomes.push('refused');
      }
    };
    const early = await make(); // planted before its first fork
    await sh(early, `import os, shutil\nos.makedirs(${JSON.stringify(target)}, exist_ok=True)\nshutil.rmtree("/.pf", ignore_errors=True)\ntry: os.unlink("/.pf")\nexcept OSError: pass\nos.symlink(${JSON.stringify(target)}, "/.pf")`);
    await tryFork(early);
    assert.equal(snapshot(canary), before_, 'nothing made through /.pf before the first fork');
    // Swapped in once the first fork has set up /.pf/spawn (sandbox root may unmount that tmpfs).
    const late = await make();
    await fork(late);
    await sh(late, `import ctypes, os, shutil\nassert ctypes.CDLL(None).umount2(b"/.pf/spawn", 2) == 0\nos.makedirs(${JSON.stringify(target)}, exist_ok=True)\nshutil.rmtree("/.pf")\nos.symlink(${JSON.stringify(target)}, "/.pf")`);
    await tryFork(late);
    assert.equal(snapshot(canary), before_, 'nothing made through /.pf after the first fork');
    for (const message of refusals) assert.match(message, /\/\.pf.*not a directory/, 'a refusal says why');
    await assertHostIntact();
    assert.equal(outcomes.length, 2, outcomes.join());
    t.diagnostic(`planted before the first fork: ${outcomes[0]}; after: ${outcomes[1]}`);
  });

  // Class: the fork's freeze (layer copy and squash) walking a live parent's upper by path while
  // a process there exchanges a directory with a symlink to the host (renameat2 RENAME_EXCHANGE).
  // The directory holds the canary's names: a walk redirected mid-way reads, replaces or deletes them.
  it('a directory/symlink exchange race during forks copies, creates and deletes nothing of the host', { timeout: 600_000 }, async () => {
    const race = `import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/root/race/d/sub", exist_ok=True)
for p in ("/root/race/d/secret.txt", "/root/race/d/sub/secret.txt"): open(p, "w").write("sandbox")
if not os.path.lexists("/root/race/l"): os.symlink(${JSON.stringify(canary)}, "/root/race/l")
while True: libc.renameat2(-100, b"/root/race/d", -100, b"/root/race/l", 2)`;
    // A plain freeze (a root sandbox) and a squash (past 4 stacked fork layers).
    let deep = await make();
    for (let i = 0; i < 4; i++) deep = (await fork(deep))[0]!;
    const plain = await make();
    const failed: string[] = [];
    for (const parent of [plain, deep!]) {
      await sh(parent, background(race));
      for (let i = 0; i < 25; i++) {
        let kid: Sandbox | undefined;
        try {
          [kid] = await within(60_000, `fork #${i}`, fork(parent));
        } catch (err) {
          failed.push((err as Error).message); // judged after the canary
        }
        if (kid) {
          const seen = await sh(kid, 'import os\nout = []\nfor top in ("/root/race/d", "/root/race/l"):\n    for dirpath, _, files in os.walk(top):\n        for f in files:\n            try: out.append(open(os.path.join(dirpath, f)).read())\n            except OSError: pass\nprint("CANARY" in "".join(out))');
          assert.equal(seen, 'False\n', `fork #${i}: no canary content in the child`);
          await kid.close();
        }
        assert.equal(snapshot(canary), before_, `fork #${i}: the canary directory is untouched`);
      }
      await parent.close();
    }
    assert.deepEqual(failed, [], 'every fork worked while the parent raced');
    await assertHostIntact();
  });

  // Class: the fork's run directory (bound at /.pf/run in a child) writable by the sandbox while
  // the server later removes it recursively as root.
  it('nothing in a sandbox can write into a fork child\'s run directory', { timeout: 300_000 }, async () => {
    const parent = await make();
    // From the parent, every new process's /.pf/run (the child's, through /proc/<pid>/root, before
    // and after it switches roots) is tried: an O_PATH handle, then a file created through it.
    await sh(parent, background(`import os, time
me = os.getpid(); seen = set()
while True:
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) <= me: continue
        for run in (f"/proc/{name}/root/.pf/run", f"/proc/{name}/root/.pf/spawn/.pf/run"):
            try:
                if not os.path.exists(run + "/agent.sock"): continue
                fd = os.open(run, os.O_PATH | os.O_DIRECTORY)
            except OSError:
                continue
            try:  # still the server's directory (not the child's own /.pf/run once it has unmounted it)
                os.stat("agent.sock", dir_fd=fd)
            except OSError:
                os.close(fd); continue
            key = (name, run)
            if key in seen: os.close(fd); continue
            seen.add(key)
            open("/root/run-reached", "a").write(run + "\\n")
            try:
                os.close(os.open("pwned", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
                os.symlink(${JSON.stringify(canary)}, "link", dir_fd=fd)
                open("/root/run-written", "a").write(run + "\\n")
            except OSError as e:
                open("/root/run-denied", "a").write(f"{run} {e.errno}\\n")
            os.close(fd)`));
    for (let i = 0; i < 20; i++) {
      const [kid] = await within(60_000, `fork #${i}`, fork(parent));
      await kid!.close();
    }
    const report = await sh(parent, 'import os\nfor n in ("run-reached", "run-written", "run-denied"):\n    p = "/root/" + n\n    print(n, len(open(p).read().splitlines()) if os.path.exists(p) else 0)');
    const counts = Object.fromEntries(report.trim().split('\n').map((l) => l.split(' ')).map(([k, v]) => [k, Number(v)]));
    assert.ok(counts['run-reached']! > 0, `the attack reached a run directory at least once: ${report}`);
    assert.equal(counts['run-written'], 0, `no write into a run directory: ${report}`);
    await parent.close();
    await assertHostIntact();
  });

  // Class: recursive removal by path of a directory something can still write (a process that
  // outlived its sandbox): a directory swapped for a symlink mid-walk would delete host files.
  it('removing an ended sandbox\'s directory while a process there swaps a directory for a symlink deletes nothing of the host', { timeout: 300_000 }, async () => {
    const state = mkdtempSync(path.join(os.tmpdir(), 'pf-rm-'));
    const hostd = new HostHelper({ log: createLogger('silent') });
    try {
      mkdirSync(trashDir(state), { recursive: true });
      for (let i = 0; i < 40; i++) {
        const dirs = sandboxDirs(state, `sbx_${String(i).padStart(32, '0')}`);
        const race = path.join(dirs.upper, 'root', 'race');
        mkdirSync(path.join(race, 'd', 'sub'), { recursive: true });
        writeFileSync(path.join(race, 'd', 'secret.txt'), 'sandbox');
        writeFileSync(path.join(race, 'd', 'sub', 'secret.txt'), 'sandbox');
        symlinkSync(canary, path.join(race, 'l'));
        // The racer holds the directory by fd: it goes on wherever the tree is moved (the trash).
        const racer = spawn('python3', ['-c', `import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(${JSON.stringify(race)}, os.O_RDONLY | os.O_DIRECTORY)
print("go", flush=True)
while True: libc.renameat2(fd, b"d", fd, b"l", 2)`], { stdio: ['ignore', 'pipe', 'inherit'] });
        await new Promise((resolve) => racer.stdout!.once('data', resolve));
        const trash = new Trash(trashDir(state), (tree) => hostd.removeTree(tree));
        await trash.throwAway(dirs);
        await trash.close().catch(() => undefined);
        racer.kill('SIGKILL');
        await new Promise((resolve) => racer.once('exit', resolve));
        assert.equal(snapshot(canary), before_, `removal #${i}: the canary directory is untouched`);
        assert.equal(existsSync(dirs.dir), false);
      }
      assert.deepEqual(readdirSync(trashDir(state)), [], 'everything removed');
    } finally {
      hostd.close();
      rmSync(state, { recursive: true, force: true });
    }
  });

  it('leaves nothing behind once everything is closed', { timeout: 120_000 }, async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    opened.length = 0;
    await server.close();
    assert.deepEqual(processesMentioning(server.stateDir), []);
    assert.deepEqual(overlayMountsUnder(server.stateDir), []);
    assert.deepEqual(sandboxDirsIn(server.stateDir), []);
    assert.equal(snapshot(canary), before_, 'the canary directory is untouched');
  });
});
