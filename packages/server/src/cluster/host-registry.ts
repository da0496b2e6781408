/**
 * A node's row in `hosts` and its warm slots in `slots`: registered at start, refreshed by every
 * heartbeat (load, pool, and one slot row per ready pooled sandbox so gateways can claim them with
 * `FOR UPDATE SKIP LOCKED`), marked draining when it stops. Every change that matters to placement
 * is announced with NOTIFY so gateways re-read at once; NOTIFY only wakes them, the rows are the truth.
 */
import type pg from 'pg';

/** The NOTIFY channel gateways LISTEN on for host changes. */
export const HOSTS_CHANNEL = 'podflare_hosts';

export interface HostLoad {
  live: number;
  capacity: number;
  /** Ready pooled sandboxes per template. */
  poolReady: Map<string, number>;
  poolTarget: number;
}

export class HostRegistry {
  constructor(private readonly db: pg.Pool, readonly hostId: string, readonly address: string) {}

  /** Inserts or takes over this host's row (a restarted node keeps its id), not ready yet. */
  async register(): Promise<void> {
    await this.db.query(
      `INSERT INTO hosts (id, address, started_at, heartbeat_at, ready, draining) VALUES ($1, $2, now(), now(), false, false)
       ON CONFLICT (id) DO UPDATE SET address=$2, started_at=now(), heartbeat_at=now(), ready=false, draining=false`,
      [this.hostId, this.address],
    );
    await this.db.query('DELETE FROM slots WHERE host_id=$1', [this.hostId]);
    await this.notify();
  }

  /** One heartbeat: the row's time and load, and the slot rows brought to the pool's ready count. */
  async heartbeat(load: HostLoad): Promise<void> {
    const poolReady = [...load.poolReady.values()].reduce((a, b) => a + b, 0);
    const { rows } = await this.db.query<{ was_ready: boolean }>(
      `UPDATE hosts h SET heartbeat_at=now(), ready=true, live=$2, capacity=$3, pool_ready=$4, pool_target=$5
       FROM (SELECT ready AS was_ready FROM hosts WHERE id=$1) old WHERE h.id=$1 RETURNING old.was_ready`,
      [this.hostId, load.live, load.capacity, poolReady, load.poolTarget],
    );
    await this.syncSlots(load.poolReady);
    if (rows[0] && !rows[0].was_ready) await this.notify();
  }

  /**
   * Brings the slot rows to the pool's ready counts (per template). Called by every heartbeat and,
   * between them, as soon as the pool's counts change (a refill done): creates claim the sandboxes
   * that are ready now rather than a second ago.
   */
  async syncSlots(poolReady: ReadonlyMap<string, number>): Promise<void> {
    for (const [template, ready] of poolReady) {
      // Slots claimed by a gateway whose create has not arrived yet still count as ready in the
      // pool: at worst a create misses the pool and starts one on demand.
      await this.db.query(
        `WITH have AS (SELECT count(*)::int AS n FROM slots WHERE host_id=$1 AND template=$2),
              gone AS (DELETE FROM slots WHERE id IN (SELECT id FROM slots WHERE host_id=$1 AND template=$2
                         ORDER BY id LIMIT greatest((SELECT n FROM have) - $3, 0)))
         INSERT INTO slots (host_id, template) SELECT $1, $2 FROM generate_series(1, greatest($3 - (SELECT n FROM have), 0))`,
        [this.hostId, template, ready],
      );
    }
  }

  /** Stops placements here: draining, no slots. Sandboxes and the row stay (a restart takes the row back). */
  async drain(): Promise<void> {
    await this.db.query('UPDATE hosts SET draining=true, ready=false WHERE id=$1', [this.hostId]);
    await this.db.query('DELETE FROM slots WHERE host_id=$1', [this.hostId]);
    await this.notify();
  }

  private async notify(): Promise<void> {
    await this.db.query('SELECT pg_notify($1, $2)', [HOSTS_CHANNEL, this.hostId]);
  }
}
