/**
 * API hardening: a fuzz run of ≥ 10,000 random and malformed requests that must only ever get 4xx
 * answers (never a 5xx, a dropped connection or a crash); per-key rate limits and sandbox caps
 * (429 with Retry-After, typed in the SDK); ownership between two API keys; keys stored hashed.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NotFoundError, RateLimitError, Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

const FUZZ_REQUESTS = Number(process.env.PODFLARE_FUZZ_REQUESTS ?? 10_000);
const KEY = 'fuzz-key';
const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

/** A small seeded PRNG (mulberry32): a failing run can be replayed with PODFLARE_FUZZ_SEED. */
function prng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  return { next, int, pick };
}
type Rng = ReturnType<typeof prng>;

interface FuzzRequest {
  kind: string;
  method: string;
  path: string;
  headers?: Record<string, string | number>;
  body?: string | Buffer;
  /** Only the headers are sent (a Content-Length over the cap). */
  declaredOnly?: boolean;
  /** '4xx': malformed, must be refused. 'ok': may succeed, must not fail on our side (< 500). */
  expect: '4xx' | 'ok';
}

interface RawRequest {
  kind: string;
  /** Bytes sent as they are on a fresh connection. */
  raw: Buffer;
}

const randomText = (r: Rng, n: number) => {
  const alphabet = 'abc{}[]":,\\/\0\n\t\u00e9\u{1F600}0123456789 %.-_=&?#<>\'';
  return Array.from({ length: n }, () => r.pick([...alphabet])).join('');
};

function wrongValues(r: Rng): unknown {
  return r.pick<unknown>([null, true, -1, 0, 1.5, 1e308, -1e308, [], [1, 2], {}, { a: { b: 1 } }, ['../../etc/passwd']]);
}

/** Bodies that must be refused by each JSON endpoint: bad JSON, wrong shapes, wrong types, out of range. */
function badJsonBody(r: Rng, endpoint: 'create' | 'exec' | 'fork' | 'merge'): string {
  const choice = r.int(9);
  if (choice === 0) {
    const text = randomText(r, 1 + r.int(200)); // not JSON (or JSON of the wrong shape)
    return text.trim() === '{}' ? '{' : text; // `{}` would be a valid create
  }
  if (choice === 1) return JSON.stringify({ code: 'print(1)' }).slice(0, 1 + r.int(15)); // truncated
  if (choice === 2) return JSON.stringify(r.pick([[], [1], 42, 'str', null, true]));
  if (choice === 3) return '['.repeat(10_000 + r.int(50_000)) + ']'.repeat(r.int(10)); // deep nesting
  if (choice === 4) return JSON.stringify({ [`unknown_${r.int(1000)}`]: wrongValues(r) }); // unknown field
  const fields: Record<string, () => Record<string, unknown>> = {
    create: () => r.pick([
      { template: wrongValues(r) }, { egress: r.pick(['yes', 1, null]) }, { idle_timeout_seconds: r.pick([0, -5, 1.5, 1e12, '60']) },
      { max_lifetime_seconds: r.pick([0, 1e12, 'x']) }, { runtime: r.pick(['docker', 1, '']) },
      { metadata: r.pick(['x', [1], { a: 1 }, Object.fromEntries(Array.from({ length: 65 + r.int(100) }, (_, i) => [`k${i}`, 'v'])), { ['k'.repeat(65)]: 'v' }]) },
      { template: '../../etc' }, { template: 'default', unknown_field: 1 },
    ]),
    exec: () => r.pick([
      {}, { code: wrongValues(r) }, { code: 'print(1)', language: r.pick(['ruby', '', 1, null]) },
      { code: 'print(1)', timeout_ms: r.pick([0, -1, 1.5, 1e12, '100']) }, { code: 'x', env: r.pick(['A=1', [1], { 'A=B': 'x' }, { A: 1 }, { '': 'x' }]) },
      { code: 'x', env: Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [`V${i}`, 'v'])) },
      { code: 'x', cwd: r.pick(['', 1, 'a\u0000b', 'x'.repeat(5000)]) }, { code: 'x', extra: true },
    ]),
    fork: () => r.pick([{ n: r.pick([0, -1, 33, 1000, 1.5, '2', null, [1]]) }, { n: 1, x: 1 }]),
    merge: () => r.pick([{ paths: r.pick(['x', [], [1], [''], ['x'.repeat(5000)], null]) }, { paths: ['/a'], other: 1 }]),
  };
  return JSON.stringify(fields[endpoint]!());
}

