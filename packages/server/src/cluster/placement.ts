/**
 * Where a new sandbox goes. First a warm slot, claimed in one statement with `FOR UPDATE SKIP LOCKED`
 * on slot rows (never on host rows: concurrent claims skip each other instead of queueing), only on
 * fresh, ready, non-draining hosts. Without a slot, the best of a few sampled hosts by load (E2B's
 * "power of choices"). Either way the node's admission control has the final word: a node that
 * refuses or fails is excluded and the next pick is tried.
 */
import type pg from 'pg';
import type { HostTable, HostView } from './host-table.js';

/** A claimed warm slot: the host that holds it and the slot row's id (never claimed again). */
export interface ClaimedSlot {
  hostId: string;
  slotId: string;
}

/** Claims one warm slot of `template` on a placeable host not in `exclude`; null when there is none. */
export async function claimSlot(db: pg.Pool, template: string, hostTtlMs: number, exclude: readonly string[]): Promise<ClaimedSlot | null> {
  const { rows } = await db.query<{ host_id: string; id: string }>(
    `DELETE FROM slots WHERE id = (
       SELECT s.id FROM slots s JOIN hosts h ON h.id = s.host_id
        WHERE s.template = $1 AND h.ready AND NOT h.draining
          AND h.heartbeat_at > now() - make_interval(secs => $2::float8 / 1000)
          AND NOT (s.host_id = ANY($3::text[]))
        ORDER BY random() LIMIT 1 FOR UPDATE OF s SKIP LOCKED)
     RETURNING host_id, id`,
    [template, hostTtlMs, exclude],
  );
  return rows[0] ? { hostId: rows[0].host_id, slotId: String(rows[0].id) } : null;
}

/**
 * The less loaded of `sample` random placeable hosts (load = live + creates this gateway has in
 * flight there, over capacity); null when none is left.
 */
export function pickByLoad(hosts: HostTable, inFlight: ReadonlyMap<string, number>, exclude: readonly string[], sample = 2): HostView | null {
  const candidates = hosts.placeable().filter((h) => !exclude.includes(h.id));
  const picked: HostView[] = [];
  while (picked.length < sample && candidates.length) picked.push(candidates.splice(Math.floor(Math.random() * candidates.length), 1)[0]!);
  const load = (h: HostView) => (h.live + (inFlight.get(h.id) ?? 0)) / Math.max(1, h.capacity);
  return picked.sort((a, b) => load(a) - load(b))[0] ?? null;
}
