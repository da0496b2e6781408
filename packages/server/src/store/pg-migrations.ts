/**
 * The PostgreSQL schema as numbered migrations. Each runs once, in its own transaction, under an
 * advisory lock: nodes and gateways starting together against one database apply each step exactly
 * once. Never edit a released step; add the next one.
 */
import type pg from 'pg';

/** An arbitrary constant: the advisory lock every migrator takes (one per database). */
const MIGRATION_LOCK = 7_070_024;

export const MIGRATIONS: readonly string[] = [
  // 1: the records, as in the SQLite store, plus the host that owns each live sandbox.
  `CREATE TABLE sandboxes (
     id TEXT PRIMARY KEY,
     state TEXT NOT NULL,
     template TEXT NOT NULL,
     runtime TEXT NOT NULL,
     egress JSONB NOT NULL,
     persistent BOOLEAN NOT NULL,
     parent_id TEXT,
     created_at BIGINT NOT NULL,
     last_active_at BIGINT NOT NULL,
     ended_at BIGINT,
     end_reason TEXT,
     idle_timeout_seconds INTEGER NOT NULL,
     max_lifetime_seconds INTEGER NOT NULL,
     metadata JSONB NOT NULL,
     owner TEXT NOT NULL,
     limits JSONB,
     host_id TEXT
   );
   CREATE INDEX sandboxes_parent ON sandboxes(parent_id);
   CREATE INDEX sandboxes_state ON sandboxes(state);
   CREATE INDEX sandboxes_host ON sandboxes(host_id);`,
  // 2: the cluster: hosts (heartbeats), warm slots (one row per ready pooled sandbox), idempotency
  // keys of creates, and leases of leader-only jobs.
  `CREATE TABLE hosts (
     id TEXT PRIMARY KEY,
     address TEXT NOT NULL,
     started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
     heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
     ready BOOLEAN NOT NULL DEFAULT false,
     draining BOOLEAN NOT NULL DEFAULT false,
     live INTEGER NOT NULL DEFAULT 0,
     capacity INTEGER NOT NULL DEFAULT 0,
     pool_ready INTEGER NOT NULL DEFAULT 0,
     pool_target INTEGER NOT NULL DEFAULT 0
   );
   CREATE TABLE slots (
     id BIGSERIAL PRIMARY KEY,
     host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
     template TEXT NOT NULL
   );
   CREATE INDEX slots_template ON slots(template, host_id);
   CREATE TABLE idempotency_keys (
     owner TEXT NOT NULL,
     key TEXT NOT NULL,
     sandbox_id TEXT,
     host_id TEXT,
     created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
     PRIMARY KEY (owner, key)
   );
   CREATE TABLE leases (
     name TEXT PRIMARY KEY,
     holder TEXT NOT NULL,
     epoch BIGINT NOT NULL,
     expires_at TIMESTAMPTZ NOT NULL
   );`,
];

/** Applies the migrations this database lacks; returns how many it applied. */
export async function migrate(pool: pg.Pool): Promise<number> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK]);
    await client.query('CREATE TABLE IF NOT EXISTS podflare_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())');
    const { rows } = await client.query<{ v: number | null }>('SELECT max(version) AS v FROM podflare_migrations');
    const current = rows[0]?.v ?? 0;
    for (let v = current + 1; v <= MIGRATIONS.length; v++) {
      await client.query(MIGRATIONS[v - 1]!);
      await client.query('INSERT INTO podflare_migrations (version) VALUES ($1)', [v]);
    }
    await client.query('COMMIT');
    return MIGRATIONS.length - current;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}