function randomId(r: Rng): string {
  return r.pick([
    'sbx_' + randomBytes(16).toString('hex'), // well formed, unknown
    'sbx_' + randomBytes(8).toString('hex'), 'nope', 'sbx_' + 'G'.repeat(32), '..', '%2e%2e', '%2e%2e%2f%2e%2e%2fetc',
    '%E0%A4%A', '%', '%00', encodeURIComponent(randomText(r, 1 + r.int(20))), 'x'.repeat(300),
  ]);
}

/** One random request; `live` is a real sandbox of the fuzzing key, `hostMarker` a host file it must never see. */
function fuzzRequest(r: Rng, live: string, hostMarker: string): FuzzRequest {
  const auth = { authorization: `Bearer ${KEY}` };
  const json = { ...auth, 'content-type': 'application/json' };
  switch (r.int(13)) {
    case 0:
      return { kind: 'create: bad body', method: 'POST', path: '/v1/sandboxes', headers: json, body: badJsonBody(r, 'create'), expect: '4xx' };
    case 1:
      return { kind: 'exec: bad body', method: 'POST', path: `/v1/sandboxes/${r.pick([live, randomId(r)])}/exec`, headers: json, body: badJsonBody(r, 'exec'), expect: '4xx' };
    case 2:
      return { kind: 'fork/merge: bad body', method: 'POST', path: r.pick([`/v1/sandboxes/${live}/fork`, `/v1/sandboxes/${live}/merge_into/${randomId(r)}`]), headers: json,
        body: r.next() < 0.5 ? badJsonBody(r, 'fork') : badJsonBody(r, 'merge'), expect: '4xx' };
    case 3: {
      const method = r.pick(['GET', 'DELETE', 'POST']);
      const id = randomId(r);
      const sub = r.pick(['', '/exec', '/fork', '/interrupt', '/files?path=/x', '/files/list?path=/', `/diff/${randomId(r)}`]);
      // DELETE of a well-formed unknown id is a 204: deleting is idempotent (docs/api.md).
      // (`…/diff/..` is the same path once the URL is normalised.)
      const path = `/v1/sandboxes/${id}${sub}`;
      const idempotent = method === 'DELETE' && new RegExp(`^/v1/sandboxes/${SANDBOX_ID_SOURCE}/?$`).test(new URL(path, 'http://x').pathname);
      return { kind: 'unknown or malformed id', method, path, headers: json, body: JSON.stringify({ code: '1' }), expect: idempotent ? 'ok' : '4xx' };
    }
    case 4: {
      // File paths inside the sandbox: traversal toward a host file, NUL, over-long, empty, directories.
      const p = r.pick([
        `${'../'.repeat(1 + r.int(12))}${hostMarker.slice(1)}`, `/../../..${hostMarker}`, hostMarker, `/root/${'a'.repeat(4097)}`, '', 'a%00b', `%2e%2e/%2e%2e${hostMarker}`,
      ]);
      const op = r.pick(['GET /files', 'GET /files/stat', 'GET /files/list', 'DELETE /files']);
      const [method, sub] = op.split(' ') as [string, string];
      return { kind: 'file path traversal', method, path: `/v1/sandboxes/${live}${sub}?path=${p.includes('%') ? p : encodeURIComponent(p)}`, headers: auth, expect: '4xx' };
    }
    case 5:
      return { kind: 'upload to a bad place', method: 'PUT', path: `/v1/sandboxes/${live}/files?path=${encodeURIComponent(r.pick(['/', '/proc/sys/kernel/hostname', '/proc/1/mem', '/proc/self/status', '', '/root/\u0000x', `/root/${'d'.repeat(300)}`]))}`,
        headers: auth, body: randomBytes(r.int(2048)), expect: '4xx' };
    case 6:
      return { kind: 'bad query', method: 'GET', path: r.pick([
        `/v1/sandboxes?state=${encodeURIComponent(randomText(r, 5))}`, `/v1/sandboxes?ancestor=${r.pick(['nope', 'sbx_1', '%00'])}`, '/v1/sandboxes?all=maybe',
        `/v1/sandboxes/${live}/diff/${live}?paths=relative/path`, `/v1/sandboxes/${live}/diff/${live}?paths=/a/../b`, `/v1/sandboxes/${live}/diff/${live}?content=2`,
        `/v1/sandboxes/${live}/files?path=/root&recursive=sometimes`, `/v1/sandboxes/${live}/events?after=${r.pick(['x', '-2', '1e3', '9'.repeat(20)])}`,
      ]), headers: auth, expect: '4xx' };
    case 7:
      return { kind: 'wrong method', method: r.pick(['PATCH', 'PUT', 'OPTIONS', 'TRACE', 'PROPFIND', 'DELETE']), path: r.pick(['/v1/sandboxes', `/v1/sandboxes/${live}/exec`, '/v1/healthz', '/v1/capacity', `/v1/sandboxes/${live}/fork`]),
        headers: auth, expect: '4xx' };
    case 8:
      return { kind: 'unknown path', method: r.pick(['GET', 'POST']), path: r.pick(['/v2/sandboxes', '/v1', '/ui/..%2f..%2fetc%2fpasswd', '/ui/%2e%2e/%2e%2e/etc/passwd', `/ui/${randomText(r, 8).replace(/[^a-z.]/g, '')}.exe`, `/v1/${randomText(r, 10).replace(/[^a-z0-9]/g, 'x')}`, '/v1/sandboxes/../../etc/passwd', '/%2e%2e/%2e%2e/etc/passwd', `/v1/sandboxes/${live}/files/../../../etc`]),
        headers: auth, expect: '4xx' };
    case 9:
      return { kind: 'bad auth', method: 'GET', path: r.pick(['/v1/sandboxes', `/v1/sandboxes/${live}`, '/v1/capacity']),
        headers: { authorization: r.pick(['', 'Bearer', 'Bearer ', 'Basic Zm9vOmJhcg==', `Bearer ${KEY}x`, `Bearer ${'k'.repeat(600)}`, `bearer  ${KEY.toUpperCase()}`, 'Bearer a b']) }, expect: '4xx' };
    case 10:
      return { kind: 'body over the cap (declared)', method: 'POST', path: r.pick(['/v1/sandboxes', `/v1/sandboxes/${live}/exec`]),
        headers: { ...json, 'content-length': 8 * 1024 * 1024 + 1 + r.int(1e9) }, declaredOnly: true, expect: '4xx' };
    case 12:
      return { kind: 'JSON endpoint, other content type', method: 'POST', path: r.pick(['/v1/sandboxes', `/v1/sandboxes/${live}/exec`, `/v1/sandboxes/${live}/fork`]),
        headers: { ...auth, 'content-type': r.pick(['text/html', 'multipart/form-data; boundary=x', 'application/xml', 'image/png']) }, body: JSON.stringify({ code: 'print(1)' }), expect: '4xx' };
    default:
      return { kind: 'valid-looking reads', method: 'GET', path: r.pick(['/v1/sandboxes', `/v1/sandboxes/${live}`, '/v1/capacity', `/v1/sandboxes/${live}/files/stat?path=/root`]), headers: auth, expect: 'ok' };
  }
}

