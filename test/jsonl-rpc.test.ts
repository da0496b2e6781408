/**
 * The shared JSON-lines framer and RPC (packages/server/src/jsonl/) against real peers: Python
 * child processes on pipes, and unix sockets, never mocks. What a peer can do to the server
 * through it: lines over the cap, characters split across reads, dying mid-call, answering an id
 * nobody asked for, never answering, flooding the pending map, and the schema checks of the host
 * helpers' replies.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { HelperProcess } from '../packages/server/src/helper-process.js';
import { HelperReplyError, HostdReplySchemas, parseHelperReply } from '../packages/server/src/host-protocol.js';
import { Spawner } from '../packages/server/src/runtime/shared/spawner.js';
import { JsonlRpc, RpcRefusedError, type JsonlRpcOptions, type PendingCall, type RpcFault } from '../packages/server/src/jsonl/rpc.js';

/** A Python peer on a child's stdin/stdout running `body`; `rpc` speaks to it. */
function pythonPeer(body: string, o: Partial<JsonlRpcOptions> = {}) {
  const child: ChildProcess = spawn('/usr/bin/python3', ['-I', '-c', body], { stdio: ['pipe', 'pipe', 'inherit'] });
  child.stdin!.on('error', () => undefined);
  const faults: RpcFault[] = [];
  const rpc = new JsonlRpc({
    readable: child.stdout!, writable: child.stdin!, maxLineBytes: 1024 * 1024,
    onFault: (f) => { faults.push(f); child.kill('SIGKILL'); },
    ...o,
  });
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
  return { child, rpc, faults, closed };
}

/** How a call ended: its value, or its error. */
function outcome<T>(p: Promise<T>): Promise<{ value?: T; error?: Error }> {
  return p.then((value) => ({ value }), (error: Error) => ({ error }));
}

