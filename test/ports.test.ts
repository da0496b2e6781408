/**
 * Exposed ports: a server in a sandbox (egress off) reached through the Podflare server by API key or
 * signed URL, HTTP and WebSocket; and what an attacker tries: no key, a forged or altered token,
 * another key's sandbox, another sandbox, the server's API through the proxy, a foreign Host,
 * request smuggling.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';
import { openWebSocket } from './helpers/websocket.js';
import { WS_ECHO } from './helpers/ws-echo.js';

const KEY = 'port-key-one';
const OTHER_KEY = 'port-key-two';

/** One raw HTTP exchange with the server (for requests fetch will not send). */
function rawRequest(port: number, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => socket.write(text));
    let out = '';
    socket.on('data', (d) => { out += d.toString('latin1'); });
    socket.on('end', () => resolve(out));
    socket.on('error', reject);
  });
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(150);
  }
}

describe('exposed ports', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  let port!: number;
  const auth = { Authorization: `Bearer ${KEY}` };

  before(async () => {
    server = await startTestServer({ poolSize: 1, apiKeys: [KEY, OTHER_KEY] });
    port = Number(new URL(server.url).port);
    sbx = await Sandbox.create({ host: server.url, apiKey: KEY, egress: false });
    await sbx.files.upload('/root/site/index.html', '<h1>hello from the sandbox</h1>\n');
    await sbx.commands.run('exec python3 -m http.server 8000 --bind 127.0.0.1', { background: true, cwd: '/root/site' });
    await sbx.files.upload('/root/ws_echo.py', WS_ECHO);
    await sbx.commands.run('exec python3 /root/ws_echo.py', { background: true });
  });
  after(async () => {
    await sbx?.close();
    await server?.stop();
  });

  it('serves a dev server of an egress-off sandbox by API key, streaming, without handing it the key', async () => {
    const body = await until('the dev server', async () => {
      const res = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/`, { headers: auth });
      return res.status === 200 ? { text: await res.text(), csp: res.headers.get('content-security-policy') } : undefined;
    });
    assert.equal(body.text, '<h1>hello from the sandbox</h1>\n');
    assert.match(body.csp ?? '', /^sandbox /, 'the sandbox\'s page runs in an opaque origin');
    // Query strings pass; the Authorization header does not reach the sandbox (an echo of headers).
    await sbx.files.upload('/root/hdr.py', [
      'import http.server, json',
      'class H(http.server.BaseHTTPRequestHandler):',
      '    def do_GET(self):',
      '        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()',
      '        self.send_response(200); self.send_header("Set-Cookie", "stolen=1; Path=/")',
      '        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)',
      'http.server.HTTPServer(("127.0.0.1", 8001), H).serve_forever()',
    ].join('\n'));
    await sbx.commands.run('exec python3 /root/hdr.py', { background: true });
    const echoed = await until('the header echo', async () => {
      const res = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8001/proxy/a/b?x=1&y=2`, { headers: { ...auth, 'X-Custom': 'kept' } });
      return res.status === 200 ? { json: (await res.json()) as { path: string; headers: Record<string, string> }, cookie: res.headers.get('set-cookie') } : undefined;
    });
    assert.equal(echoed.json.path, '/a/b?x=1&y=2');
    assert.equal(echoed.json.headers['X-Custom'], 'kept');
    assert.equal(echoed.json.headers.Authorization, undefined, 'the API key must not reach the sandbox');
    assert.equal(echoed.json.headers.Host, 'localhost:8001');
    assert.equal(echoed.cookie, null, 'a sandbox may not set cookies on the server\'s origin');
  });

  it('hands out signed URLs (getHost) that work without the key, for that port only', async () => {
    const host = await sbx.getHost(8000);
    assert.match(host, new RegExp(`^127\\.0\\.0\\.1:${port}/v1/ports/`));
    const res = await fetch(`http://${host}/`);
    assert.equal(res.status, 200);
    assert.equal(await res.text(), '<h1>hello from the sandbox</h1>\n');
    const token = host.split('/').pop()!;
    const [id, p, exp, mac] = token.split('.');
    // Altered port, altered sandbox, altered expiry, garbage: 401, never a connection.
    for (const forged of [`${id}.8001.${exp}.${mac}`, `sbx_${'0'.repeat(32)}.${p}.${exp}.${mac}`, `${id}.${p}.${Number(exp) + 1}.${mac}`, 'nope', `${id}.${p}.${exp}.`]) {
      const r = await fetch(`${server.url}/v1/ports/${forged}/`);
      assert.equal(r.status, 401, forged);
      assert.match(((await r.json()) as { error: string }).error, /port URL/);
    }
  });

  it('refuses without the key, with another key, and for a foreign Host', async () => {
    assert.equal((await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/`)).status, 401);
    assert.equal((await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/`, { headers: { Authorization: 'Bearer wrong' } })).status, 401);
    // Another key's caller does not learn the sandbox exists.
    assert.equal((await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/`, { headers: { Authorization: `Bearer ${OTHER_KEY}` } })).status, 404);
    const foreign = await rawRequest(port, `GET /v1/sandboxes/${sbx.id}/ports/8000/proxy/ HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer ${KEY}\r\nConnection: close\r\n\r\n`);
    assert.match(foreign, /^HTTP\/1\.1 403/);
    // A web page of another origin: refused on the key route (on a keyless server it would need
    // nothing else); the signed URL, the route made for browsers, still answers it.
    const fromPage = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/`, { headers: { ...auth, Origin: 'http://evil.example' } });
    assert.equal(fromPage.status, 403);
    const signed = await sbx.getHost(8000);
    assert.equal((await fetch(`http://${signed}/`, { headers: { Origin: 'http://evil.example' } })).status, 200);
    const noServer = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/9/proxy/`, { headers: auth });
    assert.equal(noServer.status, 503);
  });

  it('never reaches the server\'s API through a port path, and does not let a second request be smuggled', async () => {
    const host = await sbx.getHost(8001);
    // Dot segments and encoded ones go to the sandbox as they are; the API never sees them.
    for (const rest of ['/../../sandboxes', '/%2e%2e/%2e%2e/sandboxes', '/..%2f..%2fsandboxes']) {
      const answer = await rawRequest(port, `GET /v1/ports/${host.split('/').pop()}${rest} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`);
      assert.match(answer, /^HTTP\/1\.1 200/, answer.slice(0, 200));
      assert.ok(answer.includes(`"path": "${rest}"`), `${rest} went to the sandbox: ${answer.slice(-300)}`);
    }
    const smuggled = await rawRequest(port,
      `POST /v1/ports/${host.split('/').pop()}/ HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n` +
      `0\r\n\r\nGET /v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`);
    assert.match(smuggled, /^HTTP\/1\.1 400/);
    assert.doesNotMatch(smuggled, /"sandboxes"/);
  });

  it('carries WebSockets, by key and by signed URL; refuses an upgrade without either', async () => {
    const ws = await until('the WebSocket echo server', () =>
      openWebSocket(port, `/v1/sandboxes/${sbx.id}/ports/8765/proxy/chat?room=1`, { Authorization: `Bearer ${KEY}`, Host: `127.0.0.1:${port}` }));
    ws.send('hello');
    assert.equal(await ws.next(), '/chat?room=1 hello');
    ws.send('again');
    assert.equal(await ws.next(), '/chat?room=1 again');
    ws.close();
    const signed = (await sbx.getHost(8765)).split('/').slice(1).join('/');
    const ws2 = await openWebSocket(port, `/${signed}/`);
    ws2.send('signed');
    assert.equal(await ws2.next(), '/ signed');
    ws2.close();
    await assert.rejects(openWebSocket(port, `/v1/sandboxes/${sbx.id}/ports/8765/proxy/`), (e: Error & { response?: string }) => /^HTTP\/1\.1 401/.test(e.response ?? ''));
    await assert.rejects(openWebSocket(port, '/v1/sandboxes'), (e: Error & { response?: string }) => /^HTTP\/1\.1 404/.test(e.response ?? ''));
  });

  it('the connector into a sandbox\'s network ends with the sandbox', async () => {
    const connectors = () => readdirSync('/proc').filter((n) => /^\d+$/.test(n)).filter((n) => {
      try { return readFileSync(`/proc/${n}/cmdline`, 'utf8').includes('port-connector-child'); } catch { return false; }
    });
    const mine = await Sandbox.create({ host: server.url, apiKey: KEY });
    const before = new Set(connectors());
    await mine.commands.run('exec python3 -m http.server 8002 --bind 127.0.0.1', { background: true });
    await until('its server', async () => ((await fetch(`http://${await mine.getHost(8002)}/`)).status === 200 ? true : undefined));
    const started = connectors().filter((n) => !before.has(n));
    assert.equal(started.length, 1, 'one connector for the sandbox');
    await mine.close();
    await until('the connector gone', async () => (connectors().includes(started[0]!) ? undefined : true), 10_000);
  });

  it('another sandbox cannot reach the port, nor the server', async () => {
    const other = await Sandbox.create({ host: server.url, apiKey: KEY });
    try {
      const probe = await other.runCode([
        'import socket',
        `for p in (8000, 8765, ${port}):`,
        '    s = socket.socket(); s.settimeout(3)',
        '    try:',
        '        s.connect(("127.0.0.1", p)); print(p, "open")',
        '    except OSError as e:',
        '        print(p, "closed")',
      ].join('\n'));
      assert.equal(probe.stdout, `8000 closed\n8765 closed\n${port} closed\n`);
      // And a token for one sandbox does not open another's port: the token names the sandbox.
      const res = await fetch(`${server.url}/v1/sandboxes/${other.id}/ports/8000/proxy/`, { headers: auth });
      assert.equal(res.status, 503, 'nothing listens on 8000 in the other sandbox');
    } finally {
      await other.close();
    }
  });
});
