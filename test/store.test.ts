/**
 * The store conformance suite, run against both stores: SQLite (what `podflare serve` uses) and
 * PostgreSQL (the cluster mode; a real server from Debian's package, started for this file). Each
 * check is what the sandbox manager relies on: round trips of every field, the list filters, the
 * lineage, and transactions that land whole or not at all.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { acquireLease, LEASE_GUARD } from '../packages/server/dist/cluster/lease.js';
import { claimSlot } from '../packages/server/dist/cluster/placement.js';
import { openPgPool, parseTargets } from '../packages/server/dist/store/pg-pool.js';
import { PgStore } from '../packages/server/dist/store/pg-store.js';
import { SqliteStore } from '../packages/server/dist/store/sqlite-store.js';
import type { SandboxRecord, SandboxStore } from '../packages/server/dist/store/store.js';
import { startTestPostgres, type TestPostgres } from './helpers/postgres.js';

let seq = 0;
function record(over: Partial<SandboxRecord> = {}): SandboxRecord {
  seq++;
  return {
    id: `sb-${process.pid}-${seq}-${Math.random().toString(36).slice(2, 8)}`, state: 'ready', template: 'default', runtime: 'ns',
    egress: true, persistent: false, parentId: null, createdAt: 1_700_000_000_000 + seq, lastActiveAt: 1_700_000_000_000 + seq,
    endedAt: null, endReason: null, idleTimeoutSeconds: 300, maxLifetimeSeconds: 86_400, metadata: {}, owner: 'o1', ...over,
  };
}

/** The checks every store passes. `open` gives a fresh, empty store. */
function conformance(name: string, open: () => Promise<SandboxStore>) {
  describe(`${name} store`, () => {
    let store: SandboxStore;
    before(async () => { store = await open(); });
    after(async () => { await store.close(); });

    it('round-trips every field, JSON ones and the allowlist egress included', async () => {
      const r = record({
        egress: { allow: ['example.org', '*.pypi.org'] } as unknown as SandboxRecord['egress'], persistent: true,
        metadata: { team: 'a', 'k"ey': 'v\u00e9' }, owner: 'f'.repeat(64),
        limits: { cpus: 1.5, memoryBytes: 512 * 2 ** 20, diskBytes: 2 ** 30, pids: 64 },
        endedAt: null, endReason: null, createdAt: Date.now(), lastActiveAt: Date.now(),
      });
      await store.insert(r);
      assert.deepEqual(await store.get(r.id), r);
      const bare = record({ egress: false });
      await store.insert(bare);
      const got = await store.get(bare.id);
      assert.equal(got?.egress, false);
      assert.equal('limits' in got!, false, 'a record without limits reads back without them');
      assert.equal(await store.get('nope'), undefined);
    });

    it('update changes only the given fields', async () => {
      const r = record();
      await store.insert(r);
      await store.update(r.id, { state: 'stopped', endedAt: 42, endReason: 'deleted', metadata: { x: '1' } });
      assert.deepEqual(await store.get(r.id), { ...r, state: 'stopped', endedAt: 42, endReason: 'deleted', metadata: { x: '1' } });
      await store.update(r.id, {});
      await store.update('missing', { state: 'error' }); // no row: no error
    });

    it('lists by owner, state, ended or not, and whole lineages', async () => {
      const owner = `owner-${seq}`;
      const root = record({ owner });
      const a = record({ owner, parentId: root.id });
      const b = record({ owner, parentId: root.id, state: 'running' });
      const aa = record({ owner, parentId: a.id, state: 'stopped', endedAt: 1 });
      for (const r of [root, a, b, aa]) await store.insert(r);
      const ids = (rs: SandboxRecord[]) => rs.map((r) => r.id);
      assert.deepEqual(ids(await store.list({ owner })), [root.id, a.id, b.id], 'ended ones are left out, in creation order');
      assert.deepEqual(ids(await store.list({ owner, includeEnded: true })), [root.id, a.id, b.id, aa.id]);
      assert.deepEqual(ids(await store.list({ owner, state: 'running' })), [b.id]);
      assert.deepEqual(ids(await store.list({ ancestor: root.id, includeEnded: true })), [a.id, b.id, aa.id]);
      assert.deepEqual(ids(await store.list({ ancestor: a.id })), []);
      assert.deepEqual(await store.children(root.id), [a.id, b.id]);
      assert.deepEqual(await store.children(aa.id), []);
      assert.ok((await store.list({})).length >= 3);
    });

    it('a transaction lands whole: a merge retires the winner and reparents its children together', async () => {
      const parent = record();
      const winner = record({ parentId: parent.id });
      const grandchild = record({ parentId: winner.id });
      for (const r of [parent, winner, grandchild]) await store.insert(r);
      const out = await store.transaction(async (tx) => {
        await tx.update(winner.id, { state: 'merged', endedAt: 5, endReason: 'merged' });
        for (const child of await tx.children(winner.id)) await tx.update(child, { parentId: parent.id });
        return 'done';
      });
      assert.equal(out, 'done');
      assert.equal((await store.get(winner.id))?.state, 'merged');
      assert.equal((await store.get(grandchild.id))?.parentId, parent.id);
    });

    it('a transaction that throws leaves nothing behind (fork records are all or none)', async () => {
      const parent = record();
      await store.insert(parent);
      const kids = [record({ parentId: parent.id }), record({ parentId: parent.id })];
      await assert.rejects(store.transaction(async (tx) => {
        await tx.update(parent.id, { state: 'running' });
        for (const k of kids) await tx.insert(k);
        throw new Error('the fork failed');
      }), /the fork failed/);
      assert.equal((await store.get(parent.id))?.state, 'ready');
      assert.deepEqual(await store.children(parent.id), []);
      await store.transaction(async (tx) => { for (const k of kids) await tx.insert(k); });
      assert.deepEqual((await store.children(parent.id)).sort(), kids.map((k) => k.id).sort());
    });

    it('a duplicate id is refused', async () => {
      const r = record();
      await store.insert(r);
      await assert.rejects(store.insert(r));
    });
  });
}

