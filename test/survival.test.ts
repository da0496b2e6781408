/**
 * A server restart loses no live sandbox (#20): `podflare serve` as a child process, its sandboxes
 * holding interpreter state (a variable, an open file, a background thread's result) and a fork
 * family; the server is killed (kill -9, or SIGTERM to its whole process group with `--on-stop
 * keep`) and started again on the same state directory → every sandbox answers with its state,
 * the family's lineage is intact, none is lost; after the final destroy nothing is left. An
 * upgrade adopts sandboxes of another minor agent protocol and, across a major one, cleans them or
 * refuses to start as configured. And the holders' sockets, which drive the agents, are out of
 * reach of the sandboxes' uid.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { AGENT_PROTOCOL_MINOR, AGENT_PROTOCOL_VERSION } from '@podflare/protocol';
import { cgroupsOf, forkLayersIn, overlayMountsUnder, processesMentioning, processesOf, sandboxDirsIn, stillRunning } from './helpers/leaks.js';
import { startServe, type ServeProcess } from './helpers/serve.js';

const SANDBOXES = 10;
const SANDBOX_UID = 100_000; // the default sandboxUidBase: root inside every namespace sandbox

/** Python that leaves state behind: a variable, an open file, a thread still working. */
const HOLD_STATE = (tag: string) => [
  'import threading, time',
  `held = "${tag}"`,
  `f = open("/tmp/held.txt", "w+"); f.write("file-${tag}"); f.flush()`,
  'result = {}',
  'def work():',
  '    time.sleep(3)',
  `    result["r"] = "thread-${tag}"`,
  't = threading.Thread(target=work); t.start()',
  'print("ok")',
].join('\n');
const READ_STATE = 't.join(); f.seek(0); print(held, f.read(), result["r"])';

