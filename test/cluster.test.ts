/**
 * Cluster mode end to end on this one machine, all real: a PostgreSQL, three `podflare node`
 * processes each in its own network namespace (own state directory and uid range), two
 * `podflare gateway` processes on loopback; the SDK and an MCP client talk to the gateways exactly
 * as to `podflare serve`. Then the failures: a node killed under load, a node paused past its
 * heartbeat TTL, a gateway killed mid-create, a gateway↔node partition with nftables.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Client as McpClient } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import { chromium } from 'playwright-core';
import { Sandbox } from 'podflare';
import { startCluster, type TestCluster } from './helpers/cluster.js';
import { openWebSocket } from './helpers/websocket.js';
import { WS_ECHO } from './helpers/ws-echo.js';

const HOST_TTL_MS = 3000;
let cluster: TestCluster;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function api(gateway: number, method: string, path: string, body?: unknown, headers: Record<string, string> = {}) {
  return fetch(cluster.gateways[gateway]!.url + path, {
    method, body: body === undefined ? undefined : JSON.stringify(body),
    headers: { authorization: `Bearer ${cluster.apiKey}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers },
  });
}
const sdk = (gateway = 0) => ({ host: cluster.gateways[gateway]!.url, apiKey: cluster.apiKey });
/** The host PostgreSQL records for a sandbox. */
const hostOf = (id: string) => cluster.pg.psql(`SELECT host_id FROM sandboxes WHERE id='${id}'`).trim();
/** The ids a node itself lists (asked directly, not through a gateway). */
async function directIds(node: number): Promise<Set<string>> {
  const body = (await (await cluster.nodes[node]!.direct('GET', '/v1/sandboxes')).json()) as { sandboxes: Array<{ id: string }> };
  return new Set(body.sandboxes.map((s) => s.id));
}
async function createOn(node: number): Promise<Sandbox> {
  for (let i = 0; i < 60; i++) {
    const sb = await Sandbox.create(sdk(i % 2));
    if (hostOf(sb.id) === cluster.nodes[node]!.id) return sb;
    await sb.close();
  }
  throw new Error(`no create landed on node ${node}`);
}
async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}
/** Every node up again as the gateways see it. */
const allNodesUp = () => waitFor('every node fresh, as both gateways see it', async () => {
  for (const g of [0, 1]) {
    const body = (await (await api(g, 'GET', '/v1/cluster/hosts')).json()) as { hosts: Array<{ fresh: boolean; ready: boolean; reachable: boolean }> };
    if (body.hosts.length !== 3 || !body.hosts.every((h) => h.fresh && h.ready && h.reachable)) return undefined;
  }
  return true;
});

before(async () => {
  cluster = await startCluster({ nodes: 3, gateways: 2, poolSize: 1, maxSandboxes: 24, hostTtlMs: HOST_TTL_MS });
  await allNodesUp();
});
after(async () => { await cluster?.close(); });

