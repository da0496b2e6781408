/** Bad input gets clear 4xx answers naming the problem; auth; lifecycle and leak checks. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { AuthenticationError, NotFoundError, Sandbox, SandboxGoneError } from 'podflare';
import { bwrapProcesses, overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer, type TestServer, useServerAndSandbox } from './helpers/server.js';

async function call(base: string, method: string, path: string, body?: string, headers: Record<string, string> = {}) {
  const res = await fetch(base + path, { method, body, headers: { 'content-type': 'application/json', ...headers } });
  const text = await res.text();
  let json: { error?: string; code?: string; field?: string } = {};
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, json, text };
}

describe('API input checking', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  useServerAndSandbox((s, b) => { server = s; sbx = b; });

  it('answers health without auth and capacity with pool counters', async () => {
    assert.equal((await call(server.url, 'GET', '/v1/healthz')).text, 'ok');
    const cap = await call(server.url, 'GET', '/v1/capacity');
    assert.equal(cap.status, 200);
    assert.equal(typeof (cap.json as { pool: { ready: number } }).pool.ready, 'number');
  });

  it('answers 404 for an unknown sandbox and 400 for a malformed id', async () => {
    const unknown = 'sbx_' + '0'.repeat(32);
    const r = await call(server.url, 'POST', `/v1/sandboxes/${unknown}/exec`, JSON.stringify({ code: '1' }));
    assert.equal(r.status, 404);
    assert.equal(r.json.code, 'not_found');
    assert.match(r.json.error!, /not found/);
    const bad = await call(server.url, 'GET', '/v1/sandboxes/nope');
    assert.equal(bad.status, 400);
    await assert.rejects(Sandbox.connect(unknown, { host: server.url }), NotFoundError);
  });

  it('answers 400 naming the field for malformed JSON, a missing code, a bad language', async () => {
    const base = `/v1/sandboxes/${sbx.id}/exec`;
    const malformed = await call(server.url, 'POST', base, '{"code": ');
    assert.equal(malformed.status, 400);
    assert.match(malformed.json.error!, /JSON/);
    const missing = await call(server.url, 'POST', base, JSON.stringify({ language: 'python' }));
    assert.equal(missing.status, 400);
    assert.equal(missing.json.field, 'code');
    const language = await call(server.url, 'POST', base, JSON.stringify({ code: '1', language: 'cobol' }));
    assert.equal(language.status, 400);
    assert.equal(language.json.field, 'language');
    const wrongType = await call(server.url, 'POST', '/v1/sandboxes', JSON.stringify({ egress: 'yes' }));
    assert.equal(wrongType.status, 400);
    assert.equal(wrongType.json.field, 'egress');
    const unknownField = await call(server.url, 'POST', '/v1/sandboxes', JSON.stringify({ colour: 'red' }));
    assert.equal(unknownField.status, 400);
    assert.match(unknownField.json.error!, /colour/);
    const route = await call(server.url, 'GET', '/v1/nothing-here');
    assert.equal(route.status, 404);
    const method = await call(server.url, 'PATCH', '/v1/sandboxes');
    assert.equal(method.status, 405);
    const huge = await call(server.url, 'POST', '/v1/sandboxes', JSON.stringify({ metadata: { k: 'x'.repeat(9 * 1024 * 1024) } }));
    assert.equal(huge.status, 413);
  });

  it('answers 410 for exec on a destroyed sandbox, and DELETE is idempotent', async () => {
    const doomed = await Sandbox.create({ host: server.url });
    await doomed.close();
    await doomed.close();
    const again = await call(server.url, 'DELETE', `/v1/sandboxes/${doomed.id}`);
    assert.equal(again.status, 204);
    const r = await call(server.url, 'POST', `/v1/sandboxes/${doomed.id}/exec`, JSON.stringify({ code: '1' }));
    assert.equal(r.status, 410);
    assert.equal(r.json.code, 'sandbox_gone');
    const info = await call(server.url, 'GET', `/v1/sandboxes/${doomed.id}`);
    assert.equal((info.json as { state: string }).state, 'stopped');
    const stale = await Sandbox.connect(sbx.id, { host: server.url });
    assert.equal(stale.id, sbx.id);
  });

  it('lists sandboxes and shows one', async () => {
    const list = await Sandbox.list({ host: server.url });
    assert.ok(list.some((s) => s.id === sbx.id));
    const info = await sbx.info();
    assert.equal(info.state, 'ready');
    assert.equal(info.parent, null);
  });
});

describe('auth', () => {
  let server: TestServer;

  before(async () => {
    server = await startTestServer({ apiKeys: ['key-one', 'key-two'], poolSize: 1 });
  });
  after(async () => server?.stop());

  it('requires a key on /v1 except healthz, and keeps sandboxes per key', async () => {
    assert.equal((await call(server.url, 'GET', '/v1/healthz')).status, 200);
    const none = await call(server.url, 'GET', '/v1/sandboxes');
    assert.equal(none.status, 401);
    assert.equal(none.json.code, 'unauthorized');
    const wrong = await call(server.url, 'GET', '/v1/sandboxes', undefined, { authorization: 'Bearer nope' });
    assert.equal(wrong.status, 401);
    await assert.rejects(Sandbox.create({ host: server.url, apiKey: 'nope' }), AuthenticationError);
    const mine = await Sandbox.create({ host: server.url, apiKey: 'key-one' });
    try {
      assert.equal((await mine.runCode('print(1)')).stdout, '1\n');
      const other = await call(server.url, 'POST', `/v1/sandboxes/${mine.id}/exec`, JSON.stringify({ code: '1' }), { authorization: 'Bearer key-two' });
      assert.equal(other.status, 404, "another key's sandbox must be invisible");
      const listed = await Sandbox.list({ host: server.url, apiKey: 'key-two' });
      assert.ok(!listed.some((s) => s.id === mine.id));
    } finally {
      await mine.close();
    }
  });

  it('refuses to start on a non-loopback address without keys', async () => {
    await assert.rejects(startTestServer({ host: '0.0.0.0', apiKeys: [] }), /API keys/);
  });
});

describe('lifecycle', () => {
  it('destroys an idle sandbox after its idle timeout', async () => {
    const server = await startTestServer({ poolSize: 1 });
    try {
      const sbx = await Sandbox.create({ host: server.url, idleTimeoutSeconds: 1 });
      await sbx.runCode('x = 1');
      await new Promise((r) => setTimeout(r, 2600));
      await assert.rejects(sbx.runCode('x'), SandboxGoneError);
    } finally {
      await server.stop();
    }
  });

  it('leaves no process, mount or directory behind when the server stops', async () => {
    const server = await startTestServer({ poolSize: 2 });
    const sandboxes = await Promise.all([0, 1, 2].map(() => Sandbox.create({ host: server.url })));
    await Promise.all(sandboxes.map((s) => s.runCode('import subprocess\nsubprocess.Popen(["sleep", "1000"])')));
    const stateDir = server.stateDir;
    await server.close();
    assert.deepEqual(processesMentioning(stateDir), []);
    assert.deepEqual(overlayMountsUnder(stateDir), []);
    assert.deepEqual(sandboxDirsIn(stateDir), []);
    const stray = bwrapProcesses().filter((pid) => processesMentioning(stateDir).some((p) => p.startsWith(`${pid}:`)));
    assert.deepEqual(stray, []);
    await server.stop();
  });

  it('survives hostile kills inside, and cleans up after a crash', async () => {
    const server = await startTestServer({ poolSize: 1 });
    try {
      const sbx = await Sandbox.create({ host: server.url });
      // The agent is PID 1 of the sandbox: the kernel ignores SIGKILL sent to it from inside.
      await sbx.runCode('kill -9 1; kill -9 $PPID; true', 'bash').catch(() => undefined);
      assert.equal((await sbx.runCode('print("still here")')).stdout, 'still here\n');
      // A crash from outside (the sandbox's processes killed on the host) is noticed and cleaned.
      const pids = processesMentioning(sbx.id).map((line) => Number(line.split(':')[0]));
      assert.ok(pids.length > 0);
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      await new Promise((res) => setTimeout(res, 300));
      await assert.rejects(sbx.runCode('1'), SandboxGoneError);
      assert.deepEqual(sandboxDirsIn(server.stateDir).filter((d) => d === sbx.id), []);
      assert.equal((await sbx.info()).state, 'error');
    } finally {
      await server.stop();
    }
  });
});
