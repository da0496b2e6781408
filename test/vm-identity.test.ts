/**
 * One identity per VM (issue #26), through the real server and QEMU (TCG: one template boot,
 * shared by every test here). What an escaped QEMU (its uid) or another local user could reach:
 * - each VM's QEMU runs as a uid of its own (never root, apart from the namespace sandboxes'),
 *   and one VM's uid cannot read the other's disk, RAM or sockets;
 * - VM files (overlays, RAM files, templates, frozen VMs), the volume `disk.img` and the database
 *   are not readable by another local user (`nobody`), by mode and by trying;
 * - a symlink planted where a VM's QEMU uid can plant one (every directory under the state
 *   directory that uid owns, and the directories the next operation will use, made the uid's as
 *   an older server did) is not followed by the server during freeze, resume or fork: the canary
 *   files it points at are neither written nor read.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chownSync, closeSync, existsSync, openSync, readSync, readlinkSync, lchownSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync,
  symlinkSync, utimesSync, writeFileSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

const run = promisify(execFile);

/** Host pid of the QEMU running a sandbox (its directory, named by the id, is on its command line). */
function qemuPidOf(id: string): number | undefined {
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (path.basename(cmd.slice(0, cmd.indexOf('\0'))) === 'qemu-system-x86_64' && cmd.includes(`/vm/${id}/`)) return Number(pid);
    } catch { /* gone */ }
  }
  return undefined;
}

/** Who a process runs as: real, effective, saved and fs ids, and its supplementary groups. */
function idsOf(pid: number): { uids: number[]; gids: number[]; groups: number[] } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => (new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(status)?.[1] ?? '').trim().split(/\s+/).filter(Boolean).map(Number);
  return { uids: field('Uid'), gids: field('Gid'), groups: field('Groups') };
}

/**
 * What a QEMU that got out of its guest would try, as its uid and groups, against the shared RAM
 * other VMs map: every path given (a RAM file, another process's fd by /proc) opened read-write,
 * then write(), a shared writable mapping, resizing and a punched hole. Prints one JSON object:
 * for each path, each way and whether it went through ("ok") or how it was refused.
 */
const WRITE_ATTACK = String.raw`
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
def punch(fd):
    if libc.fallocate(fd, 3, 0, 4096) != 0:  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
def shared_map(fd):
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:8] = b"ESCAPED!"
    m.close()
ways = {
    "write": lambda fd: os.pwrite(fd, b"ESCAPED!", 4096),
    "mmap_shared": shared_map,
    # Grown, not shrunk: shrinking would kill every VM mapping it (SIGBUS), not just change it.
    "truncate": lambda fd: os.ftruncate(fd, os.fstat(fd).st_size + 4096),
    "punch_hole": punch,
}
out = {}
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        out[path] = {"open": e.strerror}
        continue
    r = {"open": "ok"}
    for name, way in ways.items():
        try:
            way(fd)
            r[name] = "ok"
        except OSError as e:
            r[name] = e.strerror
    os.close(fd)
    out[path] = r
print(json.dumps(out))
`;

/** Runs WRITE_ATTACK as `who` against `paths`: for each path, the ways that went through. */
async function writeAttack(who: string[], paths: string[]): Promise<Record<string, Record<string, string>>> {
  const { stdout } = await run(who[0]!, [...who.slice(1), '/usr/bin/python3', '-c', WRITE_ATTACK, ...paths]);
  return JSON.parse(stdout) as Record<string, Record<string, string>>;
}

/** What a QEMU maps as its guest RAM (a /dev/shm file, or a memfd: `/memfd:<name> (deleted)`), from its maps. */
function ramNameOf(qemuPid: number): string {
  const m = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s+(\/(?:dev\/shm|memfd:)\S*podflare-\S+\.ram(?: \(deleted\))?)$/m.exec(readFileSync(`/proc/${qemuPid}/maps`, 'utf8'));
  assert.ok(m, `QEMU ${qemuPid} maps no guest RAM of the server's`);
  return m[1]!;
}

