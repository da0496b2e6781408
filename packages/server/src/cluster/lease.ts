/**
 * A lease for leader-only jobs (reaping, pool rebalancing): one holder at a time, for a TTL, with
 * an epoch that grows each time the lease changes hands. A job's writes carry the epoch and are
 * guarded by {@link LEASE_GUARD}, so a holder that paused past its TTL (and lost the lease) cannot
 * write anything once another has taken over.
 */
import type pg from 'pg';

export interface LeaseHeld {
  name: string;
  holder: string;
  epoch: number;
}

/** SQL to AND into a job's write: true only while ($1 name, $2 holder, $3 epoch) still holds the lease. */
export const LEASE_GUARD = 'EXISTS (SELECT 1 FROM leases WHERE name=$1 AND holder=$2 AND epoch=$3 AND expires_at > now())';

/** Takes or renews the lease; the lease held, or null when another holder's is still valid. */
export async function acquireLease(db: pg.Pool, name: string, holder: string, ttlMs: number): Promise<LeaseHeld | null> {
  const { rows } = await db.query<{ epoch: string }>(
    `INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, now() + make_interval(secs => $3::float8 / 1000))
     ON CONFLICT (name) DO UPDATE SET holder=$2, expires_at=EXCLUDED.expires_at,
       epoch = CASE WHEN leases.holder = $2 THEN leases.epoch ELSE leases.epoch + 1 END
     WHERE leases.holder = $2 OR leases.expires_at < now()
     RETURNING epoch`,
    [name, holder, ttlMs],
  );
  return rows[0] ? { name, holder, epoch: Number(rows[0].epoch) } : null;
}