/** Requests Node's own client refuses to send: raw bytes on a fresh socket. */
function rawRequest(r: Rng, port: number, live: string): RawRequest {
  const host = `Host: 127.0.0.1:${port}\r\n`;
  const auth = `Authorization: Bearer ${KEY}\r\n`;
  const pick = r.int(8);
  const texts = [
    `GET /v1/sandboxes HTTP/1.1\r\n${host}${auth}X-Big: ${'a'.repeat(20_000)}\r\n\r\n`, // header over the cap → 431
    `GET /v1/sandboxes HTTP/1.1\r\n${host}${auth}Bad Header: x\r\n\r\n`,
    `POST /v1/sandboxes/${live}/exec HTTP/1.1\r\n${host}${auth}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`,
    `POST /v1/sandboxes HTTP/1.1\r\n${host}${auth}Content-Length: -1\r\n\r\n`,
    `POST /v1/sandboxes HTTP/1.1\r\n${host}${auth}Transfer-Encoding: chunked\r\n\r\nzz\r\n`,
    `GET http://evil.example/v1/sandboxes HTTP/1.1\r\n${host}${auth}\r\n\r\n`,
    `GET //v1/sandboxes HTTP/1.1\r\n${host}${auth}\r\n\r\n`,
    `${randomText(r, 30).replace(/[\r\n]/g, '')} / HTTP/1.1\r\n\r\n`,
  ];
  return { kind: `raw #${pick}`, raw: Buffer.from(texts[pick]!, 'latin1') };
}