describe('cluster: the API through gateways', () => {
  it('the seed workflow through a gateway with the SDK: create, exec, files, fork, diff, merge', async () => {
    const sb = await Sandbox.create(sdk(0));
    const first = await sb.runCode('x = 41\nprint(x + 1)');
    assert.equal(first.stdout, '42\n');
    await sb.files.upload('/root/data.txt', 'hello cluster\n');
    assert.equal((await sb.files.download('/root/data.txt')).toString(), 'hello cluster\n');
    const [a, b] = await sb.fork(2);
    await a!.runCode('x = 100\nopen("/root/a.txt", "w").write("from a")');
    await b!.runCode('x = 200');
    const diff = await sb.diff(a!);
    assert.match(JSON.stringify(diff), /a\.txt/);
    // The other gateway routes to the same sandboxes (shared truth in PostgreSQL).
    const again = await Sandbox.connect(a!.id, sdk(1));
    assert.equal((await again.runCode('print(x)')).stdout, '100\n');
    await sb.mergeInto(a!);
    assert.equal((await sb.runCode('print(x)')).stdout, '100\n');
    assert.equal((await sb.files.download('/root/a.txt')).toString(), 'from a');
    assert.equal(cluster.pg.psql(`SELECT state FROM sandboxes WHERE id='${a!.id}'`).trim(), 'merged');
    await b!.close();
    await sb.close();
    const gone = await api(1, 'GET', `/v1/sandboxes/${sb.id}`);
    assert.equal(((await gone.json()) as { state: string }).state, 'stopped');
  });

  it('creates spread over the nodes; each sandbox is on exactly the node PostgreSQL names', async () => {
    const made = await Promise.all(Array.from({ length: 12 }, (_, i) => Sandbox.create(sdk(i % 2))));
    const hosts = made.map((s) => hostOf(s.id));
    const used = new Set(hosts);
    assert.ok(used.size >= 2, `12 creates used ${used.size} node(s): ${hosts.join(',')}`);
    const lists = await Promise.all([0, 1, 2].map(directIds));
    for (const [i, s] of made.entries()) {
      const owners = lists.map((l, n) => (l.has(s.id) ? cluster.nodes[n]!.id : null)).filter(Boolean);
      assert.deepEqual(owners, [hosts[i]], `${s.id} is listed by exactly its node`);
    }
    // The merged list through a gateway has them all, each with its host.
    const listed = (await (await api(0, 'GET', '/v1/sandboxes')).json()) as { sandboxes: Array<{ id: string; host: string }> };
    for (const [i, s] of made.entries()) assert.equal(listed.sandboxes.find((l) => l.id === s.id)?.host, hosts[i]);
    await Promise.all(made.map((s) => s.close()));
  });

  it("fork children run on their parent's node", async () => {
    for (const node of [0, 1, 2]) {
      const parent = await createOn(node);
      await parent.runCode('v = "parent state"');
      const kids = await parent.fork(3);
      for (const k of kids) {
        assert.equal(hostOf(k.id), cluster.nodes[node]!.id);
        assert.equal((await k.runCode('print(v)')).stdout, 'parent state\n');
      }
      await Promise.all([...kids, parent].map((s) => s.close()));
    }
  });

  it('a fork that does not fit on the parent\'s node answers 503 no_capacity with Retry-After', async () => {
    const parent = await createOn(0);
    const res = await api(0, 'POST', `/v1/sandboxes/${parent.id}/fork`, { n: 32 });
    const body = (await res.json()) as { code: string; error: string };
    assert.equal(res.status, 503, JSON.stringify(body));
    assert.equal(body.code, 'no_capacity');
    assert.ok(Number(res.headers.get('retry-after')) > 0);
    await parent.close();
  });

  it('MCP through a gateway: a session creates a sandbox and runs code on a node', async () => {
    const transport = new StreamableHTTPClientTransport(new URL(`${cluster.gateways[1]!.url}/mcp`),
      { requestInit: { headers: { authorization: `Bearer ${cluster.apiKey}` } } });
    const client = new McpClient({ name: 'cluster-test', version: '1' });
    await client.connect(transport);
    const textOf = (r: CallToolResult) => r.content.flatMap((c) => (c.type === 'text' ? [c.text] : [])).join('\n');
    const created = (await client.callTool({ name: 'create_sandbox', arguments: {} })) as CallToolResult;
    const { sandbox_id: id } = JSON.parse(textOf(created)) as { sandbox_id: string };
    assert.match(id, new RegExp(`^${SANDBOX_ID_SOURCE}$`));
    assert.match(hostOf(id), /^node-\d$/, 'the sandbox runs on a node');
    await client.callTool({ name: 'run_python', arguments: { sandbox_id: id, code: 'y = 7' } });
    const ran = (await client.callTool({ name: 'run_python', arguments: { sandbox_id: id, code: 'print(y * 6)' } })) as CallToolResult;
    assert.match(textOf(ran), /42/);
    await client.callTool({ name: 'destroy_sandbox', arguments: { sandbox_id: id } });
    await transport.terminateSession();
    await client.close();
  });

  it('hosts, load, pools and each sandbox\'s host: /v1/cluster/hosts, /v1/metrics, the merged list; the dashboard page through a gateway', async () => {
    const sb = await Sandbox.create(sdk(1));
    const hosts = (await (await api(1, 'GET', '/v1/cluster/hosts')).json()) as
      { hosts: Array<{ id: string; live: number; capacity: number; pool: { ready: number; target: number } }> };
    assert.deepEqual(hosts.hosts.map((h) => h.id), ['node-0', 'node-1', 'node-2']);
    // A node's pool starts at its size (1) and may grow with the create rate (pool-sizer.ts).
    for (const h of hosts.hosts) assert.ok(h.capacity === 24 && h.pool.target >= 1, JSON.stringify(h));
    const metrics = await (await api(1, 'GET', '/v1/metrics')).text();
    for (const id of ['node-0', 'node-1', 'node-2']) assert.match(metrics, new RegExp(`podflare_cluster_host_up\\{host="${id}"\\} 1`));
    const listed = (await (await api(1, 'GET', '/v1/sandboxes')).json()) as { sandboxes: Array<{ id: string; host: string }> };
    assert.equal(listed.sandboxes.find((s) => s.id === sb.id)?.host, hostOf(sb.id));
    const page = await fetch(`${cluster.gateways[1]!.url}/`);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<html/i);
    await sb.close();
  });

  it('exposed ports and the terminal through a gateway: HTTP streamed, signed URLs of the gateway, WebSockets upgraded', async () => {
    const gw = cluster.gateways[0]!;
    const gwPort = Number(new URL(gw.url).port);
    const auth = { authorization: `Bearer ${cluster.apiKey}` };
    const sb = await Sandbox.create(sdk(0));
    await sb.files.upload('/root/site/index.html', '<h1>through the gateway</h1>\n');
    await sb.commands.run('exec python3 -m http.server 8000 --bind 127.0.0.1', { background: true, cwd: '/root/site' });
    // A server that sends one line, then the next only once /root/go exists: the first line can
    // reach the caller only if the gateway does not buffer the answer.
    await sb.files.upload('/root/drip.py', [
      'import http.server, os, time',
      'class H(http.server.BaseHTTPRequestHandler):',
      '    protocol_version = "HTTP/1.1"',
      '    def do_GET(self):',
      '        self.send_response(200); self.send_header("Transfer-Encoding", "chunked"); self.end_headers()',
      '        def chunk(b): self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(b), b)); self.wfile.flush()',
      '        chunk(b"first\\n")',
      '        while not os.path.exists("/root/go"): time.sleep(0.05)',
      '        chunk(b"second\\n"); self.wfile.write(b"0\\r\\n\\r\\n")',
      'http.server.HTTPServer(("127.0.0.1", 8002), H).serve_forever()',
    ].join('\n'));
    await sb.commands.run('exec python3 /root/drip.py', { background: true });
    await sb.files.upload('/root/ws_echo.py', WS_ECHO);
    await sb.commands.run('exec python3 /root/ws_echo.py', { background: true });

    const page = await waitFor('the dev server through the gateway', async () => {
      const r = await fetch(`${gw.url}/v1/sandboxes/${sb.id}/ports/8000/proxy/`, { headers: auth });
      return r.status === 200 ? { text: await r.text(), csp: r.headers.get('content-security-policy') } : undefined;
    });
    assert.equal(page.text, '<h1>through the gateway</h1>\n');
    assert.match(page.csp ?? '', /^sandbox /);
    assert.equal((await fetch(`${gw.url}/v1/sandboxes/${sb.id}/ports/8000/proxy/`)).status, 401, 'no key, no port');

    const drip = await waitFor('the dripping server', async () => {
      const r = await fetch(`${gw.url}/v1/sandboxes/${sb.id}/ports/8002/proxy/`, { headers: auth });
      return r.status === 200 ? r : undefined;
    });
    const reader = drip.body!.getReader();
    const first = await reader.read();
    assert.equal(Buffer.from(first.value!).toString(), 'first\n', 'the first chunk arrives while the sandbox holds the rest');
    await sb.files.upload('/root/go', '');
    let rest = '';
    for (let c = await reader.read(); !c.done; c = await reader.read()) rest += Buffer.from(c.value).toString();
    assert.equal(rest, 'second\n');

    // A signed URL names the gateway (not the node) and works without the key; a forged one is 401.
    const host = await sb.getHost(8000);
    assert.ok(host.startsWith(`127.0.0.1:${gwPort}/v1/ports/`), host);
    const signed = await fetch(`http://${host}/`);
    assert.equal(signed.status, 200);
    assert.equal(await signed.text(), '<h1>through the gateway</h1>\n');
    const [id, , exp, mac] = host.split('/').pop()!.split('.');
    assert.equal((await fetch(`${gw.url}/v1/ports/${id}.8001.${exp}.${mac}/`)).status, 401);
    assert.equal((await fetch(`${gw.url}/v1/ports/sbx_${'0'.repeat(32)}.8000.${exp}.${mac}/`)).status, 401, 'no sandbox: refused like a forgery');

    // WebSockets: by key, by signed URL; a PTY with the SDK.
    const ws = await waitFor('the WebSocket echo server', () =>
      openWebSocket(gwPort, `/v1/sandboxes/${sb.id}/ports/8765/proxy/chat?room=1`, { Authorization: `Bearer ${cluster.apiKey}` }));
    ws.send('hello');
    assert.equal(await ws.next(), '/chat?room=1 hello');
    ws.close();
    const ws2 = await openWebSocket(gwPort, `/${(await sb.getHost(8765)).split('/').slice(1).join('/')}/`);
    ws2.send('signed');
    assert.equal(await ws2.next(), '/ signed');
    ws2.close();
    await assert.rejects(openWebSocket(gwPort, `/v1/sandboxes/${sb.id}/ports/8765/proxy/`), (e: Error & { response?: string }) => /^HTTP\/1\.1 401/.test(e.response ?? ''));
    await assert.rejects(openWebSocket(gwPort, `/v1/sandboxes/${sb.id}/pty`, { Authorization: `Bearer ${cluster.apiKey}`, Origin: 'https://evil.example' }),
      (e: Error & { response?: string }) => /^HTTP\/1\.1 403/.test(e.response ?? ''));
    let out = '';
    const term = await sb.pty.create({ onData: (d) => { out += d; } });
    const plain = () => out.replace(/\x1b\[[0-9;?]*[a-zA-Z]/g, '');
    await waitFor('the prompt', async () => (/# $/.test(plain()) ? true : undefined));
    term.sendInput('echo $((6*7))\r');
    await waitFor('42 from the terminal', async () => (/[\r\n]42\r\n/.test(plain()) ? true : undefined));
    term.kill();
    // A node's WebSockets, like its HTTP, answer only gateways.
    const node = cluster.nodes.find((n) => n.id === hostOf(sb.id))!;
    await assert.rejects(openWebSocket(7070, `/v1/sandboxes/${sb.id}/pty`, { Authorization: `Bearer ${cluster.apiKey}` }, node.ip),
      (e: Error & { response?: string }) => /^HTTP\/1\.1 401/.test(e.response ?? ''));
    await sb.close();
  });

  it('nodes answer only gateways: no node token, 401', async () => {
    const res = await fetch(`http://${cluster.nodes[0]!.ip}:7070/v1/sandboxes`, { headers: { authorization: `Bearer ${cluster.apiKey}` } });
    assert.equal(res.status, 401);
  });

  it('an Idempotency-Key makes a repeated create answer the same sandbox', async () => {
    const key = `k-${Date.now()}`;
    const one = await api(0, 'POST', '/v1/sandboxes', {}, { 'idempotency-key': key });
    const two = await api(1, 'POST', '/v1/sandboxes', {}, { 'idempotency-key': key });
    const a = (await one.json()) as { id: string };
    const b = (await two.json()) as { id: string };
    assert.equal(one.status, 201);
    assert.equal(two.status, 201);
    assert.equal(b.id, a.id);
    assert.equal(two.headers.get('idempotent-replayed'), 'true');
    await api(0, 'DELETE', `/v1/sandboxes/${a.id}`);
  });
});

describe('cluster: the dashboard through a gateway', () => {
  it('shows every node\'s sandboxes with their host, their execs, and the hosts with load and pools', async () => {
    const browser = await chromium.launch({ executablePath: process.env.PODFLARE_CHROMIUM ?? '/usr/bin/chromium', headless: true, args: ['--no-sandbox'] });
    const made: Sandbox[] = [];
    const WAIT = { timeout: 30_000 };
    try {
      const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
      await page.goto(`${cluster.gateways[1]!.url}/`);
      await page.getByTestId('key-input').fill(cluster.apiKey);
      await page.getByTestId('key-save').click();
      await page.locator('[data-testid="connection"].live').waitFor(WAIT);
      for (const node of [0, 1, 2]) made.push(await createOn(node));
      // Sandboxes of all three nodes in one table, each naming its host (not only the first node's).
      for (const [node, sb] of made.entries()) {
        const row = page.locator(`tr[data-id="${sb.id}"]`);
        await row.waitFor(WAIT);
        assert.equal(await row.getByTestId('sandbox-host').innerText(), cluster.nodes[node]!.id);
      }
      // The console on a sandbox of the last node: its exec streams back through the merged events.
      await page.locator(`tr[data-id="${made[2]!.id}"]`).click();
      await page.getByTestId('console-code').fill('print("on", 6 * 7)');
      await page.getByTestId('console-run').click();
      await page.getByTestId('console-output').getByText('on 42').waitFor(WAIT);
      await page.getByTestId('history').locator('pre.stdout', { hasText: 'on 42' }).waitFor(WAIT);
      // The hosts: each up, its sandboxes over its capacity, its pool.
      await page.getByTestId('nav-pool').click();
      await page.getByTestId('cluster-hosts').waitFor(WAIT);
      const rows = page.getByTestId('host-row');
      await page.waitForFunction(() => document.querySelectorAll('[data-testid="host-row"][data-state="up"]').length === 3, undefined, WAIT);
      assert.deepEqual(await rows.evaluateAll((trs) => trs.map((tr) => tr.getAttribute('data-host'))), ['node-0', 'node-1', 'node-2']);
      // Each runs at least the sandbox made on it (as its heartbeats report, a second or so behind).
      await page.waitForFunction(() => [...document.querySelectorAll('[data-testid="host-load"]')]
        .every((td) => /^\s*[1-9]\d* \/ 24\s*$/.test((td as HTMLElement).innerText)), undefined, WAIT);
      for (const text of await rows.getByTestId('host-pool').allInnerTexts()) assert.match(text.trim(), /^\d+ \/ [1-9]\d*$/);
      // The latency and counters panel below is one node's, and says which.
      await page.getByTestId('pool-panel').getByText(/^Pool and host \(node-\d\)$/).waitFor(WAIT);
      // A node that stops heartbeating shows as such.
      cluster.nodes[1]!.signal('SIGSTOP');
      try {
        await page.locator('[data-testid="host-row"][data-host="node-1"][data-state="silent"]').waitFor(WAIT);
      } finally {
        cluster.nodes[1]!.signal('SIGCONT');
      }
      await page.locator('[data-testid="host-row"][data-host="node-1"][data-state="up"]').waitFor(WAIT);
    } finally {
      await browser.close();
      await Promise.all(made.map((s) => s.close()));
    }
  });
});

describe('cluster: failures', () => {
  it('a node killed with kill -9 under load: creates go on with 0 errors, its sandboxes answer 503, then route again after a restart', async () => {
    const victim = cluster.nodes[2]!;
    // A node process that keeps its sandboxes, as `podflare node` does by default: one that destroys
    // them on a stop also ends them when it dies (its holders watch it), so nothing would come back.
    await victim.stop();
    await victim.start({ keep: true });
    await allNodesUp();
    const doomed = await createOn(2);
    await doomed.runCode('kept = 1');
    let stop = false;
    const errors: Array<{ at: number; error: string }> = [];
    let ok = 0;
    const worker = async (g: number) => {
      while (!stop) {
        try {
          const sb = await Sandbox.create(sdk(g));
          ok++;
          await sb.close();
        } catch (err) {
          errors.push({ at: Date.now(), error: String(err) });
        }
      }
    };
    const workers = [0, 1, 0, 1].map(worker);
    await sleep(1500);
    const killedAt = Date.now();
    await victim.kill9();
    await sleep(8000);
    stop = true;
    await Promise.all(workers);
    const late = errors.filter((e) => e.at > killedAt + 5000);
    assert.deepEqual(late, [], 'no create failed later than 5 s after the kill');
    assert.ok(ok > 5, `creates went on (${ok} made)`);
    // Its sandbox: 503 node_unavailable, not 404.
    const res = await api(0, 'GET', `/v1/sandboxes/${doomed.id}`);
    assert.equal(res.status, 503);
    assert.equal(((await res.json()) as { code: string }).code, 'node_unavailable');
    assert.ok(res.headers.get('retry-after'));
    // Restarted on the same state directory: the node re-adopts the sandbox (its holder outlived the
    // node process) and it answers 200 through a gateway, ready, with its interpreter state.
    await victim.start();
    await allNodesUp();
    const back = await waitFor('the sandbox to answer 200', async () => {
      const r = await api(1, 'GET', `/v1/sandboxes/${doomed.id}`);
      return r.status === 200 ? ((await r.json()) as { state: string }) : undefined;
    });
    assert.equal(back.state, 'ready');
    assert.equal(hostOf(doomed.id), victim.id);
    assert.equal((await (await Sandbox.connect(doomed.id, sdk(1))).runCode('print(kept)')).stdout, '1\n');
    await doomed.close();
  });

  it('a node stopped and started again (a service restart, --on-stop keep): its sandboxes answer 503 meanwhile, then 200 with their state', async () => {
    const node = cluster.nodes[2]!;
    // A node process that keeps its sandboxes on a stop, as `podflare node` does by default (the
    // test cluster's nodes end theirs, to leave nothing behind).
    await node.stop();
    await node.start({ keep: true });
    await allNodesUp();
    const sbs = [await createOn(2), await createOn(2)];
    for (const [i, s] of sbs.entries()) await s.runCode(`mark = ${i}`);
    const [parent] = sbs;
    const [child] = await parent!.fork(1);
    await node.stop();
    const res = await api(0, 'GET', `/v1/sandboxes/${sbs[0]!.id}`);
    assert.equal(res.status, 503);
    assert.equal(((await res.json()) as { code: string }).code, 'node_unavailable');
    await node.start();
    await allNodesUp();
    // The fork child inherited its parent's mark.
    for (const [i, [s, mark]] of ([[sbs[0]!, 0], [sbs[1]!, 1], [child!, 0]] as const).entries()) {
      const out = await waitFor('the sandbox to answer again', async () => (await Sandbox.connect(s.id, sdk(i % 2))).runCode('print(mark)'));
      assert.equal(out.stdout, `${mark}\n`);
    }
    const states = cluster.pg.psql(`SELECT state FROM sandboxes WHERE id IN ('${sbs[0]!.id}','${sbs[1]!.id}','${child!.id}')`).trim().split('\n');
    assert.deepEqual(states, ['ready', 'ready', 'ready']);
    await Promise.all([child!, ...sbs].map((s) => s.close()));
  });

  it('a node paused (SIGSTOP) past the heartbeat TTL, then resumed: 503 meanwhile, no placement there, no double ownership', async () => {
    const paused = cluster.nodes[1]!;
    const mine = await createOn(1);
    await mine.runCode('state = "kept"');
    const before = [await directIds(0), await directIds(1), await directIds(2)];
    paused.signal('SIGSTOP');
    try {
      await sleep(HOST_TTL_MS + 2000);
      const res = await api(0, 'GET', `/v1/sandboxes/${mine.id}`);
      assert.equal(res.status, 503);
      assert.equal(((await res.json()) as { code: string }).code, 'node_unavailable');
      const placed = await Promise.all(Array.from({ length: 6 }, (_, i) => Sandbox.create(sdk(i % 2))));
      for (const s of placed) assert.notEqual(hostOf(s.id), paused.id, 'nothing is placed on a silent node');
      await Promise.all(placed.map((s) => s.close()));
    } finally {
      paused.signal('SIGCONT');
    }
    await allNodesUp();
    const again = await Sandbox.connect(mine.id, sdk(1));
    assert.equal((await again.runCode('print(state)')).stdout, 'kept\n');
    // Nobody took its sandboxes over: same owner in PostgreSQL, listed by that node alone.
    assert.equal(hostOf(mine.id), paused.id);
    const after = [await directIds(0), await directIds(1), await directIds(2)];
    assert.ok(after[1]!.has(mine.id) && !after[0]!.has(mine.id) && !after[2]!.has(mine.id));
    for (const id of before[1]!) assert.ok(!after[0]!.has(id) && !after[2]!.has(id), `${id} owned twice`);
    await mine.close();
  });

  it('a gateway killed mid-create: the SDK carries on through the other gateway and a retried create makes no duplicate', async () => {
    const sb = await Sandbox.create(sdk(0));
    await sb.runCode('n = 7');
    const key = `mid-create-${Date.now()}`;
    // The create is under way through gateway 0 when it dies.
    const first = api(0, 'POST', '/v1/sandboxes', {}, { 'idempotency-key': key }).then((r) => r.status, (e: unknown) => String(e));
    await sleep(30);
    await cluster.gateways[0]!.kill9();
    const firstOutcome = await first;
    // The caller retries the same create through the other gateway.
    const retry = await api(1, 'POST', '/v1/sandboxes', {}, { 'idempotency-key': key });
    assert.equal(retry.status, 201, `${await retry.clone().text()} (first attempt: ${firstOutcome})`);
    const made = cluster.pg.psql(`SELECT count(*) FROM sandboxes WHERE metadata->>'podflare:idempotency-key' = '${key}'`).trim();
    assert.equal(made, '1', 'one sandbox for one key');
    // Existing sandboxes through the surviving gateway, with the SDK.
    const via1 = await Sandbox.connect(sb.id, sdk(1));
    assert.equal((await via1.runCode('print(n)')).stdout, '7\n');
    await cluster.gateways[0]!.start();
    const id = ((await retry.json()) as { id: string }).id;
    await api(0, 'DELETE', `/v1/sandboxes/${id}`);
    await via1.close();
  });

  it('a gateway↔node partition (nftables in the node\'s namespace): 503 within the connect timeout, 0 sandboxes killed, heals by itself', async () => {
    const node = cluster.nodes[0]!;
    const sbs = [await createOn(0), await createOn(0)];
    for (const [i, s] of sbs.entries()) await s.runCode(`mark = ${i}`);
    node.inNetns('nft', 'add', 'table', 'inet', 'pfpart');
    node.inNetns('nft', 'add', 'chain', 'inet', 'pfpart', 'input', '{ type filter hook input priority 0 ; }');
    node.inNetns('nft', 'add', 'rule', 'inet', 'pfpart', 'input', 'ip', 'saddr', node.hostIp, 'tcp', 'dport', '7070', 'drop');
    try {
      const started = Date.now();
      const status = await waitFor('503 across the partition', async () => {
        const r = await api(1, 'GET', `/v1/sandboxes/${sbs[0]!.id}`, undefined);
        return r.status === 503 ? ((await r.json()) as { code: string }).code : undefined;
      }, 20_000);
      assert.equal(status, 'node_unavailable');
      // The connect timeout (2 s) plus the probes that notice (two, 0.5 s apart), with slack for a busy machine.
      assert.ok(Date.now() - started < 10_000, `503 after ${Date.now() - started} ms`);
      // Creates avoid the unreachable node.
      const placed = await Promise.all(Array.from({ length: 4 }, () => Sandbox.create(sdk(1))));
      for (const s of placed) assert.notEqual(hostOf(s.id), node.id);
      await Promise.all(placed.map((s) => s.close()));
    } finally {
      node.inNetns('nft', 'delete', 'table', 'inet', 'pfpart');
    }
    // Healed without a restart: same sandboxes, same interpreters.
    for (const [i, s] of sbs.entries()) {
      const out = await waitFor('the sandbox to answer again', async () => (await s.runCode('print(mark)')).stdout);
      assert.equal(out, `${i}\n`);
    }
    assert.equal(cluster.pg.psql(`SELECT count(*) FROM sandboxes WHERE id IN ('${sbs[0]!.id}','${sbs[1]!.id}') AND state NOT IN ('ready','running')`).trim(), '0');
    await Promise.all(sbs.map((s) => s.close()));
  });
});
