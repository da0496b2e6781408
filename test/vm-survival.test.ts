/**
 * A server restart loses no live VM sandbox (#20, item 6): `podflare serve` as a child process,
 * a VM sandbox holding a variable and an open file, and a fork child of it; the server is killed
 * with SIGKILL (and later its whole process group gets SIGTERM), with `--on-stop keep`, and started again on the same state
 * directory → both VMs answer with their state (the very same QEMUs), lineage intact, none lost,
 * and a fork of an adopted VM works. With `--on-stop destroy` a server killed takes its VMs along
 * (adopted ones too); stopped, nothing is left: no QEMU, no socket, no file, no VM id. Nothing but root can reach the sockets that drive an adopted VM.
 *
 * TCG boots take seconds: the one template boot of the first server serves every VM here (the
 * later servers fork adopted VMs, which needs no template).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { AGENT_PROTOCOL_MINOR, AGENT_PROTOCOL_VERSION } from '@podflare/protocol';
import { overlayMountsUnder, processesMentioning } from './helpers/leaks.js';
import { startServe, type ServeProcess } from './helpers/serve.js';

const SANDBOX_UID = 100_000; // the default sandboxUidBase: root inside every namespace sandbox
const VM_ID_LOCKS = '/run/podflare-vm-ids';

/** Every sandbox QEMU of the state directory, by sandbox id. */
function qemus(stateDir: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      const m = new RegExp(`${stateDir}/vm/(sbx_[0-9a-f]+)/`).exec(cmd);
      if (path.basename(cmd.slice(0, cmd.indexOf('\0'))) === 'qemu-system-x86_64' && m) out.set(m[1]!, Number(pid));
    } catch { /* gone */ }
  }
  return out;
}