function send(agent: http.Agent, port: number, req: FuzzRequest): Promise<number> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> = { ...req.headers };
    // Node sends a GET's or DELETE's body without framing unless told its length.
    if (req.body !== undefined && headers['content-length'] === undefined) headers['content-length'] = Buffer.byteLength(req.body);
    const r = http.request({ host: '127.0.0.1', port, method: req.method, path: req.path, agent, headers }, (res) => {
      res.resume();
      res.once('end', () => resolve(res.statusCode ?? 0));
      res.once('error', reject);
    });
    r.once('error', reject);
    if (req.declaredOnly) r.flushHeaders(); // a declared length over the cap is answered before any body is sent
    else r.end(req.body);
  });
}

/** Sends raw bytes; resolves to the status of the answer (0 when the server closed without one). */
function sendRaw(port: number, req: RawRequest): Promise<number> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let data = '';
    socket.setTimeout(10_000, () => socket.destroy());
    socket.on('data', (d) => {
      data += d.toString('latin1');
      const m = /^HTTP\/1\.1 (\d{3})/.exec(data);
      if (m) { socket.destroy(); resolve(Number(m[1])); }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(data)?.[1] ?? 0)));
    socket.end(req.raw);
  });
}

describe('API hardening: fuzz', () => {
  let server: TestServer;
  let live: string;
  const hostMarker = `/tmp/pf-host-marker-${randomBytes(6).toString('hex')}`;

  before(async () => {
    // Rate limits off: the fuzz itself sends far more than a key may by default.
    server = await startTestServer({ apiKeys: [KEY], poolSize: 1, rateLimitPerSecond: 0 });
    live = (await Sandbox.create({ host: server.url, apiKey: KEY })).id;
  });
  after(async () => server?.stop());

  it(`answers ${FUZZ_REQUESTS} random and malformed requests with 4xx only, and keeps serving`, async () => {
    const seed = Number(process.env.PODFLARE_FUZZ_SEED ?? Date.now() % 1e9);
    const r = prng(seed);
    const port = Number(new URL(server.url).port);
    const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
    const byKind = new Map<string, Map<number, number>>();
    const failures: string[] = [];
    let sent = 0;
    const note = (kind: string, status: number) => {
      const m = byKind.get(kind) ?? new Map<number, number>();
      m.set(status, (m.get(status) ?? 0) + 1);
      byKind.set(kind, m);
    };
    const worker = async () => {
      while (sent < FUZZ_REQUESTS) {
        sent++;
        if (r.next() < 0.04) {
          const raw = rawRequest(r, port, live);
          const status = await sendRaw(port, raw);
          note(raw.kind, status);
          if (!(status >= 400 && status < 500)) failures.push(`${raw.kind}: ${status} for ${JSON.stringify(raw.raw.toString('latin1').slice(0, 120))}`);
          continue;
        }
        const req = fuzzRequest(r, live, hostMarker);
        let status: number;
        try {
          status = await send(agent, port, req);
        } catch (err) {
          failures.push(`${req.kind}: ${req.method} ${req.path.slice(0, 120)}: ${(err as Error).message}`);
          continue;
        }
        note(req.kind, status);
        const ok = req.expect === '4xx' ? status >= 400 && status < 500 : status < 500;
        if (!ok) failures.push(`${req.kind}: ${req.method} ${req.path.slice(0, 120)} body ${String(req.body ?? '').slice(0, 80)} → ${status}`);
      }
    };
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 16 }, worker));
    agent.destroy();
    const summary = [...byKind].map(([k, m]) => `${k}: ${[...m].map(([s, n]) => `${s}×${n}`).join(' ')}`).join('\n  ');
    console.log(`fuzz: ${sent} requests in ${((performance.now() - t0) / 1000).toFixed(1)} s (seed ${seed})\n  ${summary}`);
    assert.ok(sent >= FUZZ_REQUESTS);
    assert.deepEqual(failures.slice(0, 20), [], `${failures.length} requests failed (seed ${seed})`);
    // Every kind of request was tried, and the server still serves: health, and a real exec.
    assert.ok(byKind.size >= 13, `kinds tried: ${[...byKind.keys()].join(', ')}`);
    assert.equal((await fetch(`${server.url}/v1/healthz`)).status, 200);
    const sbx = await Sandbox.connect(live, { host: server.url, apiKey: KEY });
    assert.equal((await sbx.runCode('print(6*7)')).stdout, '42\n');
    await sbx.close();
  });
});

