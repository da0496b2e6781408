/**
 * Cluster mode across a database failover, all real: etcd and two PostgreSQL instances managed by
 * Patroni (Debian packages, synchronous replication), two `podflare node` processes in network
 * namespaces and a gateway, every one of them given the libpq multi-host URL with
 * `target_session_attrs=read-write` (docs/cluster.md). Then a planned switchover and a killed
 * primary, each under load: execs on an existing sandbox never fail, a create answers 201 or 503
 * with Retry-After (never hangs) and they succeed again within 30 s of the promotion, and no warm
 * slot is claimed twice.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startCluster, type TestCluster } from './helpers/cluster.js';
import { startPatroniCluster, type PatroniCluster } from './helpers/patroni.js';

let db: PatroniCluster;
let cluster: TestCluster;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** A create that takes longer than this hangs, as far as a caller is concerned. */
const HANG_MS = 20_000;
/** Slot ids answered by every create of the file: a slot claimed twice shows as a repeat. */
const slotsSeen: string[] = [];

interface CreateOutcome { at: number; status: number | 'hang' | string; retryAfter: string | null; ms: number }

async function createOnce(): Promise<CreateOutcome> {
  const at = Date.now();
  try {
    const res = await fetch(`${cluster.gateways[0]!.url}/v1/sandboxes`, {
      method: 'POST', body: '{}', signal: AbortSignal.timeout(HANG_MS),
      headers: { authorization: `Bearer ${cluster.apiKey}`, 'content-type': 'application/json' },
    });
    const body = (await res.json()) as { id?: string };
    const slot = res.headers.get('x-podflare-slot');
    if (slot) slotsSeen.push(slot);
    if (res.status === 201 && body.id) {
      // Closed again, best effort (a delete mid-failover may not be recorded; the cluster's end removes it).
      void fetch(`${cluster.gateways[0]!.url}/v1/sandboxes/${body.id}`, { method: 'DELETE', headers: { authorization: `Bearer ${cluster.apiKey}` } })
        .then((r) => r.body?.cancel(), () => {});
    }
    return { at, status: res.status, retryAfter: res.headers.get('retry-after'), ms: Date.now() - at };
  } catch (err) {
    const hang = (err as Error).name === 'TimeoutError';
    return { at, status: hang ? 'hang' : String(err), retryAfter: null, ms: Date.now() - at };
  }
}

/**
 * Runs execs on `sbx` and creates through the gateway while `failover` happens; returns what they
 * saw and when the new primary was promoted (the first moment Patroni named `expectLeader`).
 */
async function underLoad(sbx: Sandbox, failover: () => Promise<void>, expectLeader: string) {
  let stop = false;
  const execErrors: string[] = [];
  const execTimes: number[] = [];
  const creates: CreateOutcome[] = [];
  let counter = Number((await sbx.runCode('print(n)')).stdout.trim());
  const execLoop = (async () => {
    while (!stop) {
      try {
        const out = (await sbx.runCode('n += 1\nprint(n)', { timeoutMs: HANG_MS })).stdout.trim();
        counter++;
        if (out !== String(counter)) execErrors.push(`exec printed ${out}, expected ${counter}`);
        execTimes.push(Date.now());
      } catch (err) {
        execErrors.push(String(err));
      }
      await sleep(100);
    }
  })();
  const createLoops = [0, 1].map(async () => {
    while (!stop) {
      const o = await createOnce();
      creates.push(o);
      if (o.status !== 201) await sleep(Math.min(2000, 1000 * Number(o.retryAfter ?? 1)) / 2);
    }
  });
  await sleep(1500);
  const failoverAt = Date.now();
  await failover();
  let promotedAt = 0;
  const deadline = Date.now() + 90_000;
  while (!promotedAt) {
    if ((await db.leader()) === expectLeader) promotedAt = Date.now();
    else if (Date.now() > deadline) throw new Error(`${expectLeader} was never promoted`);
    else await sleep(200);
  }
  // Run until creates have gone through again for a while (or 40 s after the promotion).
  while (Date.now() < promotedAt + 40_000) {
    const okAfter = creates.filter((c) => c.status === 201 && c.at > promotedAt);
    if (okAfter.length >= 4 && Date.now() > okAfter[0]!.at + 3000) break;
    await sleep(250);
  }
  stop = true;
  await Promise.all([execLoop, ...createLoops]);
  return { execErrors, execTimes, creates, failoverAt, promotedAt };
}

