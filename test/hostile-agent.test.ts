/**
 * The server trusts nothing a sandbox's agent sends. A hostile agent of the test's own
 * (helpers/hostile_agent.py) takes the real agent's channel over from user code inside a namespace
 * sandbox (pidfd_getfd of the supervisor's fd 3, then ptrace-stopping the supervisor) and answers the
 * server's requests with endless output, endless or broken diff listings, impossible sizes, a
 * sibling sandbox's pid, or a closed channel. Each time: the server's RSS stays within the bound
 * written down in docs/untrusted-agent.md, other sandboxes stay responsive, and only the offender's request
 * fails, with a JSON error. Plus the agent's own robustness: a NUL byte in bash code.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, it } from 'node:test';
import { Client as McpClient } from '@modelcontextprotocol/sdk/client/index.js';
import { InMemoryTransport } from '@modelcontextprotocol/sdk/inMemory.js';
import { createPodflareMcpServer } from '@podflare/mcp';
import { BadRequestError, Sandbox } from 'podflare';
import { ERROR_STATUS } from '@podflare/protocol';
// The built module, as the server in this process uses it (its channels are the built class).
import { vmDiff } from '../packages/server/dist/runtime/vm/vm-diff.js';
import { processesMentioning } from './helpers/leaks.js';
import { turnHostile } from './helpers/hostile.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const MIB = 1024 * 1024;
/**
 * The documented bounds (docs/untrusted-agent.md, "Memory one tenant can make the server hold").
 * Two measures, both after a full garbage collection: what the JavaScript heap and its buffers hold
 * (`heapUsed + external`, allowed the bound plus 16 MiB), and the process's RSS, allowed the bound
 * plus 96 MiB: after a burst of 1 MiB strings V8 keeps ~40 MiB of freed heap pages (and malloc its
 * arenas) without holding anything in them. Today's code, for comparison, grows by gigabytes.
 */
const HELD_SLACK = 16 * MIB;
const RSS_SLACK = 96 * MIB;
const EXEC_STREAM_BOUND = 10 * MIB;
const VM_DIFF_BOUND = 160 * MIB;
/** A watcher's queue (8 MiB + one event) plus the exec history kept of the execs that filled it (1 MiB each). */
const DASHBOARD_BOUND = 9 * MIB + 30 * MIB;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Usage { rss: number; held: number }

function usage(): Usage {
  global.gc?.();
  const m = process.memoryUsage();
  return { rss: m.rss, held: m.heapUsed + m.external };
}

/**
 * Watches what this process (the server runs in it) holds while `work` runs, every 200 ms after a
 * full garbage collection (garbage not yet collected is not held). Calls `onOverLimit` once the
 * growth passes `bound` by more than the slack.
 */
async function peakGrowthDuring<T>(bound: number, onOverLimit: () => void, work: () => Promise<T>): Promise<{ peak: Usage; result: T | Error }> {
  const base = usage();
  const peak: Usage = { rss: 0, held: 0 };
  const timer = setInterval(() => {
    const now = usage();
    peak.rss = Math.max(peak.rss, now.rss - base.rss);
    peak.held = Math.max(peak.held, now.held - base.held);
    if (!withinBound(peak, bound)) onOverLimit();
  }, 200);
  try {
    const result = await work().catch((err: Error) => err);
    return { peak, result };
  } finally {
    clearInterval(timer);
  }
}

const withinBound = (peak: Usage, bound: number) => peak.held <= bound + HELD_SLACK && peak.rss <= bound + RSS_SLACK;

function reportAndCheck(what: string, peak: Usage, bound: number): void {
  const mib = (n: number) => (n / MIB).toFixed(1);
  console.log(`${what}: peak growth after GC: held ${mib(peak.held)} MiB, RSS ${mib(peak.rss)} MiB (bound ${mib(bound)} MiB)`);
  assert.ok(withinBound(peak, bound), `${what}: held +${mib(peak.held)} MiB, RSS +${mib(peak.rss)} MiB`);
}

/** The server's log lines (it runs in this process and logs JSON lines to stderr) while `work` runs. */
async function serverLogDuring(work: () => Promise<void>): Promise<Array<Record<string, unknown>>> {
  const lines: Array<Record<string, unknown>> = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    for (const line of String(chunk).split('\n')) {
      try {
        if (line.startsWith('{')) lines.push(JSON.parse(line) as Record<string, unknown>);
      } catch { /* not a log line */ }
    }
    return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stderr.write;
  try {
    await work();
  } finally {
    process.stderr.write = write;
  }
  return lines;
}

const violationsOf = (lines: Array<Record<string, unknown>>, sandbox: string) =>
  lines.filter((l) => l.msg === 'sandbox agent protocol violation' && l.sandbox === sandbox).map((l) => String(l.violation));