describe('API hardening: rate limits and caps', () => {
  let limited: TestServer;
  let capped: TestServer;
  const KEY_C_DIGEST = sha256('key-c');

  before(async () => {
    [limited, capped] = await Promise.all([
      startTestServer({ apiKeys: ['key-a', 'key-b'], poolSize: 0, rateLimitPerSecond: 2, rateLimitBurst: 5 }),
      // key-c is configured by its digest only: the server never holds it in the clear.
      startTestServer({ apiKeys: ['key-a', 'key-b', `sha256:${KEY_C_DIGEST}`], poolSize: 1, rateLimitPerSecond: 0, maxSandboxesPerKey: 2, maxSandboxes: 3 }),
    ]);
  });
  after(async () => Promise.all([limited?.stop(), capped?.stop()]));

  it('answers 429 with Retry-After once a key exceeds its rate, per key, and health stays exempt', async () => {
    const get = (key: string) => fetch(`${limited.url}/v1/sandboxes`, { headers: { authorization: `Bearer ${key}` } });
    const statuses: number[] = [];
    let limitedRes: Response | undefined;
    // Twenty requests would take ten seconds at the sustained rate: one of them is refused.
    for (let i = 0; i < 20 && !limitedRes; i++) {
      const res = await get('key-a');
      statuses.push(res.status);
      if (res.status === 429) limitedRes = res;
      else await res.text();
    }
    assert.deepEqual(statuses.slice(0, 5), [200, 200, 200, 200, 200], 'the burst passes');
    assert.ok(limitedRes, `no 429 in ${statuses.join(' ')}`);
    const retryAfter = Number(limitedRes.headers.get('retry-after'));
    assert.ok(retryAfter >= 1 && retryAfter <= 2, `Retry-After ${retryAfter}`);
    const body = (await limitedRes.json()) as { code: string; error: string };
    assert.equal(body.code, 'rate_limited');
    assert.match(body.error, /2 per second/);
    assert.equal((await fetch(`${limited.url}/v1/healthz`)).status, 200);
    assert.equal((await get('key-b')).status, 200, 'another key has its own bucket');
    // The SDK turns it into a RateLimitError that says how long to wait.
    const err = await Sandbox.list({ host: limited.url, apiKey: 'key-a' }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof RateLimitError, `got ${String(err)}`);
    assert.ok(err.retryable && err.retryAfterMs! >= 1000);
    // Waiting as told is enough.
    await new Promise((r) => setTimeout(r, err.retryAfterMs!));
    assert.equal((await get('key-a')).status, 200);
  });

  it('caps live sandboxes per key and server-wide with 429 + Retry-After, forks included', async () => {
    const opts = (apiKey: string) => ({ host: capped.url, apiKey });
    // Four creates at once cannot overshoot the per-key cap of two: exactly two get through.
    const settled = await Promise.allSettled([0, 1, 2, 3].map(() => Sandbox.create(opts('key-a'))));
    const made = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    try {
      assert.equal(made.length, 2, 'two creates succeed');
      for (const r of settled) if (r.status === 'rejected') assert.ok(r.reason instanceof RateLimitError, `got ${String(r.reason)}`);
      const [a1, a2] = made as [Sandbox, Sandbox];
      const perKey = await Sandbox.create(opts('key-a')).then(() => null, (e: unknown) => e);
      assert.ok(perKey instanceof RateLimitError, `got ${String(perKey)}`);
      assert.match(perKey.message, /this API key has 2 live sandboxes and may have 2/);
      assert.equal(perKey.status, 429);
      assert.equal(perKey.retryAfterMs, 5000);
      await assert.rejects(a1.fork(1), RateLimitError, 'a fork counts against its owner');
      // key-c (configured as a digest) gets the last server-wide slot; then the server is full for everyone.
      const c1 = await Sandbox.create(opts('key-c'));
      made.push(c1);
      const full = await Sandbox.create(opts('key-b')).then(() => null, (e: unknown) => e);
      assert.ok(full instanceof RateLimitError);
      assert.match(full.message, /the server runs 3 sandboxes and allows 3/);
      // Freeing one makes room again.
      await a2.close();
      made.push(await Sandbox.create(opts('key-b')));
    } finally {
      await Promise.all(made.map((s) => s.close()));
    }
  });
});

