/**
 * A gateway's view of the hosts: read from PostgreSQL every `refreshMs` and at once when a node
 * NOTIFYs, aged locally between reads. A host whose heartbeat is older than `hostTtlMs` is stale:
 * no placements, and its sandboxes answer 503 `node_unavailable`. Routing asks this table only
 * (memory), never the database. When the database cannot be read the view is kept as it was, not
 * aged: losing the database must not make every sandbox unreachable (connection errors still show).
 * When it can be read again (a failover done), the hosts that were fresh when it went away stay
 * fresh for one more TTL: their heartbeats could not be written meanwhile, which says nothing about
 * them, and they resume within a heartbeat or two.
 */
import type pg from 'pg';
import { HOSTS_CHANNEL } from './host-registry.js';

export interface HostView {
  id: string;
  address: string;
  ready: boolean;
  draining: boolean;
  live: number;
  capacity: number;
  poolReady: number;
  poolTarget: number;
  /** Heartbeat age when read, in ms (database clock). */
  ageMs: number;
  /** When it was read (this process's clock). */
  readAt: number;
}

export interface HostTableOptions {
  refreshMs?: number;
  hostTtlMs?: number;
  onError?: (err: Error) => void;
}

export class HostTable {
  private hosts = new Map<string, HostView>();
  private dbHealthy = true;
  private frozenAt = 0;
  /** Hosts fresh when the database went away, and when it came back: they get one TTL of grace. */
  private graceFor = new Set<string>();
  private recoveredAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private listener: pg.PoolClient | undefined;
  private listening = false;
  private closed = false;
  private refreshing: Promise<void> | null = null;
  private again = false;
  readonly hostTtlMs: number;

  constructor(private readonly db: pg.Pool, private readonly opts: HostTableOptions = {}) {
    this.hostTtlMs = opts.hostTtlMs ?? 3000;
  }

  async start(): Promise<void> {
    await this.refresh();
    this.timer = setInterval(() => void this.refresh(), this.opts.refreshMs ?? 500);
  }

  /** LISTENs on its own connection; re-established after the database comes back. */
  private async listen(): Promise<void> {
    if (this.listening || this.closed) return;
    this.listening = true;
    let client: pg.PoolClient | undefined;
    try {
      client = await this.db.connect();
      const mine = client;
      mine.on('notification', () => void this.refresh());
      mine.on('error', () => {
        if (this.listener === mine) this.listener = undefined;
        mine.release(true);
      });
      await mine.query(`LISTEN ${HOSTS_CHANNEL}`);
      if (this.closed) mine.release(true);
      else this.listener = mine;
    } catch (err) {
      client?.release(true);
      this.opts.onError?.(err as Error);
    } finally {
      this.listening = false;
    }
  }

  /** Re-reads the hosts (coalesced: one read at a time, one more if asked meanwhile). */
  refresh(): Promise<void> {
    if (this.refreshing) { this.again = true; return this.refreshing; }
    this.refreshing = (async () => {
      do {
        this.again = false;
        try {
          const { rows } = await this.db.query<{ id: string; address: string; ready: boolean; draining: boolean; live: number; capacity: number;
            pool_ready: number; pool_target: number; age_ms: number }>(
            `SELECT id, address, ready, draining, live, capacity, pool_ready, pool_target,
                    (extract(epoch FROM (now() - heartbeat_at)) * 1000)::float8 AS age_ms FROM hosts`);
          const now = Date.now();
          if (!this.dbHealthy) this.recoveredAt = now;
          this.hosts = new Map(rows.map((r) => [r.id, {
            id: r.id, address: r.address, ready: r.ready, draining: r.draining, live: r.live, capacity: r.capacity,
            poolReady: r.pool_ready, poolTarget: r.pool_target, ageMs: r.age_ms, readAt: now,
          }]));
          this.dbHealthy = true;
          if (!this.listener) void this.listen();
        } catch (err) {
          if (this.dbHealthy) {
            this.frozenAt = Date.now();
            this.graceFor = new Set(this.all().filter((h) => this.isFresh(h)).map((h) => h.id));
          }
          this.dbHealthy = false;
          this.opts.onError?.(err as Error);
        }
      } while (this.again);
    })().finally(() => { this.refreshing = null; });
    return this.refreshing;
  }

  get(id: string): HostView | undefined {
    return this.hosts.get(id);
  }

  all(): HostView[] {
    return [...this.hosts.values()];
  }

  /** Heartbeat age now: the age read plus the time since (frozen while the database is unreadable). */
  ageOf(h: HostView): number {
    const until = this.dbHealthy ? Date.now() : this.frozenAt;
    return h.ageMs + Math.max(0, until - h.readAt);
  }

  /** Heartbeating within the TTL (its sandboxes are routed to). */
  isFresh(h: HostView): boolean {
    if (this.ageOf(h) <= this.hostTtlMs) return true;
    return this.dbHealthy && this.graceFor.has(h.id) && Date.now() - this.recoveredAt <= this.hostTtlMs;
  }

  /** Fresh, ready and not draining: may take new sandboxes. */
  placeable(): HostView[] {
    return this.all().filter((h) => h.ready && !h.draining && this.isFresh(h));
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    await this.refreshing;
    if (this.listener) {
      this.listener.release(true);
      this.listener = undefined;
    }
  }
}
