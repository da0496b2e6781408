/**
 * The PostgreSQL store (the `pg` driver), for the cluster mode: the same records as the SQLite
 * store, plus the host that owns each sandbox. A store made for one node (`hostId`) writes that id
 * into the records it inserts and lists only its own: a node reconciling at start must never touch
 * another node's sandboxes. `get` and `children` are not scoped (ids are unique cluster-wide).
 */
import pg from 'pg';
import type { EgressSetting, SandboxState } from '@podflare/protocol';
import { migrate } from './pg-migrations.js';
import { openPgPool } from './pg-pool.js';
import { ENDED_STATES, type RecordLimits, type SandboxFilter, type SandboxRecord, type SandboxStore } from './store.js';

/** Something that runs a query: the pool, or one client inside a transaction. */
type Queryable = Pick<pg.Pool, 'query'>;

interface Row {
  id: string; state: string; template: string; runtime: string; egress: EgressSetting; persistent: boolean;
  parent_id: string | null; created_at: string | number; last_active_at: string | number; ended_at: string | number | null;
  end_reason: string | null; idle_timeout_seconds: number; max_lifetime_seconds: number; metadata: Record<string, string>;
  owner: string; limits: RecordLimits | null; host_id: string | null;
}

const COLUMNS: Record<keyof Omit<SandboxRecord, 'id'>, string> = {
  state: 'state', template: 'template', runtime: 'runtime', egress: 'egress', persistent: 'persistent',
  parentId: 'parent_id', createdAt: 'created_at', lastActiveAt: 'last_active_at', endedAt: 'ended_at',
  endReason: 'end_reason', idleTimeoutSeconds: 'idle_timeout_seconds', maxLifetimeSeconds: 'max_lifetime_seconds',
  metadata: 'metadata', owner: 'owner', limits: 'limits',
};
const JSON_KEYS = new Set(['metadata', 'limits', 'egress']);

function toColumns(r: Partial<SandboxRecord>): Array<[column: string, value: unknown]> {
  const out: Array<[string, unknown]> = [];
  for (const [key, col] of Object.entries(COLUMNS)) {
    const v = (r as Record<string, unknown>)[key];
    if (v === undefined) continue;
    out.push([col, JSON_KEYS.has(key) ? JSON.stringify(v) : v]);
  }
  return out;
}

function fromRow(row: Row): SandboxRecord {
  return {
    id: row.id, state: row.state as SandboxState, template: row.template, runtime: row.runtime,
    egress: row.egress, persistent: row.persistent, parentId: row.parent_id, createdAt: Number(row.created_at),
    lastActiveAt: Number(row.last_active_at), endedAt: row.ended_at === null ? null : Number(row.ended_at), endReason: row.end_reason,
    idleTimeoutSeconds: row.idle_timeout_seconds, maxLifetimeSeconds: row.max_lifetime_seconds,
    metadata: row.metadata, owner: row.owner, ...(row.limits ? { limits: row.limits } : {}),
  };
}

export interface PgStoreOptions {
  /** `postgres://user:pass@host:port/db` (a unix socket: `postgres://user@/db?host=/run/postgresql`). */
  connectionString: string;
  /** The node this store is for: inserts are stamped with it and lists show only its records. */
  hostId?: string;
  /** Connections kept open. @default 8 */
  maxConnections?: number;
}

/** The PostgreSQL store. Make it with {@link PgStore.open} (which migrates the schema). */
export class PgStore implements SandboxStore {
  private constructor(
    private readonly db: Queryable,
    private readonly pool: pg.Pool | null,
    private readonly hostId: string | undefined,
  ) {}

  /** Connects, applies missing migrations and returns the store. */
  static async open(opts: PgStoreOptions): Promise<PgStore> {
    const pool = openPgPool(opts.connectionString, { max: opts.maxConnections ?? 8 });
    // An idle client whose server went away emits 'error'; unhandled it would end the process.
    pool.on('error', () => {});
    try {
      await migrate(pool);
    } catch (err) {
      await pool.end();
      throw err;
    }
    return new PgStore(pool, pool, opts.hostId);
  }

  async insert(record: SandboxRecord): Promise<void> {
    const cols: Array<[string, unknown]> = [['id', record.id], ...toColumns(record)];
    if (this.hostId !== undefined) cols.push(['host_id', this.hostId]);
    await this.db.query(
      `INSERT INTO sandboxes (${cols.map(([c]) => c).join(',')}) VALUES (${cols.map((_, i) => `$${i + 1}`).join(',')})`,
      cols.map(([, v]) => v),
    );
  }

  async update(id: string, patch: Partial<Omit<SandboxRecord, 'id'>>): Promise<void> {
    const cols = toColumns(patch);
    if (!cols.length) return;
    await this.db.query(
      `UPDATE sandboxes SET ${cols.map(([c], i) => `${c}=$${i + 2}`).join(',')} WHERE id=$1`,
      [id, ...cols.map(([, v]) => v)],
    );
  }

  async get(id: string): Promise<SandboxRecord | undefined> {
    const { rows } = await this.db.query<Row>('SELECT * FROM sandboxes WHERE id=$1', [id]);
    return rows[0] && fromRow(rows[0]);
  }

  async list(filter: SandboxFilter = {}): Promise<SandboxRecord[]> {
    const where: string[] = [];
    const params: unknown[] = [];
    const param = (v: unknown) => { params.push(v); return `$${params.length}`; };
    if (filter.ancestor) {
      where.push(`id IN (WITH RECURSIVE d(id) AS (SELECT id FROM sandboxes WHERE parent_id=${param(filter.ancestor)}
        UNION SELECT s.id FROM sandboxes s JOIN d ON s.parent_id=d.id) SELECT id FROM d)`);
    }
    if (filter.state) where.push(`state=${param(filter.state)}`);
    if (!filter.includeEnded) where.push(`NOT (state = ANY(${param(ENDED_STATES)}))`);
    if (filter.owner !== undefined) where.push(`owner=${param(filter.owner)}`);
    if (this.hostId !== undefined) where.push(`host_id=${param(this.hostId)}`);
    const sql = `SELECT * FROM sandboxes ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at, id`;
    return (await this.db.query<Row>(sql, params)).rows.map(fromRow);
  }

  async children(id: string): Promise<string[]> {
    const { rows } = await this.db.query<{ id: string }>('SELECT id FROM sandboxes WHERE parent_id=$1 ORDER BY created_at, id', [id]);
    return rows.map((r) => r.id);
  }

  async transaction<T>(fn: (tx: SandboxStore) => Promise<T>): Promise<T> {
    if (!this.pool) throw new Error('nested store transactions are not supported');
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      const result = await fn(new PgStore(client, null, this.hostId));
      await client.query('COMMIT');
      return result;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    } finally {
      client.release();
    }
  }

  /** The pool under this store, for the cluster's own tables (hosts, slots, leases). */
  get connections(): pg.Pool {
    if (!this.pool) throw new Error('a transaction view has no pool');
    return this.pool;
  }

  async close(): Promise<void> {
    await this.pool?.end();
  }
}