describe('API hardening: ownership', () => {
  let server: TestServer;
  before(async () => {
    server = await startTestServer({ apiKeys: ['owner-key-a', 'owner-key-b'], poolSize: 1 });
  });
  after(async () => server?.stop());

  it('lets a key see and touch only its own sandboxes and their descendants; stores owners hashed', async () => {
    const A = { host: server.url, apiKey: 'owner-key-a' };
    const B = { host: server.url, apiKey: 'owner-key-b' };
    const a = await Sandbox.create(A);
    const b = await Sandbox.create(B);
    try {
      await a.runCode('secret = "of a"');
      const [child] = await a.fork(1);
      // A sees its sandbox and the fork's child, B neither.
      const listedA = (await Sandbox.list(A)).map((s) => s.id);
      assert.ok(listedA.includes(a.id) && listedA.includes(child!.id) && !listedA.includes(b.id));
      const listedB = (await Sandbox.list(B)).map((s) => s.id);
      assert.deepEqual(listedB, [b.id]);
      const call = (method: string, p: string, body?: unknown) =>
        fetch(server.url + p, { method, headers: { authorization: 'Bearer owner-key-b', 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
      for (const id of [a.id, child!.id]) {
        const attempts: Array<[string, string, unknown?]> = [
          ['GET', `/v1/sandboxes/${id}`], ['POST', `/v1/sandboxes/${id}/exec`, { code: 'print(secret)' }],
          ['POST', `/v1/sandboxes/${id}/fork`, { n: 1 }], ['POST', `/v1/sandboxes/${id}/interrupt`],
          ['GET', `/v1/sandboxes/${id}/files?path=/etc/hostname`], ['GET', `/v1/sandboxes/${id}/files/list?path=/root`],
          ['PUT', `/v1/sandboxes/${id}/files?path=/root/x`, 'planted'], ['GET', `/v1/sandboxes/${b.id}/diff/${id}`],
          ['GET', `/v1/sandboxes/${id}/diff/${b.id}`], ['POST', `/v1/sandboxes/${a.id}/merge_into/${child!.id}`],
          ['GET', `/v1/sandboxes/${id}/execs`], ['GET', `/v1/sandboxes/${id}/events`],
          ['GET', `/v1/sandboxes?ancestor=${id}&all=1`],
        ];
        for (const [method, p, body] of attempts) {
          const res = await call(method, p, body);
          const text = await res.text();
          if (p.startsWith('/v1/sandboxes?')) assert.deepEqual(JSON.parse(text), { sandboxes: [] }, `${method} ${p}`);
          else assert.equal(res.status, 404, `${method} ${p} by another key: ${res.status} ${text}`);
        }
        // DELETE is idempotent (204 for unknown ids), so it answers as for an unknown id — and destroys nothing.
        assert.equal((await call('DELETE', `/v1/sandboxes/${id}`)).status, 204);
      }
      await assert.rejects(Sandbox.connect(a.id, B), NotFoundError);
      // A's sandboxes are untouched by all of that.
      assert.equal((await a.runCode('print(secret)')).stdout, 'of a\n');
      assert.equal((await child!.runCode('print(secret)')).stdout, 'of a\n');
      assert.equal(await a.files.exists('/root/x'), false, "B's upload did not land");
      // The store knows owners by key digest only.
      const dbFile = path.join(server.stateDir, 'podflare.db');
      const Database = (await import('better-sqlite3')).default;
      const db = new Database(dbFile, { readonly: true });
      try {
        const owners = db.prepare('SELECT id, owner FROM sandboxes WHERE id IN (?, ?, ?)').all(a.id, child!.id, b.id) as Array<{ id: string; owner: string }>;
        const ownerOf = new Map(owners.map((o) => [o.id, o.owner]));
        assert.equal(ownerOf.get(a.id), sha256('owner-key-a'));
        assert.equal(ownerOf.get(child!.id), sha256('owner-key-a'));
        assert.equal(ownerOf.get(b.id), sha256('owner-key-b'));
      } finally {
        db.close();
      }
      for (const f of [dbFile, `${dbFile}-wal`]) {
        let bytes = '';
        try { bytes = readFileSync(f, 'latin1'); } catch { /* no WAL */ }
        assert.ok(!bytes.includes('owner-key-a') && !bytes.includes('owner-key-b'), `${path.basename(f)} holds no key in the clear`);
      }
      await child!.close();
    } finally {
      await a.close();
      await b.close();
    }
  });
});