/**
 * Every path to the guest RAM a QEMU maps: its file (if it has a name), and every (pid, fd) through
 * which a process holds it.
 */
function sharedRamPaths(qemuPid: number): { name: string; paths: string[] } {
  const name = ramNameOf(qemuPid);
  const paths: string[] = name.startsWith('/dev/shm/') && !name.endsWith(' (deleted)') ? [name] : [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    let fds: string[] = [];
    try { fds = readdirSync(`/proc/${pid}/fd`); } catch { continue; }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) === name) paths.push(`/proc/${pid}/fd/${fd}`);
      } catch { /* closed meanwhile */ }
    }
  }
  return { name, paths };
}

/** sha256 of the first `bytes` of a file (root reads it). */
function hashOf(file: string, bytes: number): string {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.alloc(bytes);
    let off = 0;
    while (off < bytes) {
      const n = readSync(fd, buf, off, bytes - off, off);
      if (n === 0) break;
      off += n;
    }
    return createHash('sha256').update(buf.subarray(0, off)).digest('hex');
  } finally {
    closeSync(fd);
  }
}

/**
 * As the QEMU of `attacker` (its uid and groups), every way to write the shared RAM `victim`'s QEMU
 * maps (through the victim's fd, its own, the server's, any RAM file on /dev/shm): all refused,
 * and its first 64 MB (the attack writes at 0 and 4096) unchanged.
 */
async function assertSharedRamUnwritable(stateDir: string, attackerPid: number, victimPid: number, what: string): Promise<void> {
  const { name, paths } = sharedRamPaths(victimPid);
  assert.equal(ramNameOf(attackerPid), name, `${what}: the two VMs do not map the same RAM`);
  const own = paths.find((p) => p.startsWith(`/proc/${attackerPid}/`));
  const readable = paths.find((p) => p.startsWith(`/proc/${victimPid}/`)) ?? paths[0]!;
  // This server's RAM files (named after its state directory; other servers on the machine have their own).
  const prefix = `podflare-${createHash('sha256').update(path.resolve(stateDir)).digest('hex').slice(0, 10)}-`;
  const files = readdirSync('/dev/shm').filter((n) => n.startsWith(prefix)).map((n) => path.join('/dev/shm', n));
  const before = hashOf(readable, 64 * 1024 * 1024);
  const tried = await writeAttack(asIdentity(idsOf(attackerPid)), [...new Set([...paths, ...files])]);
  for (const [p, r] of Object.entries(tried)) {
    for (const [way, result] of Object.entries(r)) {
      if (way !== 'open') assert.notEqual(result, 'ok', `${what}: ${way} through ${p} went through (${JSON.stringify(r)})`);
    }
  }
  // Its own fd at least opens (QEMU reopens it read-write): the refusals above are the seal's.
  if (own) assert.equal(tried[own]?.open, 'ok', `${what}: ${JSON.stringify(tried)}`);
  assert.equal(hashOf(readable, 64 * 1024 * 1024), before, `${what}: the shared RAM changed`);
}

/** The RAM file a VM's QEMU maps (/dev/shm), by the name it was mapped under. */
function ramFileOf(pid: number): string {
  const m = /(\/dev\/shm\/podflare-\S+\.ram)/.exec(readFileSync(`/proc/${pid}/maps`, 'utf8'));
  assert.ok(m, `QEMU ${pid} maps no RAM file on /dev/shm`);
  return m[1]!;
}

/** Tries to read `file` as another identity; resolves with what happened. */
async function readAs(who: string[], file: string): Promise<{ ok: boolean; stderr: string }> {
  try {
    await run(who[0]!, [...who.slice(1), 'head', '-c', '1', file]);
    return { ok: true, stderr: '' };
  } catch (err) {
    return { ok: false, stderr: String((err as { stderr?: string }).stderr ?? err) };
  }
}

const asNobody = ['runuser', '-u', 'nobody', '--'];
const asIdentity = (ids: { uids: number[]; gids: number[]; groups: number[] }) => [
  'setpriv', `--reuid=${ids.uids[0]}`, `--regid=${ids.gids[0]}`, ids.groups.length ? `--groups=${ids.groups.join(',')}` : '--clear-groups', '--',
];