const tmp: string[] = [];
conformance('SQLite', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'podflare-store-'));
  tmp.push(dir);
  return new SqliteStore(path.join(dir, 'podflare.db'));
});
after(async () => { for (const d of tmp) await rm(d, { recursive: true, force: true }); });

let pgServer: TestPostgres;
before(async () => { pgServer = await startTestPostgres(); });
after(async () => { await pgServer?.stop(); });
conformance('PostgreSQL', () => PgStore.open({ connectionString: pgServer.url }));

describe('PostgreSQL store in the cluster', () => {
  it('migrations apply once, also when several processes open the database at the same time', async () => {
    const stores = await Promise.all([1, 2, 3].map(() => PgStore.open({ connectionString: pgServer.url })));
    await Promise.all(stores.map((s) => s.close()));
    assert.equal(pgServer.psql('SELECT count(*) FROM podflare_migrations').trim(), '2');
  });

  it("a node's store lists only its own sandboxes (a node reconciling at start never touches another's)", async () => {
    const a = await PgStore.open({ connectionString: pgServer.url, hostId: 'host-a' });
    const b = await PgStore.open({ connectionString: pgServer.url, hostId: 'host-b' });
    const owner = `scoped-${seq}`;
    const ra = record({ owner });
    const rb = record({ owner });
    await a.insert(ra);
    await b.insert(rb);
    assert.deepEqual((await a.list({ owner })).map((r) => r.id), [ra.id]);
    assert.deepEqual((await b.list({ owner })).map((r) => r.id), [rb.id]);
    assert.equal((await a.get(rb.id))?.id, rb.id, 'get is not scoped: ids are unique cluster-wide');
    assert.equal(pgServer.psql(`SELECT host_id FROM sandboxes WHERE id='${ra.id}'`).trim(), 'host-a');
    await a.close();
    await b.close();
  });

  it('a wrong database address fails to open with the driver\'s error', async () => {
    await assert.rejects(PgStore.open({ connectionString: `postgres://postgres@/podflare?host=${encodeURIComponent('/nonexistent')}&port=1` }));
  });

  it('warm slots: concurrent claims (FOR UPDATE SKIP LOCKED) take each slot once, only from fresh, ready, non-draining hosts', async () => {
    const store = await PgStore.open({ connectionString: pgServer.url });
    const db = store.connections;
    await db.query(`INSERT INTO hosts (id, address, ready, draining, heartbeat_at) VALUES
      ('slot-a', 'a:1', true, false, now()), ('slot-b', 'b:1', true, false, now()),
      ('slot-stale', 's:1', true, false, now() - interval '1 hour'), ('slot-draining', 'd:1', true, true, now()),
      ('slot-starting', 'n:1', false, false, now())`);
    for (const h of ['slot-a', 'slot-b', 'slot-stale', 'slot-draining', 'slot-starting']) {
      await db.query(`INSERT INTO slots (host_id, template) SELECT $1, 'slot-test' FROM generate_series(1, 25)`, [h]);
    }
    const claimed: string[] = [];
    const slotIds = new Set<string>();
    await Promise.all(Array.from({ length: 8 }, async () => {
      for (;;) {
        const slot = await claimSlot(db, 'slot-test', 3000, []);
        if (!slot) return;
        claimed.push(slot.hostId);
        slotIds.add(slot.slotId);
      }
    }));
    assert.equal(claimed.length, 50, 'the 50 slots of the two placeable hosts, each once');
    assert.equal(slotIds.size, 50);
    assert.deepEqual([...new Set(claimed)].sort(), ['slot-a', 'slot-b']);
    assert.equal(await claimSlot(db, 'slot-test', 3000, []), null);
    await db.query(`INSERT INTO slots (host_id, template) VALUES ('slot-a', 'slot-test')`);
    assert.equal(await claimSlot(db, 'slot-test', 3000, ['slot-a']), null, 'an excluded host is skipped');
    await store.close();
  });

  it('a leader lease: one holder at a time, the epoch grows on a change of hands, a lost holder cannot write', async () => {
    const store = await PgStore.open({ connectionString: pgServer.url });
    const db = store.connections;
    const first = await acquireLease(db, 'test-job', 'gw-1', 300);
    assert.ok(first);
    assert.equal(await acquireLease(db, 'test-job', 'gw-2', 300), null, 'held by another');
    assert.equal((await acquireLease(db, 'test-job', 'gw-1', 300))?.epoch, first.epoch, 'a renewal keeps the epoch');
    await new Promise((r) => setTimeout(r, 400));
    const second = await acquireLease(db, 'test-job', 'gw-2', 10_000);
    assert.ok(second && second.epoch === first.epoch + 1, 'expired: taken over with the next epoch');
    // gw-1 paused past its lease and now writes with its old epoch: the guard refuses.
    await db.query(`INSERT INTO idempotency_keys (owner, key, created_at) VALUES ('lease-test', 'k', now() - interval '2 days')`);
    const stale = await db.query(`DELETE FROM idempotency_keys WHERE owner='lease-test' AND ${LEASE_GUARD}`, ['test-job', 'gw-1', first.epoch]);
    assert.equal(stale.rowCount, 0);
    const current = await db.query(`DELETE FROM idempotency_keys WHERE owner='lease-test' AND ${LEASE_GUARD}`, ['test-job', 'gw-2', second.epoch]);
    assert.equal(current.rowCount, 1);
    await store.close();
  });
});

