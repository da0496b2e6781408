/** The SQLite store (better-sqlite3: synchronous, in-process, one file in the state directory). */
import { chmodSync, closeSync, existsSync, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import type { EgressSetting, SandboxState } from '@podflare/protocol';
import { ENDED_STATES, type RecordLimits, type SandboxFilter, type SandboxRecord, type SandboxStore } from './store.js';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS sandboxes (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  template TEXT NOT NULL,
  runtime TEXT NOT NULL,
  egress INTEGER NOT NULL, -- 1/0, or an allowlist policy as JSON text
  persistent INTEGER NOT NULL,
  parent_id TEXT,
  created_at INTEGER NOT NULL,
  last_active_at INTEGER NOT NULL,
  ended_at INTEGER,
  end_reason TEXT,
  idle_timeout_seconds INTEGER NOT NULL,
  max_lifetime_seconds INTEGER NOT NULL,
  metadata TEXT NOT NULL,
  owner TEXT NOT NULL,
  limits TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_parent ON sandboxes(parent_id);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
`;

interface Row {
  id: string; state: string; template: string; runtime: string; egress: number | string; persistent: number;
  parent_id: string | null; created_at: number; last_active_at: number; ended_at: number | null;
  end_reason: string | null; idle_timeout_seconds: number; max_lifetime_seconds: number; metadata: string; owner: string;
  limits: string | null;
}

/** Columns added after the first schema: added to older databases on open. */
const ADDED_COLUMNS: Array<[name: string, type: string]> = [['limits', 'TEXT']];

const COLUMNS: Record<keyof Omit<SandboxRecord, 'id'>, string> = {
  state: 'state', template: 'template', runtime: 'runtime', egress: 'egress', persistent: 'persistent',
  parentId: 'parent_id', createdAt: 'created_at', lastActiveAt: 'last_active_at', endedAt: 'ended_at',
  endReason: 'end_reason', idleTimeoutSeconds: 'idle_timeout_seconds', maxLifetimeSeconds: 'max_lifetime_seconds',
  metadata: 'metadata', owner: 'owner', limits: 'limits',
};

function toRow(r: Partial<SandboxRecord>): Record<string, unknown> {
  const row: Record<string, unknown> = {};
  for (const [key, col] of Object.entries(COLUMNS)) {
    const v = (r as Record<string, unknown>)[key];
    if (v === undefined) continue;
    row[col] = typeof v === 'boolean' ? Number(v) : key === 'metadata' || key === 'limits' || key === 'egress' ? JSON.stringify(v) : v;
  }
  return row;
}

function fromRow(row: Row): SandboxRecord {
  return {
    id: row.id, state: row.state as SandboxState, template: row.template, runtime: row.runtime,
    egress: typeof row.egress === 'string' ? (JSON.parse(row.egress) as EgressSetting) : !!row.egress, persistent: !!row.persistent, parentId: row.parent_id, createdAt: row.created_at,
    lastActiveAt: row.last_active_at, endedAt: row.ended_at, endReason: row.end_reason,
    idleTimeoutSeconds: row.idle_timeout_seconds, maxLifetimeSeconds: row.max_lifetime_seconds,
    metadata: JSON.parse(row.metadata) as Record<string, string>, owner: row.owner,
    ...(row.limits ? { limits: JSON.parse(row.limits) as RecordLimits } : {}),
  };
}

export class SqliteStore implements SandboxStore {
  private readonly db: Database.Database;

  constructor(file: string) {
    // Every tenant's records: root's alone. SQLite gives the -wal and -shm files the database's mode.
    closeSync(openSync(file, 'a', 0o600));
    for (const f of [file, `${file}-wal`, `${file}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL');
    this.db.exec(SCHEMA);
    const existing = new Set((this.db.prepare('PRAGMA table_info(sandboxes)').all() as Array<{ name: string }>).map((c) => c.name));
    for (const [name, type] of ADDED_COLUMNS) if (!existing.has(name)) this.db.exec(`ALTER TABLE sandboxes ADD COLUMN ${name} ${type}`);
  }

  async insert(record: SandboxRecord): Promise<void> {
    this.insertNow(record);
  }

  private insertNow(record: SandboxRecord): void {
    const row = { id: record.id, ...toRow(record) };
    const cols = Object.keys(row);
    this.db.prepare(`INSERT INTO sandboxes (${cols.join(',')}) VALUES (${cols.map((c) => '@' + c).join(',')})`).run(row);
  }

  async update(id: string, patch: Partial<Omit<SandboxRecord, 'id'>>): Promise<void> {
    this.updateNow(id, patch);
  }

  private updateNow(id: string, patch: Partial<Omit<SandboxRecord, 'id'>>): void {
    const row = toRow(patch);
    const cols = Object.keys(row);
    if (!cols.length) return;
    this.db.prepare(`UPDATE sandboxes SET ${cols.map((c) => `${c}=@${c}`).join(',')} WHERE id=@id`).run({ ...row, id });
  }

  async get(id: string): Promise<SandboxRecord | undefined> {
    const row = this.db.prepare('SELECT * FROM sandboxes WHERE id=?').get(id) as Row | undefined;
    return row && fromRow(row);
  }

  async list(filter: SandboxFilter = {}): Promise<SandboxRecord[]> {
    const where: string[] = [];
    const params: Record<string, unknown> = {};
    if (filter.ancestor) {
      where.push(`id IN (WITH RECURSIVE d(id) AS (SELECT id FROM sandboxes WHERE parent_id=@ancestor
        UNION SELECT s.id FROM sandboxes s JOIN d ON s.parent_id=d.id) SELECT id FROM d)`);
      params.ancestor = filter.ancestor;
    }
    if (filter.state) { where.push('state=@state'); params.state = filter.state; }
    if (!filter.includeEnded) where.push(`state NOT IN (${ENDED_STATES.map((s) => `'${s}'`).join(',')})`);
    if (filter.owner !== undefined) { where.push('owner=@owner'); params.owner = filter.owner; }
    const sql = `SELECT * FROM sandboxes ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at`;
    return (this.db.prepare(sql).all(params) as Row[]).map(fromRow);
  }

  async children(id: string): Promise<string[]> {
    return (this.db.prepare('SELECT id FROM sandboxes WHERE parent_id=? ORDER BY created_at').all(id) as Array<{ id: string }>).map((r) => r.id);
  }

  /**
   * better-sqlite3 is synchronous while `fn` is async: a BEGIN held across its awaits would take in
   * whatever other requests write meanwhile. So the view stages its writes and applies them in one
   * SQLite transaction when `fn` resolves; its reads see the committed rows.
   */
  async transaction<T>(fn: (tx: SandboxStore) => Promise<T>): Promise<T> {
    const staged: Array<() => void> = [];
    const view: SandboxStore = {
      insert: async (record) => { staged.push(() => this.insertNow(record)); },
      update: async (id, patch) => { staged.push(() => this.updateNow(id, patch)); },
      get: (id) => this.get(id),
      list: (filter) => this.list(filter),
      children: (id) => this.children(id),
      transaction: () => Promise.reject(new Error('nested store transactions are not supported')),
      close: async () => {},
    };
    const result = await fn(view);
    this.db.transaction(() => { for (const write of staged) write(); })();
    return result;
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