describe('a hostile agent', () => {
  let server: TestServer;
  let bystander: Sandbox;
  const opened: Sandbox[] = [];
  const make = async () => {
    const s = await Sandbox.create({ host: server.url });
    opened.push(s);
    return s;
  };

  /** Starts the hostile agent in `sbx` and waits until it has the channel. */

  /** The bystander answers while the hostile sandbox misbehaves. */
  async function bystanderAnswers(): Promise<void> {
    const r = await bystander.runCode('print(6 * 7)');
    assert.equal(r.stdout, '42\n');
  }

  const channelOf = async (sbx: Sandbox) => (await server.manager.get(sbx.id)).rt.channel;

  before(async () => {
    server = await startTestServer({ poolSize: 1 });
    bystander = await make();
  });
  after(async () => {
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
    // The hostile agents (and the agents they stopped) went with their sandboxes.
    assert.deepEqual(processesMentioning(server.stateDir), []);
  });

  it('endless output to a client that does not read: the server holds the channel, RSS stays bounded', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'flood');
    let request: http.ClientRequest | undefined;
    const { peak, result } = await peakGrowthDuring(EXEC_STREAM_BOUND, () => request?.destroy(), async () => {
      const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
        request = http.request(`${server.url}/v1/sandboxes/${hostile.id}/exec`, { method: 'POST', headers: { 'content-type': 'application/json' } }, resolve);
        request.once('error', reject);
        request.end(JSON.stringify({ code: 'print(1)' }));
      });
      assert.equal(res.statusCode, 200);
      res.pause(); // and never read again
      await sleep(8000);
      await bystanderAnswers(); // the flood stalls only its own sandbox
      await sleep(2000);
      assert.ok(!request!.destroyed, 'the server kept memory under the bound all along');
      // The client goes away: what was held for it is freed (the agent, still flooding, is read
      // and dropped), the server and the bystander go on.
      request!.destroy();
      await sleep(3000);
      await bystanderAnswers();
    });
    if (result instanceof Error) throw result;
    reportAndCheck('exec flood to a client that does not read', peak, EXEC_STREAM_BOUND);
    await hostile.close();
  });

  it('endless output through the MCP server: it keeps only what it can show, with bounded RSS', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'flood');
    const mcpServer = createPodflareMcpServer({ host: server.url, sessionSandbox: false, log: () => undefined });
    const [clientSide, serverSide] = InMemoryTransport.createLinkedPair();
    await mcpServer.connect(serverSide);
    const client = new McpClient({ name: 'hostile-agent-test', version: '1.0.0' });
    await client.connect(clientSide);
    const abort = new AbortController();
    const { peak, result } = await peakGrowthDuring(EXEC_STREAM_BOUND, () => abort.abort(new Error('over the bound')), async () => {
      const call = client.callTool({ name: 'run_bash', arguments: { sandbox_id: hostile.id, command: 'true' } }, undefined,
        { signal: abort.signal, timeout: 600_000 });
      call.catch(() => undefined);
      await sleep(8000); // the MCP server reads the flood as fast as it comes
      assert.ok(!abort.signal.aborted, 'memory stayed under the bound');
      abort.abort(new Error('enough'));
      await call.catch(() => undefined);
    });
    await client.close();
    await mcpServer.close();
    if (result instanceof Error) throw result;
    reportAndCheck('exec flood read by the MCP server', peak, EXEC_STREAM_BOUND);
    await hostile.close();
    await bystanderAnswers();
  });

  it('impossible download sizes end that request with a JSON 502, never reaching a header', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'sizes');
    const logged = await serverLogDuring(async () => {
      for (const file of ['/neg', '/abc', '/frac', '/huge']) {
        const answer = await new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }>((resolve, reject) => {
          http.get(`${server.url}/v1/sandboxes/${hostile.id}/files?path=${file}`, (res) => {
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (d: string) => { body += d; });
            res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
          }).once('error', reject);
        });
        assert.equal(answer.status, 502, `${file}: ${answer.body}`);
        const json = JSON.parse(answer.body) as { code: string; error: string };
        assert.equal(json.code, 'agent_protocol');
        assert.match(json.error, /protocol violation: file_read reply: size/);
      }
    });
    assert.equal(violationsOf(logged, hostile.id).length, 4, 'each violation is logged with its sandbox');
    await bystanderAnswers();
  });

  it('a fork reply naming a sibling sandbox\'s pid is refused; the sibling lives on', async () => {
    const parent = await make();
    await parent.runCode('x = 1');
    const [sibling] = await parent.fork(1);
    opened.push(sibling!);
    assert.equal((await sibling!.runCode('print(x)')).stdout, '1\n');
    await turnHostile(parent, 'fork');
    let res!: Response;
    const logged = await serverLogDuring(async () => {
      res = await fetch(`${server.url}/v1/sandboxes/${parent.id}/fork`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    });
    assert.match(violationsOf(logged, parent.id).join(), /not a child of this fork/);
    const body = (await res.json()) as { code: string; error: string };
    assert.equal(res.status, 502, JSON.stringify(body));
    assert.equal(body.code, 'agent_protocol');
    assert.match(body.error, /not a child of this fork/);
    // The sibling was neither grafted into nor killed.
    assert.equal((await sibling!.runCode('print(x + 1)')).stdout, '2\n');
    assert.equal((await sibling!.info()).state, 'ready');
    assert.deepEqual((await sibling!.runCode('ls /.pf/spawn 2>/dev/null | wc -l', 'bash')).stdout, '0\n');
    await bystanderAnswers();
  });

  it('merge_into paths: a listed entry that names a path outside its directory is not followed', async () => {
    const parent = await make();
    await parent.upload('/root/precious', 'keep');
    const [winner] = await parent.fork(1);
    opened.push(winner!);
    await turnHostile(winner!, 'merge');
    const res = await fetch(`${server.url}/v1/sandboxes/${parent.id}/merge_into/${winner!.id}`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ paths: ['/root/d'] }),
    });
    assert.ok(res.status < 300, await res.text());
    // Copied where it belongs (its directory and its name), and nowhere else.
    assert.equal((await parent.download('/root/d/x')).toString(), 'pwned');
    assert.equal((await parent.download('/root/precious')).toString(), 'keep');
  });

  it('an endless diff listing is cut at its cap (413), with bounded RSS', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'manifest');
    const [a, b] = [await channelOf(hostile), await channelOf(bystander)];
    const { peak, result } = await peakGrowthDuring(VM_DIFF_BOUND, () => void hostile.close(), () => vmDiff(a, b, {}));
    assert.ok(result instanceof Error, 'the diff must fail');
    assert.equal((result as Error & { code?: string }).code, 'payload_too_large', result.message);
    reportAndCheck('endless VM diff listing', peak, VM_DIFF_BOUND);
    await bystanderAnswers();
  });

  it('a diff listing that is not JSON is a protocol violation, not an unhandled error', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'badmanifest');
    const [a, b] = [await channelOf(hostile), await channelOf(bystander)];
    type Failure = Error & { code?: string };
    const failures: Failure[] = [];
    const logged = await serverLogDuring(async () => {
      await vmDiff(a, b, {}).catch((e: Failure) => failures.push(e));
    });
    const err = failures[0];
    assert.ok(err, 'the diff must fail');
    assert.match(violationsOf(logged, hostile.id).join(), /manifest line 1 is not JSON/);
    // A domain error below HTTP: the code alone says what it is; HTTP answers it with a 502.
    assert.equal(err.code, 'agent_protocol', err.message);
    assert.equal(ERROR_STATUS.agent_protocol, 502);
    assert.match(err.message, /manifest line 1 is not JSON/);
  });

  it('a sandbox whose agent channel broke is reported as such, not ready', async () => {
    const hostile = await make();
    await turnHostile(hostile, 'close', { waitReady: false });
    let info = await hostile.info();
    for (let i = 0; i < 150 && info.state === 'ready'; i++) {
      await sleep(100);
      info = await hostile.info();
    }
    assert.equal(info.state, 'error');
    assert.match(info.endReason ?? '', /channel/);
    await bystanderAnswers();
  });

  it('a dashboard watcher that does not read is dropped once 8 MiB are queued for it', async () => {
    const sbx = await make();
    const watchers = () => server.manager.history.listenerCount('exec');
    const before = watchers();
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      http.get(`${server.url}/v1/dashboard/events`, resolve).once('error', reject);
    });
    res.pause(); // and never read
    assert.equal(watchers(), before + 1);
    const { peak, result } = await peakGrowthDuring(DASHBOARD_BOUND, () => res.destroy(), async () => {
      // Each exec's `end` record carries its output (1 MiB here, the history's cap per exec).
      for (let i = 0; i < 30 && watchers() > before; i++) await sbx.runCode("import sys; sys.stdout.write('y' * (1 << 20))");
    });
    if (result instanceof Error) throw result;
    assert.equal(watchers(), before, 'the server dropped the watcher');
    reportAndCheck('dashboard watcher that does not read', peak, DASHBOARD_BOUND);
    res.destroy();
    await bystanderAnswers();
  });

  it('a NUL byte in bash code is a clear 400, and the next exec runs', async () => {
    const sbx = await make();
    await assert.rejects(sbx.runCode('echo a\0b', 'bash'), (err: Error) => err instanceof BadRequestError && /NUL/.test(err.message));
    assert.equal((await sbx.runCode('echo next', 'bash')).stdout, 'next\n');
    assert.equal((await sbx.runCode('print("next")')).stdout, 'next\n');
  });
});
