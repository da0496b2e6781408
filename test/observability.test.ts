/**
 * Observability against a real server: GET /v1/metrics in the Prometheus text format with values
 * that move when sandboxes are created, run code and fork; the W3C traceparent honoured and echoed;
 * one structured log line per request naming the sandbox and the duration; the exec history the
 * dashboard reads.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

/** Parses Prometheus text into series keyed `name{labels}` as written, checking its shape. */
function parseMetrics(text: string): Map<string, number> {
  const series = new Map<string, number>();
  const typed = new Set<string>();
  for (const line of text.split('\n')) {
    if (!line) continue;
    const type = /^# TYPE (\w+) (counter|gauge|histogram)$/.exec(line);
    if (type) { typed.add(type[1]!); continue; }
    if (line.startsWith('# HELP ')) continue;
    const m = /^(\w+)(\{[^}]*\})? (-?[\d.e+-]+|\+Inf|NaN)$/.exec(line);
    assert.ok(m, `not a Prometheus sample line: ${line}`);
    const family = m[1]!.replace(/_(bucket|sum|count)$/, '');
    assert.ok(typed.has(m[1]!) || typed.has(family), `sample before its # TYPE: ${line}`);
    series.set(m[1]! + (m[2] ?? ''), Number(m[3]));
  }
  return series;
}

async function scrape(server: TestServer, headers: Record<string, string> = {}): Promise<Map<string, number>> {
  const res = await fetch(server.url + '/v1/metrics', { headers });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parseMetrics(await res.text());
}

const value = (m: Map<string, number>, key: string) => {
  const v = m.get(key);
  assert.ok(v !== undefined, `metric ${key} missing`);
  return v;
};

