/**
 * The hostile agent of hostile-agent.test.ts inside a microVM (QEMU microvm, TCG here: one template
 * boot, then clones). The guest is root in its own kernel: its user code takes the agent's
 * virtio-serial port over (pidfd_getfd of PID 1's fd 3, ptrace-stop of PID 1) and answers the VM
 * runtime's diff, downloads and an exec stream through the real HTTP routes.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { turnHostile } from './helpers/hostile.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const MIB = 1024 * 1024;
/** docs/untrusted-agent.md: a VM diff holds ≲ 160 MiB; plus 96 MiB for heap pages V8 keeps (as hostile-agent.test.ts). */
const VM_DIFF_BOUND = 160 * MIB + 96 * MIB;
/** docs/untrusted-agent.md: a flooding exec whose client stopped reading holds ~10 MiB; plus the same 96 MiB. */
const EXEC_STREAM_BOUND = 10 * MIB + 96 * MIB;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function get(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode!, body }));
      res.on('error', reject);
    }).once('error', reject);
  });
}

describe('a hostile agent in a microVM', () => {
  let server: TestServer;
  let bystander: Sandbox;
  const opened: Sandbox[] = [];
  const make = async () => {
    const s = await Sandbox.create({ host: server.url, runtime: 'vm' });
    opened.push(s);
    return s;
  };


  before(async () => {
    server = await startTestServer({ poolSize: 0 });
    bystander = await make(); // boots and freezes the template (TCG: seconds)
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
  });

  it('an endless diff listing is refused with a JSON 413, RSS bounded; the bystander answers', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'manifest', { timeoutMs: 60_000 });
    global.gc?.();
    const base = process.memoryUsage().rss;
    let peak = 0;
    const timer = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss - base);
      if (peak > VM_DIFF_BOUND) void hostile.close();
    }, 50);
    const answer = await get(`${server.url}/v1/sandboxes/${bystander.id}/diff/${hostile.id}`).finally(() => clearInterval(timer));
    console.log(`endless VM diff listing (VM): peak RSS growth ${(peak / MIB).toFixed(1)} MiB`);
    assert.equal(answer.status, 413, answer.body);
    assert.equal((JSON.parse(answer.body) as { code: string }).code, 'payload_too_large');
    assert.ok(peak < VM_DIFF_BOUND, `RSS grew by ${(peak / MIB).toFixed(0)} MiB`);
    assert.equal((await bystander.runCode('print(6 * 7)')).stdout, '42\n');
  });

  it('endless output to a client that does not read: the channel is held, RSS bounded', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'flood', { timeoutMs: 60_000 });
    global.gc?.();
    const base = process.memoryUsage().rss;
    let peak = 0;
    let request: http.ClientRequest | undefined;
    const timer = setInterval(() => {
      global.gc?.();
      peak = Math.max(peak, process.memoryUsage().rss - base);
      if (peak > EXEC_STREAM_BOUND) request?.destroy();
    }, 200);
    try {
      const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
        request = http.request(`${server.url}/v1/sandboxes/${hostile.id}/exec`, { method: 'POST', headers: { 'content-type': 'application/json' } }, resolve);
        request.once('error', reject);
        request.end(JSON.stringify({ code: 'print(1)' }));
      });
      assert.equal(res.statusCode, 200);
      res.pause(); // and never read again
      await sleep(8000);
      assert.equal((await bystander.runCode('print(6 * 7)')).stdout, '42\n');
      assert.ok(!request!.destroyed, 'the server kept memory under the bound');
      request!.destroy();
      await sleep(2000);
    } finally {
      clearInterval(timer);
    }
    console.log(`exec flood from a microVM to a client that does not read: peak RSS growth after GC ${(peak / MIB).toFixed(1)} MiB`);
    assert.ok(peak < EXEC_STREAM_BOUND, `RSS grew by ${(peak / MIB).toFixed(0)} MiB`);
    await hostile.close();
  });

  it('a listing that is not JSON, and impossible download sizes: JSON 502s', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'badmanifest', { timeoutMs: 60_000 });
    const diff = await get(`${server.url}/v1/sandboxes/${bystander.id}/diff/${hostile.id}`);
    assert.equal(diff.status, 502, diff.body);
    assert.match((JSON.parse(diff.body) as { error: string }).error, /protocol violation: manifest line 1 is not JSON/);
    const sizes = await make();
    await turnHostile(sizes, 'sizes', { timeoutMs: 60_000 });
    for (const file of ['/neg', '/abc', '/frac', '/huge']) {
      const answer = await get(`${server.url}/v1/sandboxes/${sizes.id}/files?path=${file}`);
      assert.equal(answer.status, 502, `${file}: ${answer.body}`);
      assert.equal((JSON.parse(answer.body) as { code: string }).code, 'agent_protocol');
    }
    assert.equal((await bystander.runCode('print(6 * 7)')).stdout, '42\n');
  });
});