function checkOutcome(r: Awaited<ReturnType<typeof underLoad>>) {
  assert.deepEqual(r.execErrors, [], 'every exec on the existing sandbox went through');
  const during = r.execTimes.filter((t) => t > r.failoverAt && t < r.promotedAt + 2000);
  assert.ok(during.length >= 3, `execs ran during the failover (${during.length})`);
  const wrong = r.creates.filter((c) => !(c.status === 201 || (c.status === 503 && Number(c.retryAfter) > 0)));
  assert.deepEqual(wrong, [], 'a create answers 201, or 503 with Retry-After; none hangs');
  const firstOk = r.creates.find((c) => c.status === 201 && c.at >= r.promotedAt);
  assert.ok(firstOk, `creates succeed again after the promotion: ${JSON.stringify(r.creates.slice(-5))}`);
  const resumedMs = firstOk.at + firstOk.ms - r.promotedAt;
  assert.ok(resumedMs <= 30_000, `creates resumed ${resumedMs} ms after the promotion`);
  assert.equal(new Set(slotsSeen).size, slotsSeen.length, `no warm slot claimed twice: ${slotsSeen.join(',')}`);
  return { resumedMs, unavailable: r.creates.filter((c) => c.status === 503).length, ok: r.creates.filter((c) => c.status === 201).length };
}

before(async () => {
  db = await startPatroniCluster();
  try {
    cluster = await startCluster({ nodes: 2, gateways: 1, poolSize: 2, maxSandboxes: 32, database: db });
  } catch (err) {
    await db.stop();
    throw err;
  }
});
after(async () => {
  await cluster?.close();
  await db?.stop();
});

describe('cluster: PostgreSQL failover (Patroni + etcd)', () => {
  it('a switchover, then a killed primary: execs never stop, creates answer 503 + Retry-After and resume ≤ 30 s after promotion', async () => {
    const sbx = await Sandbox.create({ host: cluster.gateways[0]!.url, apiKey: cluster.apiKey });
    await sbx.runCode('n = 0');
    const first = await db.leader();
    assert.ok(first, 'Patroni has a leader');
    const other = db.members.find((m) => m.name !== first)!.name;

    const switched = await underLoad(sbx, () => db.switchover(first, other), other);
    const s = checkOutcome(switched);
    console.log(`switchover: creates ${s.ok} ok, ${s.unavailable} × 503; resumed ${s.resumedMs} ms after promotion`);

    // The member that leads now dies with its PostgreSQL (a host lost); the old primary, a
    // synchronous standby since the switchover, takes over when the leader key expires.
    await waitForSync();
    const killed = await underLoad(sbx, () => db.members.find((m) => m.name === other)!.kill9(), first);
    const k = checkOutcome(killed);
    console.log(`killed primary: creates ${k.ok} ok, ${k.unavailable} × 503; resumed ${k.resumedMs} ms after promotion`);

    // Leader-only jobs run again on the new primary: the janitor lease is renewed (TTL 10 s, every 2 s).
    const deadline = Date.now() + 30_000;
    while (db.psql("SELECT count(*) FROM leases WHERE name='janitor' AND expires_at > now() + interval '7 seconds'").trim() !== '1') {
      assert.ok(Date.now() < deadline, 'the janitor lease was renewed after the failover');
      await sleep(250);
    }
    // The sandbox made before it all is still the same interpreter, and its record is there.
    assert.match((await sbx.runCode('print(n > 0)')).stdout, /True/);
    assert.equal(db.psql(`SELECT state FROM sandboxes WHERE id='${sbx.id}'`).trim(), 'ready');
    await sbx.close();
  });
});

/** The demoted primary streams again as the synchronous standby (else a kill could lose commits). */
async function waitForSync(): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    for (const m of db.members) {
      if ((await fetch(`${m.restUrl}/sync`).then((r) => r.status, () => 0)) === 200) return;
    }
    if (Date.now() > deadline) throw new Error('no synchronous standby after the switchover');
    await sleep(250);
  }
}
