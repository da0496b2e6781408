/**
 * A create that missed the warm pool says so, and why: in its answer (and so in both SDKs), in the
 * server's log, and in /v1/metrics. Users judge the tail of create → run → close; a cold start
 * (~70 ms instead of ~1.5) must never be a silent mystery.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { captureServerLogs, type CapturedLogs } from './helpers/logs.js';
import { startTestServer, type TestServer } from './helpers/server.js';

async function metric(server: TestServer, name: string, labels: Record<string, string>): Promise<number> {
  const text = await (await fetch(server.url + '/v1/metrics')).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  const line = text.split('\n').find((l) => l.startsWith(name + '{') && want.every((w) => l.includes(w)));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
}

describe('pool misses are visible', () => {
  let captured: CapturedLogs | undefined;
  let logs: Array<Record<string, unknown>> = [];
  let off: TestServer;
  let pooled: TestServer;
  const opened: Sandbox[] = [];

  before(async () => {
    captured = captureServerLogs();
    logs = captured.lines;
    off = await startTestServer({ poolSize: 0, logLevel: 'info' });
    pooled = await startTestServer({ poolSize: 1, logLevel: 'info' });
    await pooled.manager.waitPoolFull(120_000);
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await off?.stop();
    await pooled?.stop();
    captured?.restore();
  });

  it('a server without a pool: the answer, the SDK and the metrics say pool_off', async () => {
    const sbx = await Sandbox.create({ host: off.url });
    opened.push(sbx);
    assert.deepEqual(sbx.pool, { hit: false, missReason: 'pool_off' });
    assert.equal(await metric(off, 'podflare_create_cold_total', { reason: 'pool_off', template: 'default' }), 1);
  });

  it('creates faster than the pool refills: the miss is logged and counted as refilling, a warm one as a hit', async () => {
    // Two creates at once on a pool of one: one takes the ready sandbox, the other finds the pool
    // empty with its refill under way.
    const both = await Promise.all([Sandbox.create({ host: pooled.url }), Sandbox.create({ host: pooled.url })]);
    opened.push(...both);
    const warm = both.find((s) => s.pool?.hit);
    const cold = both.find((s) => !s.pool?.hit);
    assert.deepEqual(warm?.pool, { hit: true });
    assert.deepEqual(cold?.pool, { hit: false, missReason: 'refilling' });
    assert.equal(await metric(pooled, 'podflare_create_cold_total', { reason: 'refilling', template: 'default' }), 1);
    const line = logs.find((l) => l.msg === 'create missed the warm pool' && l.reason === 'refilling');
    assert.ok(line, `an info line says why: ${JSON.stringify(logs.slice(-5))}`);
    assert.equal(typeof line.ms, 'number');
    // The first ask for another key is a cold_key miss.
    const other = await Sandbox.create({ host: pooled.url, egress: false });
    opened.push(other);
    assert.deepEqual(other.pool, { hit: false, missReason: 'cold_key' });
  });

  it('the Python SDK exposes it and logs a cold create on the podflare logger', async () => {
    // Asynchronously: the server under test runs in this process.
    const python = path.resolve(import.meta.dirname, '../python');
    const { stdout: out } = await promisify(execFile)('/usr/bin/python3', ['-c', [
      'import logging, sys',
      'logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")',
      'from podflare import Sandbox',
      `s = Sandbox(host=${JSON.stringify(off.url)})`,
      'print("POOL", s.pool)',
      's.close()',
    ].join('\n')], { env: { ...process.env, PYTHONPATH: python }, encoding: 'utf8' });
    assert.match(out, /POOL \{'hit': False, 'miss_reason': 'pool_off'\}/);
    assert.match(out, /podflare sbx_\w+ missed the warm pool \(pool_off\): created cold in \d+ ms/);
  });
});