async function assertUnreadable(who: string[], file: string, what: string): Promise<void> {
  assert.ok(existsSync(file), `${what} (${file}) exists`);
  const r = await readAs(who, file);
  assert.equal(r.ok, false, `${what} (${file}) was readable by ${who.join(' ')}`);
  assert.match(r.stderr, /Permission denied/, `${what}: ${r.stderr}`);
}

/** No access at all for others, and none for the group either unless `groupMay` (bits) allows. */
function assertPrivate(file: string, what: string, owner: { uid?: number; gid?: number }, groupMay = 0): void {
  const st = lstatSync(file);
  const mode = st.mode & 0o777;
  assert.equal(mode & 0o007, 0, `${what} (${file}) is ${mode.toString(8)}: others have access`);
  assert.equal(mode & 0o070 & ~groupMay, 0, `${what} (${file}) is ${mode.toString(8)}: its group has more than ${groupMay.toString(8)}`);
  if (owner.uid !== undefined) assert.equal(st.uid, owner.uid, `${what} (${file}) belongs to uid ${st.uid}`);
  if (owner.gid !== undefined) assert.equal(st.gid, owner.gid, `${what} (${file}) belongs to gid ${st.gid}`);
}

/**
 * Two canaries in the test's own directory: `read` is what planted links read from, `written` what
 * they write to. Their bytes, mtime and atime are remembered (atime set in the past: any read of
 * them moves it, relatime or not).
 */
function canaries(dir: string) {
  const files = { read: path.join(dir, 'read-canary'), written: path.join(dir, 'write-canary') };
  const past = new Date(Date.now() - 3 * 86_400_000);
  const content = (f: string) => `canary ${path.basename(f)}\n`;
  for (const f of Object.values(files)) {
    writeFileSync(f, content(f), { mode: 0o644 });
    utimesSync(f, past, past);
  }
  // Never read here before the check: a read moves the atime (it is older than the ctime).
  const before = Object.fromEntries(Object.entries(files).map(([k, f]) => [k, times(f)]));
  return {
    ...files,
    assertUntouched(when: string) {
      for (const [k, f] of Object.entries(files)) {
        const now = times(f);
        assert.equal(now.mtimeMs, before[k]!.mtimeMs, `${when}: the server wrote the ${k} canary through a planted link`);
        assert.equal(now.atimeMs, before[k]!.atimeMs, `${when}: the server read the ${k} canary through a planted link`);
        assert.equal(readFileSync(f, 'utf8'), content(f), `${when}: the server wrote the ${k} canary through a planted link`);
      }
    },
  };
}

function times(f: string): { atimeMs: number; mtimeMs: number } {
  const st = statSync(f);
  return { atimeMs: st.atimeMs, mtimeMs: st.mtimeMs };
}

/** Names the VM runtime uses for its files: what a QEMU would plant links as. */
const PLANTED_NAMES = ['disk.qcow2', 'state', 'vm.json', 'console.log', 'frozen.qcow2'];

/** Every directory under `top` (not following links) that `uid` owns. */
function dirsOwnedBy(top: string, uid: number): string[] {
  const out: string[] = [];
  const walk = (dir: string) => {
    let st;
    try { st = lstatSync(dir); } catch { return; }
    if (!st.isDirectory()) return;
    if (st.uid === uid) out.push(dir);
    for (const name of readdirSync(dir)) walk(path.join(dir, name));
  };
  walk(top);
  return out;
}

/**
 * Plants links named like the runtime's files, owned by `uid`, in `dir`, pointing at `target`: a
 * regular file of that name is moved aside (its QEMU keeps it open), anything else is left.
 */
function plant(dir: string, uid: number, target: string, names = PLANTED_NAMES): void {
  for (const name of names) {
    const p = path.join(dir, name);
    let st;
    try { st = lstatSync(p); } catch { st = null; }
    if (st && !st.isFile()) continue;
    if (st) renameSync(p, `${p}.aside`);
    symlinkSync(target, p);
    lchownSync(p, uid, uid);
  }
}