/** A unix socket pair: `server` (what the RPC reads) and `peer` (what the test writes as). */
async function socketPair(dir: string): Promise<{ server: net.Socket; peer: net.Socket; close(): void }> {
  const file = path.join(dir, `s${Math.random().toString(36).slice(2)}`);
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(file, resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const peer = net.connect(file);
  await new Promise<void>((resolve) => peer.once('connect', () => resolve()));
  const server = await accepted;
  listener.close();
  return { server, peer, close: () => { server.destroy(); peer.destroy(); } };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('the JSON-lines RPC against real peers', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(path.join(os.tmpdir(), 'pf-jsonl-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  it('a line over the cap is a fault as soon as it is over (never buffered whole), and nothing after it is read', async () => {
    // 64 KiB writes, never a newline: the cap (1 MiB) is crossed after 17 of them.
    const { rpc, faults, closed } = pythonPeer([
      'import sys', 'sys.stdin.readline()',
      'for _ in range(64):', '    sys.stdout.write("x" * 65536)', '    sys.stdout.flush()',
      'sys.stdout.write(\'\\n{"id": 1, "ok": true}\\n\')', 'sys.stdout.flush()',
      'import time', 'time.sleep(30)',
    ].join('\n'));
    const call = outcome(rpc.call({ op: 'ping' }, { label: 'ping' }));
    await closed; // killed by onFault
    rpc.close((c) => new Error(`peer gone during ${c.label}`));
    assert.equal(faults.length, 1);
    assert.equal(faults[0]!.kind, 'too_long');
    assert.match((faults[0] as Extract<RpcFault, { kind: 'too_long' }>).error.message, /a line is longer than 1048576 bytes/);
    assert.equal((await call).error?.message, 'peer gone during ping', 'the call failed with the close reason, not answered');
  });

  it('a character split across reads arrives whole (one decode per line)', async () => {
    const { server, peer, close } = await socketPair(dir);
    try {
      const events: Array<Record<string, unknown>> = [];
      new JsonlRpc({ readable: server, writable: server, maxLineBytes: 4096, onFault: (f) => assert.fail(`fault: ${f.kind}`),
        onEvent: (m) => { events.push(m); } });
      const text = 'héllo € 𝄞 ✓';
      const bytes = Buffer.from(JSON.stringify({ ev: 'note', text }) + '\n');
      // One byte per write, a pause between: every multi-byte character is split across reads.
      for (let i = 0; i < bytes.length; i++) {
        peer.write(bytes.subarray(i, i + 1));
        await sleep(2);
      }
      for (let i = 0; i < 500 && events.length === 0; i++) await sleep(10);
      assert.deepEqual(events, [{ ev: 'note', text }]);
    } finally {
      close();
    }
  });

  it('a peer that dies mid-call fails every pending call once, with the close reason', async () => {
    const { child, rpc, closed } = pythonPeer('import sys\nsys.stdin.readline()\nsys.exit(3)\n');
    let rejections = 0;
    const calls = [1, 2, 3].map((n) => outcome(rpc.call({ op: `op${n}` }, { label: `op${n}` }).catch((e: Error) => { rejections++; throw e; })));
    await closed;
    const seen: Array<[string, number]> = [];
    rpc.close((call: PendingCall, index) => { seen.push([call.label, index]); return new Error(`peer exited (${child.exitCode}) during ${call.label}`); });
    rpc.close(() => new Error('a second close changes nothing'));
    const ended = await Promise.all(calls);
    assert.deepEqual(ended.map((c) => c.error?.message), ['peer exited (3) during op1', 'peer exited (3) during op2', 'peer exited (3) during op3']);
    assert.deepEqual(seen, [['op1', 0], ['op2', 1], ['op3', 2]], 'in the order sent (the first is the one the peer worked on)');
    assert.equal(rejections, 3);
    assert.equal((await outcome(rpc.call({ op: 'later' }, { label: 'later' }))).error?.message, 'peer exited (3) during later');
  });

  it('a reply with an id nobody asked for is dropped; the real answer still reaches its call', async () => {
    const { rpc, child } = pythonPeer([
      'import json, sys',
      'req = json.loads(sys.stdin.readline())',
      'print(json.dumps({"id": 999, "ok": True, "who": "stranger"}), flush=True)',
      'print(json.dumps({"id": "1", "ok": True, "who": "string id"}), flush=True)',
      'print(json.dumps({"id": req["id"], "ok": True, "who": "answer"}), flush=True)',
      'sys.stdin.readline()',
    ].join('\n'));
    try {
      const reply = await rpc.call<Record<string, unknown>>({ op: 'ping' }, { label: 'ping' });
      assert.equal(reply.who, 'answer');
      assert.equal(rpc.pendingCount, 0);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('in order, a call is timed from when the peer starts it; a call never answered times out, naming it', async () => {
    // The peer works 3 s on the first call, then answers both at once.
    const body = [
      'import json, sys, time',
      'a = json.loads(sys.stdin.readline()); b = json.loads(sys.stdin.readline())',
      'time.sleep(3)',
      'for r in (a, b): print(json.dumps({"id": r["id"], "ok": True}), flush=True)',
      'sys.stdin.readline()',
    ].join('\n');
    for (const inOrder of [true, false]) {
      const timeouts: string[] = [];
      const { rpc, child } = pythonPeer(body, { inOrder, onTimeout: (call, ms) => { timeouts.push(`${call.label} after ${ms} ms`); } });
      try {
        const first = rpc.call({ op: 'slow' }, { label: 'slow' });
        const second = rpc.call({ op: 'quick' }, { label: 'quick', timeoutMs: 1_000 });
        await Promise.all([first, second]);
        // The timer only reports; the owner decides (a helper is killed, failing the call).
        assert.deepEqual(timeouts, inOrder ? [] : ['quick after 1000 ms'], `inOrder: ${inOrder}`);
      } finally {
        child.kill('SIGKILL');
      }
    }

    const timeouts: string[] = [];
    const { rpc, child, closed } = pythonPeer('import time\ntime.sleep(60)\n', {
      inOrder: true, onTimeout: (call, ms) => { timeouts.push(`${call.label} after ${ms} ms`); child.kill('SIGKILL'); },
    });
    const stuck = outcome(rpc.call({ op: 'stuck' }, { label: 'stuck', timeoutMs: 500 }));
    await closed;
    rpc.close((c) => new Error(`${c.label} timed out`));
    assert.deepEqual(timeouts, ['stuck after 500 ms']);
    assert.equal((await stuck).error?.message, 'stuck timed out');
  });

  it('bounds the pending map: a call past maxPending is refused', async () => {
    const { rpc, child } = pythonPeer('import time\ntime.sleep(60)\n', { maxPending: 2 });
    try {
      const pending = [rpc.call({ op: 'a' }, { label: 'a' }), rpc.call({ op: 'b' }, { label: 'b' })];
      for (const p of pending) p.catch(() => undefined);
      const refused = await outcome(rpc.call({ op: 'c' }, { label: 'c' }));
      assert.ok(refused.error instanceof RpcRefusedError);
      assert.match(refused.error.message, /c: 2 calls already pending/);
    } finally {
      child.kill('SIGKILL');
      rpc.close(() => new Error('closed'));
    }
  });

  it('a held event stops reading (the socket is paused) until it settles', async () => {
    const { server, peer, close } = await socketPair(dir);
    try {
      const seen: string[] = [];
      let release!: () => void;
      new JsonlRpc({ readable: server, writable: server, maxLineBytes: 4096, onFault: (f) => assert.fail(`fault: ${f.kind}`),
        onEvent: (m) => {
          seen.push(String(m.n));
          if (m.n === 1) return new Promise<void>((resolve) => { release = resolve; });
        } });
      peer.write('{"n": 1}\n{"n": 2}\n');
      await sleep(100);
      peer.write('{"n": 3}\n');
      await sleep(300);
      assert.deepEqual(seen, ['1'], 'nothing after the held line was handled');
      assert.equal(server.isPaused(), true);
      release();
      for (let i = 0; i < 300 && seen.length < 3; i++) await sleep(10);
      assert.deepEqual(seen, ['1', '2', '3']);
    } finally {
      close();
    }
  });

  it('a bad message naming a pending call fails only that call; one naming none is a fault', async () => {
    const { rpc, child, faults, closed } = pythonPeer([
      'import json, sys',
      'a = json.loads(sys.stdin.readline()); b = json.loads(sys.stdin.readline())',
      'print(json.dumps({"id": a["id"], "ok": "yes"}), flush=True)',
      'print(json.dumps({"id": b["id"], "ok": True}), flush=True)',
      'print("{not json", flush=True)',
      'sys.stdin.readline()',
    ].join('\n'), {
      checkMessage: (m) => (typeof (m as { ok?: unknown }).ok === 'boolean' ? null : 'ok: not a boolean'),
      callError: (call, problem) => new Error(`${call.label}: ${problem}`),
    });
    const a = outcome(rpc.call({ op: 'a' }, { label: 'a' }));
    const b = outcome(rpc.call({ op: 'b' }, { label: 'b' }));
    assert.equal((await a).error?.message, 'a: ok: not a boolean');
    assert.deepEqual((await b).value, { id: 2, ok: true });
    await closed;
    assert.deepEqual(faults.map((f) => f.kind), ['not_json']);
    assert.equal(child.signalCode, 'SIGKILL');
  });
});

describe("the host helpers' reply schemas", () => {
  it('a helper answering ok with a reply its op does not allow fails that call, naming the field (a helper bug)', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'pf-jsonl-schema-'));
    const script = path.join(dir, 'bad_helper.py');
    await writeFile(script, [
      'import json, sys',
      'for line in sys.stdin:',
      '    req = json.loads(line)',
      '    reply = {"handle": "not-a-number"} if req["op"] == "overlay_prepare" else {"added": ["/a"], "removed": [], "modified": 7}',
      '    print(json.dumps({"id": req["id"], "ok": True, **reply}), flush=True)',
    ].join('\n'));
    const bad = new HelperProcess({ script, name: 'host helper' });
    try {
      const prepared = await bad.call({ op: 'overlay_prepare' });
      assert.throws(() => parseHelperReply('host helper', 'overlay_prepare', HostdReplySchemas.overlay_prepare, prepared),
        (err: Error) => err instanceof HelperReplyError
          && /^host helper: overlay_prepare reply does not match its schema \(a helper bug\): handle: /.test(err.message));
      const diffed = await bad.call({ op: 'diff' });
      assert.throws(() => parseHelperReply('host helper', 'diff', HostdReplySchemas.diff, diffed), /diff reply does not match its schema .*modified: /);
      // A good reply passes, its envelope stripped.
      assert.deepEqual(parseHelperReply('host helper', 'diff', HostdReplySchemas.diff, { id: 3, ok: true, added: [], removed: [], modified: [] }),
        { added: [], removed: [], modified: [] });
    } finally {
      bad.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('the spawner, an object of its server (no module state)', () => {
  it('two spawners in one process are independent: closing one ends only its own children', async () => {
    const [one, two] = [new Spawner(), new Spawner()];
    // A spawner does not keep the process alive by itself (the server's listener does).
    const keepAlive = setInterval(() => undefined, 1_000);
    try {
      const [a, b] = await Promise.all([one.spawn(['sleep', '60']), two.spawn(['sleep', '60'])]);
      assert.notEqual(a.pid, b.pid);
      one.close();
      const ended = await Promise.race([a.exited, sleep(30_000).then(() => null)]);
      assert.equal(ended?.signal, 'SIGKILL', "the closed spawner's child ended with it");
      assert.doesNotThrow(() => process.kill(b.pid, 0), "the other spawner's child still runs");
      b.kill();
      assert.ok((await Promise.race([b.exited, sleep(30_000).then(() => null)])) !== null, 'killed through its own spawner');
    } finally {
      clearInterval(keepAlive);
      one.close();
      two.close();
    }
  });
});