describe('PostgreSQL connection strings that follow the primary (libpq multi-host)', () => {
  it('reads every member, in both of libpq\'s spellings, and the rest of the URL', () => {
    const tcp = parseTargets('postgres://pf:s%40cret@db1:5432,db2:5433,[::1]/podflare?target_session_attrs=read-write&application_name=gw');
    assert.deepEqual(tcp.members, [{ host: 'db1', port: 5432 }, { host: 'db2', port: 5433 }, { host: '::1', port: 5432 }]);
    assert.equal(tcp.readWrite, true);
    assert.deepEqual([tcp.base.user, tcp.base.password, tcp.base.database, tcp.base.application_name], ['pf', 's@cret', 'podflare', 'gw']);
    const sockets = parseTargets('postgres://postgres@/podflare?host=/run/a,/run/b&port=5432,5433&target_session_attrs=read-write');
    assert.deepEqual(sockets.members, [{ host: '/run/a', port: 5432 }, { host: '/run/b', port: 5433 }]);
    assert.equal(parseTargets('postgres://x@db/podflare').readWrite, false);
  });

  it('connects to the writable member, skipping one that is down, and says so when none is', async () => {
    const pg = await startTestPostgres();
    try {
      const { members, base } = parseTargets(pg.url);
      // A member nobody listens on first, then the real one.
      const url = `postgres://${base.user}@/podflare?host=${encodeURIComponent(pg.socketDir)},${encodeURIComponent(pg.socketDir)}` +
        `&port=1,${members[0]!.port}&target_session_attrs=read-write`;
      const pool = openPgPool(url, { max: 2 });
      assert.equal((await pool.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
      await pool.end();
      const none = openPgPool(`postgres://${base.user}@/podflare?host=${encodeURIComponent(pg.socketDir)}&port=1&target_session_attrs=read-write`,
        { connectTimeoutMs: 2000 });
      none.on('error', () => {});
      await assert.rejects(none.query('SELECT 1'), /no writable PostgreSQL member/);
      await none.end();
    } finally {
      await pg.stop();
    }
  });
});