describe('GET /v1/metrics', () => {
  let server: TestServer;
  const opened: Sandbox[] = [];
  before(async () => {
    server = await startTestServer({ poolSize: 1 });
    await server.manager.waitPoolFull();
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
  });

  it('exposes pool, state, latency and limit-kill series before anything happens', async () => {
    const m = await scrape(server);
    assert.equal(value(m, 'podflare_pool_ready{template="default",egress="true"}'), 1);
    assert.equal(value(m, 'podflare_pool_target{template="default",egress="true"}'), 1);
    assert.equal(value(m, 'podflare_pool_hits_total{template="default",egress="true"}'), 0);
    assert.equal(value(m, 'podflare_pool_misses_total{template="default",egress="true"}'), 0);
    assert.equal(value(m, 'podflare_sandboxes{state="ready"}'), 0);
    assert.equal(value(m, 'podflare_sandboxes{state="running"}'), 0);
    assert.equal(value(m, 'podflare_limit_kills_total{limit="memory"}'), 0);
    assert.equal(value(m, 'podflare_limit_kills_total{limit="pids"}'), 0);
    for (const h of ['podflare_sandbox_create_seconds', 'podflare_exec_seconds', 'podflare_fork_seconds']) {
      assert.equal(value(m, `${h}_count`), 0);
      assert.equal(value(m, `${h}_bucket{le="+Inf"}`), 0);
    }
  });

  it('moves after a create, an exec and a fork', async () => {
    const before = await scrape(server);
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    let m = await scrape(server);
    assert.equal(value(m, 'podflare_sandbox_create_seconds_count'), value(before, 'podflare_sandbox_create_seconds_count') + 1);
    assert.equal(value(m, 'podflare_pool_hits_total{template="default",egress="true"}') + value(m, 'podflare_pool_misses_total{template="default",egress="true"}'), 1);
    assert.equal(value(m, 'podflare_sandboxes{state="ready"}'), 1);
    assert.equal(value(m, 'podflare_sandbox_events_total{event="created"}'), 1);

    await sbx.runCode('import time; time.sleep(0.3); print("hi")');
    await sbx.runCode('exit 3', { language: 'bash' });
    m = await scrape(server);
    assert.equal(value(m, 'podflare_exec_seconds_count'), 2);
    assert.ok(value(m, 'podflare_exec_seconds_sum') >= 0.3, 'the sleep is in the exec time');
    // The 0.3 s exec is above the 0.25 s bucket and within the 0.5 s one (cumulative buckets).
    assert.ok(value(m, 'podflare_exec_seconds_bucket{le="0.25"}') <= 1);
    assert.equal(value(m, 'podflare_exec_seconds_bucket{le="60"}'), 2);
    assert.equal(value(m, 'podflare_execs_total{language="python",outcome="ok"}'), 1);
    assert.equal(value(m, 'podflare_execs_total{language="bash",outcome="error"}'), 1);

    const children = await sbx.fork(2);
    opened.push(...children);
    m = await scrape(server);
    assert.equal(value(m, 'podflare_fork_seconds_count'), 1);
    assert.equal(value(m, 'podflare_sandboxes{state="ready"}'), 3);
    assert.equal(value(m, 'podflare_sandbox_events_total{event="forked"}'), 2);
    assert.ok(value(m, 'podflare_http_requests_total{method="POST",code="201"}') >= 1);
  });

  it('counts a process killed for its memory limit', async () => {
    const before = value(await scrape(server), 'podflare_limit_kills_total{limit="memory"}');
    const sbx = await Sandbox.create({ host: server.url, limits: { memoryMb: 128 } });
    opened.push(sbx);
    const r = await sbx.runCode('x = bytearray(1024 * 1024 * 1024)');
    assert.equal(r.error?.name, 'MemoryLimitExceeded');
    const m = await scrape(server);
    assert.equal(value(m, 'podflare_limit_kills_total{limit="memory"}'), before + 1);
    assert.equal(value(m, 'podflare_limit_kills_total{limit="pids"}'), 0);
    // And the history shows the limit error as the caller saw it.
    const { execs } = (await (await fetch(`${server.url}/v1/sandboxes/${sbx.id}/execs`)).json()) as { execs: Array<{ outputs: Array<{ type: string; data: { name?: string } }> }> };
    assert.ok(execs[0]!.outputs.some((o) => o.type === 'error' && o.data.name === 'MemoryLimitExceeded'));
  });

  it('records each exec for the dashboard: code, output, results, exit', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await sbx.runCode('print("one")\n40 + 2');
    await sbx.runCode('raise ValueError("nope")');
    const res = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/execs`);
    assert.equal(res.status, 200);
    const { execs } = (await res.json()) as { execs: Array<{ code: string; exit_code: number; outputs: Array<{ type: string; data: unknown }> }> };
    assert.equal(execs.length, 2);
    assert.equal(execs[0]!.code, 'print("one")\n40 + 2');
    assert.equal(execs[0]!.exit_code, 0);
    assert.deepEqual(execs[0]!.outputs.map((o) => o.type), ['stdout', 'result']);
    assert.equal(execs[0]!.outputs[0]!.data, 'one\n');
    assert.equal((execs[0]!.outputs[1]!.data as Record<string, string>)['text/plain'], '42');
    assert.equal(execs[1]!.exit_code, 1);
    assert.ok(execs[1]!.outputs.some((o) => o.type === 'error' && (o.data as { name: string }).name === 'ValueError'));
    // Output beyond the per-exec cap (1 MiB) is cut, and the record says so.
    await sbx.runCode('print("x" * 3_000_000)');
    const capped = ((await (await fetch(`${server.url}/v1/sandboxes/${sbx.id}/execs`)).json()) as { execs: Array<{ truncated: boolean; outputs: Array<{ data: unknown }> }> }).execs[2]!;
    assert.equal(capped.truncated, true);
    const kept = capped.outputs.reduce((n, o) => n + String(o.data).length, 0);
    assert.ok(kept > 500_000 && kept <= 1024 * 1024, `kept ${kept} characters`);
    // Unknown and malformed ids: 404 and 400 naming the problem.
    assert.equal((await fetch(`${server.url}/v1/sandboxes/sbx_${'0'.repeat(32)}/execs`)).status, 404);
    const bad = await fetch(`${server.url}/v1/sandboxes/nope/execs`);
    assert.equal(bad.status, 400);
    assert.match(((await bad.json()) as { error: string }).error, /not a sandbox id/);
  });
});

describe('traceparent and request logs', () => {
  let server: TestServer;
  const lines: string[] = [];
  const realWrite = process.stderr.write.bind(process.stderr);

  before(async () => {
    // The server logs to stderr: keep its lines (and pass everything else through).
    process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
      const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
      if (text.startsWith('{"ts"')) { lines.push(...text.split('\n').filter(Boolean)); return true; }
      return (realWrite as (c: unknown, ...r: unknown[]) => boolean)(chunk, ...rest);
    }) as typeof process.stderr.write;
    server = await startTestServer({ poolSize: 0, logLevel: 'info' });
  });
  after(async () => {
    await server?.stop();
    process.stderr.write = realWrite;
  });

  it('keeps the caller trace id, names its own span, and echoes it', async () => {
    const traceId = '4bf92f3577b34da6a3ce929d0e0e4736';
    const parent = '00f067aa0ba902b7';
    const res = await fetch(server.url + '/v1/healthz', { headers: { traceparent: `00-${traceId}-${parent}-01` } });
    const echoed = res.headers.get('traceparent') ?? '';
    const m = /^00-([0-9a-f]{32})-([0-9a-f]{16})-01$/.exec(echoed);
    assert.ok(m, `echoed traceparent: ${echoed}`);
    assert.equal(m[1], traceId);
    assert.notEqual(m[2], parent, 'the server answers with its own span id');
  });

  it('starts a new trace for a missing or invalid traceparent', async () => {
    for (const header of [undefined, 'garbage', `00-${'0'.repeat(32)}-00f067aa0ba902b7-01`, `ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`]) {
      const res = await fetch(server.url + '/v1/healthz', { headers: header ? { traceparent: header } : {} });
      const echoed = res.headers.get('traceparent') ?? '';
      assert.match(echoed, /^00-[0-9a-f]{32}-[0-9a-f]{16}-00$/, `for ${header}`);
      assert.doesNotMatch(echoed, /^00-0{32}-/);
    }
    // Errors carry it too.
    const missing = await fetch(server.url + '/v1/nowhere');
    assert.equal(missing.status, 404);
    assert.match(missing.headers.get('traceparent') ?? '', /^00-[0-9a-f]{32}-/);
  });

  it('logs one JSON line per request with the sandbox, the status, the duration and the trace', async () => {
    const traceId = 'a'.repeat(31) + 'b';
    const sbx = await Sandbox.create({ host: server.url });
    try {
      await fetch(`${server.url}/v1/sandboxes/${sbx.id}`, { headers: { traceparent: `00-${traceId}-${'c'.repeat(16)}-01` } });
      const mine = lines.map((l) => JSON.parse(l) as Record<string, unknown>)
        .filter((l) => l.msg === 'request' && l.trace_id === traceId);
      assert.equal(mine.length, 1, 'exactly one line for the request');
      const line = mine[0]!;
      assert.equal(line.level, 'info');
      assert.equal(line.method, 'GET');
      assert.equal(line.path, `/v1/sandboxes/${sbx.id}`);
      assert.equal(line.status, 200);
      assert.equal(line.sandbox, sbx.id);
      assert.equal(line.parent_span_id, 'c'.repeat(16));
      assert.equal(typeof line.ms, 'number');
      assert.ok((line.ms as number) >= 0);
      // The create was logged too, naming the sandbox it made.
      assert.ok(lines.some((l) => {
        const j = JSON.parse(l) as Record<string, unknown>;
        return j.msg === 'request' && j.method === 'POST' && j.path === '/v1/sandboxes' && j.status === 201 && j.sandbox === sbx.id;
      }));
    } finally {
      await sbx.close();
    }
  });
});