async function until<T>(what: string, timeoutMs: number, probe: () => T | undefined): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function uidOf(pid: number): number {
  return Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

/** What `uid` gets trying to connect to `socket` and drive it: 'refused <errno>', or what happened. */
function tryConnectAs(uid: number, socket: string): string {
  return execFileSync('setpriv', ['--reuid', String(uid), '--regid', String(uid), '--clear-groups', '/usr/bin/python3', '-c', [
    'import socket, sys',
    's = socket.socket(socket.AF_UNIX)',
    'try:',
    `    s.connect(${JSON.stringify(socket)})`,
    'except OSError as e:',
    '    print("refused", e.errno); sys.exit(0)',
    'print("connected")',
  ].join('\n')], { encoding: 'utf8' }).trim();
}

async function lost(serve: ServeProcess): Promise<Array<{ id: string; state: string; parent: string | null }>> {
  const res = await fetch(`${serve.url}/v1/sandboxes?state=lost`);
  return (await res.json() as { sandboxes: Array<{ id: string; state: string; parent: string | null }> }).sandboxes;
}

describe('VM sandboxes survive a server restart', () => {
  let stateDir: string;
  let serve: ServeProcess | undefined;
  let parent = '';
  let child = '';
  const pids = new Map<string, number>();

  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-vmsurv-'));
    chmodSync(stateDir, 0o711);
  });
  after(async () => {
    // Whatever a failed test left: a destroying server takes it over and ends it.
    await serve?.kill9();
    const last = await startServe(stateDir, { poolSize: 0 });
    await last.stop().catch(() => last.kill9());
    for (const m of overlayMountsUnder(stateDir).reverse()) {
      try { execFileSync('umount', ['-l', m]); } catch { /* gone */ }
    }
    await rm(stateDir, { recursive: true, force: true });
  });

  it('kill -9: a VM with a variable and a file, and its fork child, answer the next server with their state', { timeout: 600_000 }, async () => {
    serve = await startServe(stateDir, { poolSize: 1, onStop: 'keep' });
    parent = await serve.create({ runtime: 'vm' });
    assert.equal(await serve.run(parent, [
      'held = "kept"',
      'f = open("/tmp/held.txt", "w+"); f.write("file-kept"); f.flush()',
      'lineage = ["parent"]',
      'print("ok")',
    ].join('\n')), 'ok\n');
    [child] = await serve.fork(parent, 1) as [string];
    await serve.run(child, 'lineage.append("child")');
    for (const [id, pid] of qemus(stateDir)) if (id === parent || id === child) pids.set(id, pid);
    assert.ok(pids.has(parent) && pids.has(child), 'both VMs have a QEMU');
    // The warm pool's VMs (no sandbox yet) are not adopted: the next server ends them.
    const pooled = await until('the warm pool holds a VM', 120_000, () => {
      const others = [...qemus(stateDir)].filter(([id]) => id !== parent && id !== child);
      return others.length ? others : undefined;
    });

    await serve.kill9();
    // The VMs' QEMUs live on without any server.
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(qemus(stateDir).get(parent), pids.get(parent), "the parent's QEMU outlived the server");
    assert.equal(qemus(stateDir).get(child), pids.get(child), "the child's QEMU outlived the server");

    serve = await startServe(stateDir, { poolSize: 1, onStop: 'keep' });
    assert.equal((await serve.info(parent)).state, 'ready');
    assert.equal((await serve.info(child)).state, 'ready');
    assert.equal(await serve.run(parent, 'f.seek(0); print(held, f.read(), lineage)'), "kept file-kept ['parent']\n");
    assert.equal(await serve.run(child, 'f.seek(0); print(held, f.read(), lineage)'), "kept file-kept ['parent', 'child']\n");
    // The same QEMUs, not new ones; the pooled VMs of the killed server are gone.
    assert.equal(qemus(stateDir).get(parent), pids.get(parent));
    assert.equal(qemus(stateDir).get(child), pids.get(child));
    const now = qemus(stateDir);
    assert.deepEqual(pooled.filter(([id, pid]) => now.get(id) === pid), [], "the killed server's pooled VMs did not leak");
    assert.deepEqual((await lost(serve)).map((s) => s.id), [], 'none lost');
    const childInfo = await serve.info(child) as unknown as { parent: string };
    assert.equal(childInfo.parent, parent, 'lineage intact');
    const parentInfo = await serve.info(parent) as unknown as { children: string[] };
    assert.deepEqual(parentInfo.children, [child]);
    // A fork of an adopted VM (its fork layer and ids were taken over) works, and so does the grandchild.
    const [grandchild] = await serve.fork(child, 1);
    assert.equal(await serve.run(grandchild!, 'lineage.append("grandchild"); print(held, lineage)'), "kept ['parent', 'child', 'grandchild']\n");
    await serve.destroy(grandchild!);
  });

  it("nothing but root can connect to an adopted VM's agent and QMP sockets", async () => {
    assert.ok(serve, 'the previous test left a server');
    const held = path.join(stateDir, 'vm-held');
    for (const kind of ['agent', 'qmp']) {
      const socket = path.join(held, `${parent}.${kind}.sock`);
      assert.ok(existsSync(socket), `${socket} exists`);
      // A namespace sandbox's uid, and another VM's own uid (what a QEMU escape would be).
      assert.equal(tryConnectAs(SANDBOX_UID, socket), 'refused 13');
      assert.equal(tryConnectAs(uidOf(pids.get(child)!), socket), 'refused 13');
    }
    // Its record (uids, lineage, template) is root's alone too.
    assert.equal(tryConnectAs(SANDBOX_UID, path.join(held, `${parent}.json`)), 'refused 13');
  });

  it('a stop that keeps the VMs (--on-stop keep) and an upgrade (another minor: adopted; another major: refused or cleaned); a destroying stop leaves nothing', { timeout: 600_000 }, async () => {
    assert.ok(serve, 'the first test left a server');
    await serve.kill9();
    // SIGTERM to the server's whole process group (Ctrl-C, systemd, `timeout`): QEMU is not in it.
    serve = await startServe(stateDir, { poolSize: 1, onStop: 'keep', detached: true });
    assert.equal(await serve.run(parent, 'held += "-again"; print(held)'), 'kept-again\n');
    process.kill(-serve.pid, 'SIGTERM');
    assert.equal(await serve.exited, 0, `a clean stop: ${serve.stderr()}`);
    assert.doesNotMatch(serve.stderr(), /EPIPE|Traceback|Unhandled/);
    assert.equal(qemus(stateDir).get(parent), pids.get(parent), 'SIGTERM with keep left the QEMU running');
    assert.equal(qemus(stateDir).get(child), pids.get(child), 'SIGTERM with keep left the QEMU running');

    serve = await startServe(stateDir, { poolSize: 1, onStop: 'keep' });
    assert.equal(await serve.run(parent, 'print(held)'), 'kept-again\n');
    assert.equal(await serve.run(child, 'print(lineage)'), "['parent', 'child']\n");
    const qemuPids = [...pids.values()].map(String);
    const uids = [...pids.values()].map(uidOf);

    // An upgrade: the child as if started by a build of another minor agent protocol (adopted),
    // the parent by one of another major (refused, or cleaned: the default).
    await serve.kill9();
    const stamp = (id: string, version: string) => {
      const file = path.join(stateDir, 'vm-held', `${id}.json`);
      const record = JSON.parse(readFileSync(file, 'utf8')) as { agentProtocol: string };
      assert.equal(record.agentProtocol, `${AGENT_PROTOCOL_VERSION}.${AGENT_PROTOCOL_MINOR}`);
      writeFileSync(file, JSON.stringify({ ...record, agentProtocol: version }));
    };
    stamp(child, `${AGENT_PROTOCOL_VERSION}.${AGENT_PROTOCOL_MINOR + 1}`);
    stamp(parent, `${AGENT_PROTOCOL_VERSION + 1}.0`);
    const refused = await startServe(stateDir, { poolSize: 0, env: { PODFLARE_ON_INCOMPATIBLE: 'refuse' } }).then(
      async (s) => { await s.stop(); return 'started'; }, (err: Error) => err.message);
    assert.match(refused, new RegExp(`${parent} \\(agent protocol ${AGENT_PROTOCOL_VERSION + 1}\\.0\\)`));
    assert.match(refused, /--on-incompatible clean/);
    assert.equal(qemus(stateDir).get(parent), pids.get(parent), 'the incompatible VM still runs');
    serve = await startServe(stateDir, { poolSize: 1 });
    assert.equal(await serve.run(child, 'print(lineage)'), "['parent', 'child']\n");
    assert.equal((await serve.info(parent)).state, 'lost');
    assert.equal(qemus(stateDir).has(parent), false, "the incompatible VM's QEMU was ended");

    // --on-stop destroy (the tests' default): a server that dies without a stop takes its VMs
    // along, the one it adopted included; the next one records it lost.
    await serve.kill9();
    await until("the adopted VM's end", 30_000, () => (qemus(stateDir).has(child) ? undefined : true));
    serve = await startServe(stateDir, { poolSize: 1 });
    assert.equal((await serve.info(child)).state, 'lost');

    // Its stop leaves nothing of any VM (a live VM ending at a destroying stop is vm.test.ts's).
    await serve.stop();
    serve = undefined;
    assert.deepEqual([...qemus(stateDir).keys()], [], 'no QEMU left');
    assert.deepEqual(processesMentioning(stateDir), []);
    assert.deepEqual(existsSync(path.join(stateDir, 'vm-held')) ? readdirSync(path.join(stateDir, 'vm-held')) : [], [], 'no socket, no record');
    assert.equal(existsSync(path.join(stateDir, 'vm')), false, 'no VM file');
    const prefix = `podflare-${execFileSync('sh', ['-c', `printf %s "${path.resolve(stateDir)}" | sha256sum`], { encoding: 'utf8' }).slice(0, 10)}-`;
    assert.deepEqual(readdirSync('/dev/shm').filter((n) => n.startsWith(prefix)), [], 'no RAM file');
    // Their uids were given back (another server on the machine may have taken one since: its lock then names none of ours).
    for (const uid of uids) {
      const lock = path.join(VM_ID_LOCKS, String(uid));
      const holders = existsSync(lock) ? readFileSync(lock, 'utf8').split('\n').map((l) => l.split(' ')[0]) : [];
      assert.deepEqual(holders.filter((p) => p && qemuPids.includes(p)), [], `VM uid ${uid} given back`);
    }
  });
});
