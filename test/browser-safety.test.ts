/**
 * A keyless server on loopback (the default `podflare serve`) against a hostile web page: DNS
 * rebinding (a foreign Host), cross-site requests (a foreign Origin, form posts that need no CORS
 * preflight) and JSON smuggled in under other content types. Requests go to 127.0.0.1 only, with
 * the Host header written by hand: no name is ever resolved.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, it } from 'node:test';
import { loadConfig } from '@podflare/server';
import { serveOverrides } from '../packages/cli/src/commands/serve.js';
import { startTestServer, type TestServer } from './helpers/server.js';

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  json: { error?: string; code?: string; id?: string; sandboxes?: unknown[] };
}

/** One request to the server at 127.0.0.1, with exactly these headers (Host included). */
function send(port: number, method: string, path: string, headers: Record<string, string>, body?: string): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const all: Record<string, string | number> = { ...headers };
    if (body !== undefined) all['content-length'] = Buffer.byteLength(body);
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: all, setHost: false, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { text += d; });
      res.on('end', () => {
        let json = {};
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, json });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('a keyless server against web pages', () => {
  let server: TestServer;
  let port: number;
  let local: string; // Host: 127.0.0.1:<port>
  const created: string[] = [];

  /** Every sandbox the server knows of (destroyed ones too): what a successful attack would add to. */
  const sandboxCount = async () => (await send(port, 'GET', '/v1/sandboxes?all=1', { host: local })).json.sandboxes!.length;

  before(async () => {
    server = await startTestServer({ poolSize: 0, allowedHosts: ['podflare.example.test'], allowedOrigins: ['https://app.example.test'] });
    port = Number(new URL(server.url).port);
    local = `127.0.0.1:${port}`;
  });
  after(async () => {
    for (const id of created) await send(port, 'DELETE', `/v1/sandboxes/${id}`, { host: local });
    await server?.stop();
  });

  it('refuses a Host it does not serve (DNS rebinding), saying how to allow it', async () => {
    for (const host of ['attacker.example', `attacker.example:${port}`, `localhost.attacker.example:${port}`, 'localhost.', '']) {
      const r = await send(port, 'GET', '/v1/sandboxes', { host });
      assert.equal(r.status, 403, host);
      assert.equal(r.json.code, 'forbidden', host);
      assert.match(r.json.error!, /--allowed-host/, host);
    }
    const r = await send(port, 'GET', '/v1/healthz', { host: 'attacker.example' });
    assert.equal(r.status, 403);
    assert.match((await send(port, 'GET', '/v1/sandboxes', { host: 'attacker.example' })).json.error!, /Host "attacker\.example"/);
    // Creating through a rebound name creates nothing.
    const before = await sandboxCount();
    const create = await send(port, 'POST', '/v1/sandboxes', { host: `attacker.example:${port}`, 'content-type': 'application/json' }, '{}');
    assert.equal(create.status, 403);
    assert.equal(await sandboxCount(), before);
  });

  it('answers loopback names, IP literals and configured names', async () => {
    const hosts = [`localhost:${port}`, local, `[::1]:${port}`, `dash.localhost:${port}`, '10.1.2.3', 'podflare.example.test', 'PODFLARE.example.test:443'];
    for (const host of hosts) {
      const r = await send(port, 'GET', '/v1/sandboxes', { host });
      assert.equal(r.status, 200, host);
    }
  });

  it('creates nothing for a cross-site form post (no CORS preflight), whatever the encoding', async () => {
    const before = await sandboxCount();
    const attacks: Array<[string, string]> = [
      ['application/x-www-form-urlencoded', '{"template":"default"}'],
      ['text/plain', '{"template":"default","x":"="}'], // <form enctype="text/plain">: JSON from a field name
      ['multipart/form-data; boundary=x', '--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n{}\r\n--x--\r\n'],
    ];
    for (const [type, body] of attacks) {
      for (const origin of ['http://evil.example', 'null']) {
        const r = await send(port, 'POST', '/v1/sandboxes', { host: local, origin, 'content-type': type }, body);
        assert.equal(r.status, 403, `${type} from ${origin}`);
        assert.match(r.json.error!, /cross-origin request/);
      }
    }
    // An empty form post (a sandbox with every default) the same.
    const form = { host: local, origin: 'http://evil.example', 'content-type': 'application/x-www-form-urlencoded' };
    assert.equal((await send(port, 'POST', '/v1/sandboxes', form, '')).status, 403);
    assert.equal(await sandboxCount(), before);
  });

  it('refuses cross-origin JSON requests and reads, and answers preflights only for allowed origins', async () => {
    const before = await sandboxCount();
    const json = { host: local, 'content-type': 'application/json' };
    assert.equal((await send(port, 'POST', '/v1/sandboxes', { ...json, origin: 'http://evil.example' }, '{}')).status, 403);
    // A rebinding page's origin names the same port but another host: not the server's own.
    assert.equal((await send(port, 'POST', '/v1/sandboxes', { ...json, origin: `http://attacker.example:${port}` }, '{}')).status, 403);
    const read = await send(port, 'GET', '/v1/sandboxes', { host: local, origin: 'http://evil.example' });
    assert.equal(read.status, 403);
    assert.equal(read.headers['access-control-allow-origin'], undefined);
    const preflight = await send(port, 'OPTIONS', '/v1/sandboxes', { host: local, origin: 'http://evil.example', 'access-control-request-method': 'POST' });
    assert.equal(preflight.status, 403);
    assert.equal(preflight.headers['access-control-allow-origin'], undefined);
    assert.equal(await sandboxCount(), before);
  });

  it('serves its own origin (the dashboard) and configured origins, with CORS for the latter', async () => {
    for (const [host, origin] of [[local, `http://${local}`], [`localhost:${port}`, `http://localhost:${port}`]] as const) {
      const r = await send(port, 'POST', '/v1/sandboxes', { host, origin, 'content-type': 'application/json' }, '{}');
      assert.equal(r.status, 201, origin);
      created.push(r.json.id!);
      assert.equal(r.headers['access-control-allow-origin'], undefined); // same origin needs no CORS
    }
    const allowed = 'https://app.example.test';
    const preflight = await send(port, 'OPTIONS', '/v1/sandboxes', {
      host: local, origin: allowed, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type, authorization',
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers['access-control-allow-origin'], allowed);
    assert.match(String(preflight.headers['access-control-allow-methods']), /POST/);
    assert.match(String(preflight.headers['access-control-allow-headers']), /Content-Type/i);
    const r = await send(port, 'POST', '/v1/sandboxes', { host: local, origin: allowed, 'content-type': 'application/json' }, '{}');
    assert.equal(r.status, 201);
    created.push(r.json.id!);
    assert.equal(r.headers['access-control-allow-origin'], allowed);
    assert.equal(r.headers.vary, 'Origin');
  });

  it('takes JSON bodies only as application/json (415 otherwise, even without an Origin)', async () => {
    const id = created[0]!;
    const body = JSON.stringify({ code: 'print(6 * 7)' });
    for (const type of ['text/plain', 'text/plain;charset=UTF-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', undefined]) {
      const headers: Record<string, string> = { host: local };
      if (type !== undefined) headers['content-type'] = type;
      const r = await send(port, 'POST', `/v1/sandboxes/${id}/exec`, headers, body);
      assert.equal(r.status, 415, String(type));
      assert.equal(r.json.code, 'unsupported_media_type');
      assert.match(r.json.error!, /Content-Type: application\/json/);
    }
    const ok = await send(port, 'POST', `/v1/sandboxes/${id}/exec`, { host: local, 'content-type': 'application/json; charset=utf-8' }, body);
    assert.equal(ok.status, 200);
    // No body at all needs no type.
    const bare = await send(port, 'POST', '/v1/sandboxes', { host: local });
    assert.equal(bare.status, 201);
    created.push(bare.json.id!);
  });
});

describe('allowed hosts and origins configuration', () => {
  it('comes from the environment or repeatable CLI flags, normalized, and refuses what is not a name or an origin', () => {
    const env = { PODFLARE_ALLOWED_HOSTS: 'Sandbox.Example.com, api.example.com.', PODFLARE_ALLOWED_ORIGINS: 'https://App.example.com:443/' };
    const config = loadConfig({}, env);
    assert.deepEqual(config.allowedHosts, ['sandbox.example.com', 'api.example.com']);
    assert.deepEqual(config.allowedOrigins, ['https://app.example.com']);
    const flags = serveOverrides({ 'allowed-host': ['a.example.com,b.example.com', 'c.example.com'], 'allowed-origin': ['http://localhost:5173'] }, 'serve');
    assert.deepEqual(flags.allowedHosts, ['a.example.com', 'b.example.com', 'c.example.com']);
    assert.deepEqual(loadConfig(flags, {}).allowedOrigins, ['http://localhost:5173']);
    assert.throws(() => loadConfig({}, { PODFLARE_ALLOWED_HOSTS: 'example.com:8080' }), /allowed host.*not a host name/);
    assert.throws(() => loadConfig({}, { PODFLARE_ALLOWED_HOSTS: '*' }), /allowed host/);
    assert.throws(() => loadConfig({ allowedOrigins: ['*'] }, {}), /allowed origin/);
    assert.throws(() => loadConfig({ allowedOrigins: ['https://app.example.com/path'] }, {}), /not an origin/);
  });
});