async function api(serve: ServeProcess, method: string, p: string): Promise<unknown> {
  const res = await fetch(serve.url + p, { method });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

interface Family { parent: string; children: string[]; grandchild: string }

/** Sandboxes with state and a fork family (parent → 2 children → 1 grandchild), on `serve`. */
async function populate(serve: ServeProcess): Promise<{ ids: string[]; family: Family }> {
  const ids = await Promise.all(Array.from({ length: SANDBOXES }, () => serve.create()));
  await Promise.all(ids.map(async (id, i) => assert.equal(await serve.run(id, HOLD_STATE(`s${i}`)), 'ok\n')));
  const parent = await serve.create();
  await serve.run(parent, 'lineage = ["parent"]');
  const children = await serve.fork(parent, 2);
  await Promise.all(children.map((c, i) => serve.run(c, `lineage.append("child${i}")`)));
  const [grandchild] = await serve.fork(children[0]!, 1);
  await serve.run(grandchild!, 'lineage.append("grandchild")');
  return { ids, family: { parent, children, grandchild: grandchild! } };
}

/** Everything answers with its state after the restart, the family as it was; nothing lost. */
async function checkAdopted(serve: ServeProcess, ids: string[], family: Family): Promise<void> {
  const answers = await Promise.all(ids.map((id) => serve.run(id, READ_STATE)));
  assert.deepEqual(answers, ids.map((_, i) => `s${i} file-s${i} thread-s${i}\n`));
  for (const id of [...ids, family.parent, ...family.children, family.grandchild]) {
    assert.equal((await serve.info(id)).state, 'ready', `${id} is ready again`);
  }
  assert.equal(await serve.run(family.parent, 'print(lineage)'), "['parent']\n");
  assert.equal(await serve.run(family.children[1]!, 'print(lineage)'), "['parent', 'child1']\n");
  assert.equal(await serve.run(family.grandchild, 'print(lineage)'), "['parent', 'child0', 'grandchild']\n");
  const parentInfo = await api(serve, 'GET', `/v1/sandboxes/${family.parent}`) as { children: string[] };
  assert.deepEqual([...parentInfo.children].sort(), [...family.children].sort());
  const grandInfo = await api(serve, 'GET', `/v1/sandboxes/${family.grandchild}`) as { parent: string };
  assert.equal(grandInfo.parent, family.children[0]);
  // A fork after the restart still works (lineage and fork layers were taken over).
  const [late] = await serve.fork(family.grandchild, 1);
  assert.equal(await serve.run(late!, 'print(len(lineage))'), '3\n');
  // Its limits still hold: its cgroups are still there, and its processes in them.
  for (const id of ids) assert.notDeepEqual(cgroupsOf(id), [], `${id} keeps its cgroups`);
}

/** Destroys everything and checks nothing of it is left on the host. */
async function destroyAll(serve: ServeProcess, stateDir: string, ids: string[]): Promise<void> {
  for (const id of ids) await api(serve, 'DELETE', `/v1/sandboxes/${id}`).catch(() => undefined);
  await serve.stop();
  assert.deepEqual(processesMentioning(stateDir), []);
  assert.deepEqual(overlayMountsUnder(stateDir), []);
  assert.deepEqual(sandboxDirsIn(stateDir), []);
  assert.deepEqual(forkLayersIn(stateDir), []);
  assert.deepEqual(ids.flatMap((id) => cgroupsOf(id)), []);
  const holders = path.join(stateDir, 'holders');
  assert.deepEqual(existsSync(holders) ? readdirSync(holders) : [], []);
}

describe('survival of a server restart', () => {
  let stateDir: string;
  let serve: ServeProcess | undefined;

  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-surv-'));
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

  it(`kill -9: ${SANDBOXES} sandboxes and a fork family come back with their state, none lost`, async () => {
    serve = await startServe(stateDir, { poolSize: 1, onStop: 'keep' });
    const { ids, family } = await populate(serve);
    // An exec is running when the server dies: nobody waits for it any more, and it must not
    // keep its sandbox busy.
    serve.runInFlight(ids[1]!, 'import time\ntime.sleep(600)');
    await new Promise((r) => setTimeout(r, 500));
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 1 });
    await checkAdopted(serve, ids, family);
    const all = await api(serve, 'GET', '/v1/sandboxes?state=lost') as { sandboxes?: unknown[] } | unknown[];
    const lost = Array.isArray(all) ? all : (all.sandboxes ?? []);
    assert.equal(lost.length, 0, 'no sandbox lost');
    const familyIds = [family.parent, ...family.children, family.grandchild];
    await destroyAll(serve, stateDir, [...familyIds.reverse(), ...ids]);
    serve = undefined;
  });

  it('SIGTERM to the whole process group with --on-stop keep: a clean stop, then all adopted', async () => {
    serve = await startServe(stateDir, { poolSize: 1, detached: true, onStop: 'keep' });
    const { ids, family } = await populate(serve);
    process.kill(-serve.pid, 'SIGTERM');
    assert.equal(await serve.exited, 0, `a clean stop: ${serve.stderr()}`);
    assert.doesNotMatch(serve.stderr(), /EPIPE|Traceback|Unhandled/);
    serve = await startServe(stateDir, { poolSize: 1 });
    await checkAdopted(serve, ids, family);
    await destroyAll(serve, stateDir, [family.grandchild, ...family.children, family.parent, ...ids]);
    serve = undefined;
  });

  it('upgrade: another minor agent protocol is adopted; another major is cleaned, or refused with --on-incompatible refuse', async () => {
    serve = await startServe(stateDir, { poolSize: 0, onStop: 'keep' });
    const [older, foreign] = [await serve.create(), await serve.create()];
    for (const id of [older, foreign]) await serve.run(id, `tag = "${id}"`);
    await serve.stop();
    // The sandboxes as an earlier build left them: what the next server reads is the agent
    // protocol each holder record names (written by the build that started the sandbox).
    const stamp = (id: string, version: string) => {
      const file = path.join(stateDir, 'holders', `${id}.json`);
      const record = JSON.parse(readFileSync(file, 'utf8')) as { agentProtocol: string };
      assert.equal(record.agentProtocol, `${AGENT_PROTOCOL_VERSION}.${AGENT_PROTOCOL_MINOR}`);
      writeFileSync(file, JSON.stringify({ ...record, agentProtocol: version }));
    };
    stamp(older, `${AGENT_PROTOCOL_VERSION}.${AGENT_PROTOCOL_MINOR + 1}`);
    stamp(foreign, `${AGENT_PROTOCOL_VERSION + 1}.0`);
    // refuse: the server does not start, and says which sandbox and what to do; nothing is touched.
    const refused = await startServe(stateDir, { poolSize: 0, env: { PODFLARE_ON_INCOMPATIBLE: 'refuse' } }).then(
      async (s) => { await s.stop(); return 'started'; }, (err: Error) => err.message);
    assert.match(refused, new RegExp(`${foreign} \\(agent protocol ${AGENT_PROTOCOL_VERSION + 1}\\.0\\)`));
    assert.match(refused, /--on-incompatible clean/);
    assert.equal(processesMentioning(`holders/${foreign}.sock`).length, 1, 'the incompatible sandbox still runs');
    // clean (the default): the compatible one is adopted, the other ended and recorded lost.
    serve = await startServe(stateDir, { poolSize: 0 });
    assert.equal(await serve.run(older, 'print(tag)'), `${older}\n`);
    assert.equal((await serve.info(foreign)).state, 'lost');
    assert.deepEqual(processesMentioning(foreign), []);
    await destroyAll(serve, stateDir, [older]);
    serve = undefined;
  });

  it("the sandboxes' uid cannot reach a holder's socket, nor drive an agent through it", async () => {
    serve = await startServe(stateDir, { poolSize: 0 });
    const id = await serve.create();
    await serve.run(id, 'secret = 42');
    const socket = path.join(stateDir, 'holders', `${id}.sock`);
    assert.ok(existsSync(socket));
    // As the sandboxes' host uid (what an escape from a sandbox would be): the directory is root's.
    const tryDrive = () => execFileSync('setpriv', ['--reuid', String(SANDBOX_UID), '--regid', String(SANDBOX_UID), '--clear-groups', '/usr/bin/python3', '-c', [
      'import socket, sys',
      's = socket.socket(socket.AF_UNIX)',
      'try:',
      `    s.connect(${JSON.stringify(socket)})`,
      'except OSError as e:',
      '    print("refused", e.errno); sys.exit(0)',
      's.settimeout(3)',
      'try:',
      '    s.sendall(b\'{"id": 1, "op": "ping"}\\n\')',
      '    print("answered" if s.recv(4096) else "closed")',
      'except socket.timeout:',
      '    print("silent")',
      'except (ConnectionResetError, BrokenPipeError):',
      '    print("closed")',
    ].join('\n')], { encoding: 'utf8' }).trim();
    assert.equal(tryDrive(), 'refused 13', 'permission denied on the holders directory');
    // Even with the directory and socket opened up, the holder refuses a peer that is not root.
    const holders = path.dirname(socket);
    chmodSync(holders, 0o711);
    chmodSync(socket, 0o666);
    try {
      assert.equal(tryDrive(), 'closed', 'the holder hangs up on a non-root peer');
    } finally {
      chmodSync(holders, 0o700);
      chmodSync(socket, 0o600);
    }
    // The server's own connection is untouched by the attempts.
    assert.equal(await serve.run(id, 'print(secret)'), '42\n');
    // From inside another sandbox the holders' directory does not even exist.
    const other = await serve.create();
    assert.equal(await serve.run(other, `import os\nprint(os.path.exists(${JSON.stringify(holders)}))`), 'False\n');
    await destroyAll(serve, stateDir, [id, other]);
    serve = undefined;
  });

  it('--on-stop destroy: a server killed with kill -9 takes its sandboxes with it, adopted ones too; the next start cleans the rest', async () => {
    // One sandbox of a keeping server, adopted by the destroying one.
    serve = await startServe(stateDir, { poolSize: 0, onStop: 'keep' });
    const adopted = await serve.create();
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 1 });
    assert.equal(await serve.run(adopted, 'print("adopted")'), 'adopted\n');
    const [a, b] = [await serve.create(), await serve.create()];
    await serve.run(a, 'import subprocess\np = subprocess.Popen(["sleep", "1000"])\nprint("ok")');
    const [child] = await serve.fork(b, 1);
    serve.runInFlight(b, 'import time\ntime.sleep(600)');
    const ids = [adopted, a, b, child!];
    const stamps = processesOf(ids);
    assert.ok(stamps.length >= 4, `found the sandboxes' processes (${stamps.length})`);
    assert.ok(processesMentioning(`${stateDir}/holders/`).length >= 4, 'each sandbox has its holder');
    await serve.kill9();
    // Each holder watches its server: within a few seconds nothing of the sandboxes runs, though
    // no server is there to end them (bwrap, the agents and what they started, the holders).
    const left = () => [...stillRunning(stamps).map((p) => `${p.pid} ${p.cmd}`), ...processesMentioning(stateDir)];
    for (let i = 0; i < 100 && left().length; i++) await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(left(), [], 'no process of the killed server\'s sandboxes remains');
    // The next server records them lost and removes what was left on the host (cgroups, directories).
    serve = await startServe(stateDir, { poolSize: 0 });
    for (const id of ids) assert.equal((await serve.info(id)).state, 'lost', `${id} is lost`);
    await destroyAll(serve, stateDir, []);
    for (const id of ids) assert.deepEqual(cgroupsOf(id), [], `${id}: no cgroup left`);
    serve = undefined;
  });

  it('a sandbox that inflates what adoption reads (its mount table, a huge argv) is not adopted alone; the others are', async () => {
    serve = await startServe(stateDir, { poolSize: 0, onStop: 'keep' });
    const [plain, argv, mounts] = [await serve.create(), await serve.create(), await serve.create()];
    for (const id of [plain, argv, mounts]) await serve.run(id, `tag = "${id}"`);
    // ~1.5 MB of command line in the host's process table (read at every start that cleans up).
    await serve.run(argv, 'import subprocess\nbig = subprocess.Popen(["python3", "-c", "import time; time.sleep(1000)"] + ["x" * 100_000] * 15)\nprint("ok")');
    // Its agent's mount table past 1 MiB: 400 tmpfs stacked on a directory whose path is ~3.8 KB.
    await serve.run(mounts, [
      'import ctypes, os',
      'libc = ctypes.CDLL(None, use_errno=True)',
      'deep = "/tmp/" + "/".join(["d" * 250] * 15)',
      'os.makedirs(deep)',
      'for _ in range(400):',
      '    assert libc.mount(b"none", deep.encode(), b"tmpfs", 0, None) == 0, ctypes.get_errno()',
      'print(len(open("/proc/1/mountinfo").read()) > 1024 * 1024)',
    ].join('\n')).then((out) => assert.equal(out, 'True\n'));
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 0, onStop: 'keep', logLevel: 'warn' });
    // The others answer with their state, the huge argv included; the inflated one is lost, and why is logged.
    assert.equal(await serve.run(plain, 'print(tag)'), `${plain}\n`);
    assert.equal(await serve.run(argv, 'print(tag, big.poll())'), `${argv} None\n`);
    assert.equal((await serve.info(mounts)).state, 'lost');
    assert.match(serve.stderr(), new RegExp(`cannot be adopted.*${mounts}.*mountinfo is larger than 1048576 bytes`));
    for (let i = 0; i < 100 && processesOf([mounts]).length; i++) await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(processesOf([mounts]), [], 'nothing of it runs');
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 0 });
    await destroyAll(serve, stateDir, [plain, argv]);
    serve = undefined;
  });
});