/** A directory made the uid's (as an older server handed it to QEMU), with links planted. */
function plantedDir(dir: string, uid: number, target: string, names = PLANTED_NAMES): void {
  mkdirSync(dir, { recursive: true });
  chownSync(dir, uid, uid);
  plant(dir, uid, target, names);
}

describe('vm identity', { timeout: 900_000 }, () => {
  let server!: TestServer;
  let a!: Sandbox;
  let b!: Sandbox;
  let scratch!: string;

  before(async () => {
    scratch = mkdtempSync(path.join(os.tmpdir(), 'pf-canary-'));
    server = await startTestServer({ poolSize: 0 });
    a = await Sandbox.create({ host: server.url, runtime: 'vm', persistent: true }); // boots and freezes the template
    b = await Sandbox.create({ host: server.url, runtime: 'vm' });
  });

  after(async () => {
    await a?.close().catch(() => undefined);
    await b?.close().catch(() => undefined);
    await server?.stop();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  it("runs each VM's QEMU as a uid of its own, neither root nor a sandbox's, that cannot read the other VM's files", async () => {
    const [pa, pb] = [qemuPidOf(a.id), qemuPidOf(b.id)];
    assert.ok(pa && pb, 'both VMs have a QEMU');
    const [ia, ib] = [idsOf(pa), idsOf(pb)];
    for (const [name, ids] of [['a', ia], ['b', ib]] as const) {
      assert.equal(new Set(ids.uids).size, 1, `${name}'s QEMU has one uid (real, effective, saved, fs): ${ids.uids}`);
      assert.equal(new Set(ids.gids).size, 1, `${name}'s QEMU has one gid: ${ids.gids}`);
      assert.notEqual(ids.uids[0], 0, `${name}'s QEMU runs as root`);
      assert.ok(!ids.groups.includes(0), `${name}'s QEMU has root's group`);
      const base = server.config.sandboxUidBase;
      assert.ok(ids.uids[0]! < base || ids.uids[0]! >= base + 65_536, `${name}'s QEMU uid ${ids.uids[0]} is a namespace sandbox's`);
    }
    assert.notEqual(ia.uids[0], ib.uids[0], 'the two VMs run as the same uid');
    assert.notEqual(ia.gids[0], ib.gids[0], 'the two VMs run as the same gid');

    for (const [id, ids, other, otherIds] of [[a.id, ia, b.id, ib], [b.id, ib, a.id, ia]] as const) {
      const dir = path.join(server.stateDir, 'vm', id);
      // Its directory: no way in for the other VM's uid (nor anyone else's).
      assertPrivate(dir, `${id}'s directory`, {}, 0o050);
      assert.notEqual(statSync(dir).gid, otherIds.gids[0]);
      assertPrivate(path.join(dir, 'disk.qcow2'), `${id}'s overlay`, { uid: ids.uids[0], gid: ids.gids[0] });
      for (const f of readdirSync(dir)) {
        const st = lstatSync(path.join(dir, f));
        if (st.uid === ids.uids[0]) assertPrivate(path.join(dir, f), `${id}'s ${f}`, {});
      }
      // The RAM it maps copy-on-write: the template's, no file anybody could open by name.
      assert.match(readFileSync(`/proc/${ids === ia ? pa : pb}/maps`, 'utf8'), /^[0-9a-f]+-[0-9a-f]+ rw-p .* \/memfd:podflare-\S+-t[0-9a-f]+\.ram \(deleted\)$/m,
        `${id} does not map the template's RAM copy-on-write`);
      // As the other VM's QEMU (its uid and groups): its overlay and sockets are out of reach.
      await assertUnreadable(asIdentity(otherIds), path.join(dir, 'disk.qcow2'), `${id}'s overlay, as ${other}'s QEMU`);
      await assertUnreadable(asIdentity(otherIds), path.join(dir, 'console.log'), `${id}'s console log, as ${other}'s QEMU`);
    }
    // Both still work.
    assert.equal((await a.runCode('6*7')).results[0]?.text, '42');
    assert.equal((await b.runCode('6*7')).results[0]?.text, '42');
  });

  it("lets no QEMU write the RAM other VMs map: the template's, a fork point's", async () => {
    const [pa, pb] = [qemuPidOf(a.id)!, qemuPidOf(b.id)!];
    // The template's RAM, as b's QEMU, which maps it too (and as a, the other way round).
    await assertSharedRamUnwritable(server.stateDir, pb, pa, "the template's RAM, as a clone's QEMU");
    await assertSharedRamUnwritable(server.stateDir, pa, pb, "the template's RAM, as another clone's QEMU");
    assert.equal((await a.runCode('6*7')).results[0]?.text, '42');
    // A new clone still starts from it, and a fork by copy still works.
    const c = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const kids: Sandbox[] = [];
    try {
      assert.equal((await c.runCode('6*7')).results[0]?.text, '42');
      // A fork point's RAM (a fork by migration: more written than a fork copies), mapped by two
      // siblings: neither can write what the other maps.
      const made = await c.runCode('import hashlib\nbig = bytes(range(256)) * (96 * 4096)\nhashlib.sha256(big).hexdigest()');
      const digest = made.results[0]?.text;
      assert.match(digest ?? '', /^'[0-9a-f]{64}'$/, made.stderr);
      kids.push(...(await c.fork(2)));
      const [k0, k1] = [qemuPidOf(kids[0]!.id)!, qemuPidOf(kids[1]!.id)!];
      assert.match(ramNameOf(k0), /-p[0-9a-f]+\.ram \(deleted\)$/, "the children do not map a fork point's RAM");
      await assertSharedRamUnwritable(server.stateDir, k0, k1, "a fork point's RAM, as a sibling's QEMU");
      for (const kid of kids) assert.equal((await kid.runCode('hashlib.sha256(big).hexdigest()')).results[0]?.text, digest);
      assert.equal((await c.runCode('hashlib.sha256(big).hexdigest()')).results[0]?.text, digest);
    } finally {
      await Promise.all([...kids, c].map((s) => s.close()));
    }
  });

  it('keeps VM files, frozen VMs, the volume and the database from other local users', async () => {
    const files: Array<[string, string]> = [
      [path.join(server.stateDir, 'vm', a.id, 'disk.qcow2'), "a VM's overlay"],
      [path.join(server.stateDir, 'podflare.db'), 'the database'],
    ];
    for (const t of readdirSync(path.join(server.stateDir, 'vm', 'templates'))) {
      files.push([path.join(server.stateDir, 'vm', 'templates', t, 'disk.qcow2'), "a template's disk"]);
      files.push([path.join(server.stateDir, 'vm', 'templates', t, 'state'), "a template's state"]);
    }
    if (existsSync(path.join(server.stateDir, 'disk.img'))) files.push([path.join(server.stateDir, 'disk.img'), "the sandboxes' volume"]);
    for (const suffix of ['-wal', '-shm']) {
      const f = path.join(server.stateDir, `podflare.db${suffix}`);
      if (existsSync(f)) files.push([f, `the database's ${suffix} file`]);
    }
    for (const [file, what] of files) {
      assert.equal(statSync(file).mode & 0o004, 0, `${what} (${file}) is readable by others: ${(statSync(file).mode & 0o777).toString(8)}`);
      await assertUnreadable(asNobody, file, what);
    }
    // The database and the volume: root's alone.
    assertPrivate(path.join(server.stateDir, 'podflare.db'), 'the database', { uid: 0 });
    if (existsSync(path.join(server.stateDir, 'disk.img'))) assertPrivate(path.join(server.stateDir, 'disk.img'), "the sandboxes' volume", { uid: 0 });
    // The state directory: others may pass through, not list it.
    assert.equal(statSync(server.stateDir).mode & 0o006, 0, 'the state directory is readable or writable by others');

    // A frozen VM: root's alone.
    await a.runCode('kept = "still here"');
    await a.freeze();
    const frozen = path.join(server.stateDir, 'frozen', a.id);
    assertPrivate(frozen, "a frozen VM's directory", { uid: 0 });
    for (const f of readdirSync(frozen)) {
      assertPrivate(path.join(frozen, f), `a frozen VM's ${f}`, { uid: 0 });
      await assertUnreadable(asNobody, path.join(frozen, f), `a frozen VM's ${f}`);
    }
    assert.equal((await a.runCode('kept')).results[0]?.text, "'still here'");
    // A resumed VM's RAM file is its own.
    const resumed = qemuPidOf(a.id)!;
    assertPrivate(ramFileOf(resumed), "a resumed VM's RAM file", { uid: idsOf(resumed).uids[0] });
  });

  it('does not follow a symlink planted in a VM\'s directories during freeze, resume or fork', async () => {
    // Freeze: links in every directory a's QEMU uid owns, and in its frozen directory-to-be,
    // made that uid's as an older server did while QEMU wrote the state there.
    await a.runCode('kept = "still here"');
    const qemu = qemuPidOf(a.id)!;
    const uid = idsOf(qemu).uids[0]!;
    const onFreeze = canaries(mkdtempSync(path.join(scratch, 'freeze-')));
    // (Its disk stays: an older server's QEMU reopens it by name to end the migration.)
    for (const dir of dirsOwnedBy(path.join(server.stateDir, 'vm', a.id), uid)) plant(dir, uid, onFreeze.read, PLANTED_NAMES.filter((n) => n !== 'disk.qcow2'));
    // (Not `state`: an older server's QEMU wrote that one itself, as its own uid.)
    plantedDir(path.join(server.stateDir, 'frozen', a.id), uid, onFreeze.written, ['disk.qcow2', 'vm.json']);
    const froze = await a.freeze().then(() => null, (err: Error) => err);
    onFreeze.assertUntouched('freeze');
    assert.equal(froze, null, `the freeze failed: ${froze?.message}`);

    // Resume: the resumed VM's directory-to-be, made the last QEMU's uid's, with links in it.
    const onResume = canaries(mkdtempSync(path.join(scratch, 'resume-')));
    plantedDir(path.join(server.stateDir, 'vm', a.id), uid, onResume.written);
    const resumed = await a.runCode('kept').then((r) => r, (err: Error) => err);
    onResume.assertUntouched('resume');
    assert.ok(!(resumed instanceof Error), `the resume failed: ${(resumed as Error).message}`);
    assert.equal(resumed.results[0]?.text, "'still here'");

    // Fork: links in every directory the parent's QEMU uid owns.
    await b.runCode('x = 7');
    const parentUid = idsOf(qemuPidOf(b.id)!).uids[0]!;
    const onFork = canaries(mkdtempSync(path.join(scratch, 'fork-')));
    for (const dir of dirsOwnedBy(path.join(server.stateDir, 'vm', b.id), parentUid)) plant(dir, parentUid, onFork.read);
    const kids = await b.fork(1).then((k) => k, (err: Error) => err);
    onFork.assertUntouched('fork');
    assert.ok(!(kids instanceof Error), `the fork failed: ${(kids as Error).message}`);
    try {
      assert.equal((await kids[0]!.runCode('x * 6')).results[0]?.text, '42');
      // The child runs as a uid of its own, and the fork point's files are its group's alone.
      const child = idsOf(qemuPidOf(kids[0]!.id)!);
      assert.notEqual(child.uids[0], parentUid);
      assert.notEqual(child.uids[0], 0);
      for (const f of readdirSync(path.join(server.stateDir, 'vm', 'layers')).filter((n) => n.endsWith('.qcow2') && !n.endsWith('.top.qcow2'))) {
        const layer = path.join(server.stateDir, 'vm', 'layers', f);
        assertPrivate(layer, 'a fork layer', { uid: 0 }, 0o040);
        assert.ok(child.groups.includes(statSync(layer).gid), "the fork layer's group is the child's");
        await assertUnreadable(asNobody, layer, 'a fork layer');
        await assertUnreadable(asIdentity(idsOf(qemuPidOf(a.id)!)), layer, "a fork layer, as another tenant's QEMU");
      }
    } finally {
      await Promise.all(kids.map((k) => k.close()));
    }
  });
});
