/**
 * `--only cluster`: cluster mode on this one machine (test/helpers/cluster.ts: a throwaway
 * PostgreSQL, three `podflare node` processes in network namespaces, a gateway on loopback).
 *   - create through the gateway (warm slot claim + node create), sequential: p50/p99
 *   - creates/s with 8 clients (each create closed again, so capacity never runs out), and the same
 *     straight to the nodes (the hosts' own start rate: the ceiling of the cluster's)
 *   - the gateway's routing overhead on exec: the same exec through the gateway and straight to
 *     the node, alternated, overhead = the pair's difference
 *   - 3 nodes × N live sandboxes with 8 clients running execs: errors
 *     (N = PODFLARE_BENCH_CLUSTER_PER_NODE, default 100, 10 with --quick)
 * Everything here shares two cores with three nodes, a gateway, PostgreSQL and the clients.
 */
import { performance } from 'node:perf_hooks';
import { Sandbox } from 'podflare';
import { startCluster } from '../test/helpers/cluster.js';
import { detail, Failures, notes, rows, status, timingRow } from './report.js';
import { summarize } from './stats.js';

const TARGET = { createP50: 10, createP99: 30, createsPerSecond: 200, overheadP50: 0.5, overheadP99: 2 };
const CLIENTS = 8;

export async function measureCluster(opts: { quick: boolean; n: number; warmup: number }): Promise<void> {
  const perNode = Number(process.env.PODFLARE_BENCH_CLUSTER_PER_NODE ?? (opts.quick ? 10 : 100));
  const cluster = await startCluster({ nodes: 3, gateways: 1, poolSize: 4, maxSandboxes: perNode + 40 });
  try {
    const conn = { host: cluster.gateways[0]!.url, apiKey: cluster.apiKey, requestTimeoutMs: 120_000 };
    // Every node ready and its pool published as slots.
    const deadline = Date.now() + 60_000;
    for (;;) {
      const hosts = (await (await fetch(`${conn.host}/v1/cluster/hosts`, { headers: { authorization: `Bearer ${cluster.apiKey}` } })).json()) as
        { hosts: Array<{ fresh: boolean; pool: { ready: number; target: number } }> };
      if (hosts.hosts.length === 3 && hosts.hosts.every((h) => h.fresh && h.pool.ready >= h.pool.target)) break;
      if (Date.now() > deadline) throw new Error('the cluster did not get ready');
      await new Promise((r) => setTimeout(r, 200));
    }

    // 1. Sequential creates through the gateway.
    const createFailures = new Failures('cluster create', opts.n / 2);
    const createSamples: number[] = [];
    for (let i = 0; i < opts.warmup + opts.n; i++) {
      const t0 = performance.now();
      const sb = await createFailures.attempt('create', () => Sandbox.create(conn));
      const t1 = performance.now();
      if (!sb) continue;
      await createFailures.attempt('close', () => sb.close());
      if (i >= opts.warmup) createSamples.push(t1 - t0);
      // Let the pool refill, as a warm pool would between a user's creates.
      await new Promise((r) => setTimeout(r, 100));
    }
    const cs = summarize(createSamples);
    rows.push(timingRow('cluster: create through a gateway', cs, `p50 ≤ ${TARGET.createP50} ms, p99 ≤ ${TARGET.createP99} ms`, '–',
      createFailures.report(status(cs.p50 <= TARGET.createP50 && cs.p99 <= TARGET.createP99))));
    notes.push(detail('cluster: create through a gateway', cs));

    // 2. Throughput: 8 clients creating (and closing) for a while.
    const seconds = opts.quick ? 5 : 15;
    const tputFailures = new Failures('cluster creates/s', Number.POSITIVE_INFINITY);
    let made = 0;
    const tputSamples: number[] = [];
    const end = performance.now() + seconds * 1000;
    await Promise.all(Array.from({ length: CLIENTS }, async () => {
      while (performance.now() < end) {
        const t0 = performance.now();
        const sb = await tputFailures.attempt('create', () => Sandbox.create(conn));
        if (!sb) continue;
        tputSamples.push(performance.now() - t0);
        made++;
        await tputFailures.attempt('close', () => sb.close());
      }
    }));
    const rate = made / seconds;
    rows.push({ ...timingRow(`cluster: creates with ${CLIENTS} clients (+close)`, summarize(tputSamples), `≥ ${TARGET.createsPerSecond}/s`, '–',
      tputFailures.report(status(rate >= TARGET.createsPerSecond))), n: `${rate.toFixed(0)}/s` });
    notes.push(`cluster: ${made} creates in ${seconds} s by ${CLIENTS} clients (${rate.toFixed(1)}/s), each closed again; the n column is the rate`);
    // The same clients straight to the nodes (no gateway, no placement): what the hosts themselves
    // start and end per second here, the ceiling of the row above.
    let straight = 0;
    let k = 0;
    const directEnd = performance.now() + seconds * 1000;
    await Promise.all(Array.from({ length: CLIENTS }, async () => {
      while (performance.now() < directEnd) {
        const node = cluster.nodes[k++ % cluster.nodes.length]!;
        const one = await tputFailures.attempt('direct create', async () => {
          const res = await node.direct('POST', '/v1/sandboxes', {});
          if (res.status !== 201) throw new Error(`direct create: ${res.status} ${await res.text()}`);
          return (await res.json()) as { id: string };
        });
        if (!one) continue;
        straight++;
        await tputFailures.attempt('direct close', async () => { await (await node.direct('DELETE', `/v1/sandboxes/${one.id}`)).text(); });
      }
    }));
    notes.push(`cluster: the same ${CLIENTS} clients straight to the nodes (no gateway): ${(straight / seconds).toFixed(1)}/s — the hosts' own ceiling here`);

    // 3. Routing overhead on exec, paired.
    const sb = await Sandbox.create(conn);
    const host = cluster.pg.psql(`SELECT host_id FROM sandboxes WHERE id='${sb.id}'`).trim();
    const node = cluster.nodes.find((n) => n.id === host)!;
    const execBody = { code: 'print(6*7)' };
    const viaGateway = async () => {
      const res = await fetch(`${conn.host}/v1/sandboxes/${sb.id}/exec`, {
        method: 'POST', body: JSON.stringify(execBody), headers: { authorization: `Bearer ${cluster.apiKey}`, 'content-type': 'application/json' },
      });
      const text = await res.text();
      if (!text.includes('42')) throw new Error(`gateway exec: ${res.status} ${text.slice(0, 200)}`);
    };
    const direct = async () => {
      const res = await node.direct('POST', `/v1/sandboxes/${sb.id}/exec`, execBody);
      const text = await res.text();
      if (!text.includes('42')) throw new Error(`direct exec: ${res.status} ${text.slice(0, 200)}`);
    };
    const overhead: number[] = [];
    const gw: number[] = [];
    const dr: number[] = [];
    for (let i = 0; i < opts.warmup + opts.n; i++) {
      // Alternate which goes first, so neither always runs on a warmer path.
      const order = i % 2 ? [viaGateway, direct] : [direct, viaGateway];
      const times: number[] = [];
      for (const f of order) { const t0 = performance.now(); await f(); times.push(performance.now() - t0); }
      const [g, d] = i % 2 ? [times[0]!, times[1]!] : [times[1]!, times[0]!];
      if (i < opts.warmup) continue;
      gw.push(g);
      dr.push(d);
      overhead.push(g - d);
    }
    const os = summarize(overhead);
    rows.push(timingRow('cluster: gateway overhead on exec (paired)', os, `p50 ≤ ${TARGET.overheadP50} ms, p99 ≤ ${TARGET.overheadP99} ms`, '–',
      status(os.p50 <= TARGET.overheadP50 && os.p99 <= TARGET.overheadP99)));
    notes.push(`cluster exec: through the gateway p50 ${summarize(gw).p50.toFixed(2)} ms, straight to the node p50 ${summarize(dr).p50.toFixed(2)} ms`);
    await sb.close();

    // 4. Live sandboxes on every node, 8 clients at work.
    const loadFailures = new Failures('cluster load', Number.POSITIVE_INFINITY);
    const live: Sandbox[] = [];
    const want = perNode * 3;
    while (live.length < want) {
      const batch = await Promise.all(Array.from({ length: Math.min(CLIENTS, want - live.length) }, () => loadFailures.attempt('create', () => Sandbox.create(conn))));
      for (const s of batch) if (s) live.push(s);
      if (loadFailures.count > want) break;
    }
    const execs: number[] = [];
    const loadEnd = performance.now() + (opts.quick ? 5 : 20) * 1000;
    await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
      let k = c;
      while (performance.now() < loadEnd) {
        const s = live[k++ % live.length]!;
        const t0 = performance.now();
        const ex = await loadFailures.attempt('runCode', () => s.runCode('print(6*7)'));
        if (ex && ex.stdout === '42\n') execs.push(performance.now() - t0);
        else if (ex) loadFailures.record('runCode', new Error(`wrong answer ${JSON.stringify(ex.stdout)}`));
      }
    }));
    rows.push(timingRow(`cluster: 3 nodes × ${perNode} live, ${CLIENTS} clients exec`, summarize(execs), 'zero errors', '–',
      loadFailures.report(status(loadFailures.count === 0 && live.length === want))));
    notes.push(`cluster load: ${live.length}/${want} sandboxes live, ${execs.length} execs, ${loadFailures.count} errors`);
    await Promise.allSettled(live.map((s) => s.close()));
  } finally {
    await cluster.close();
  }
}
