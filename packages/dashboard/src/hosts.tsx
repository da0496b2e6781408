/** The hosts of a cluster (through a gateway): each one's state, load and warm pool, from the `cluster` event. */
import { duration } from './format.js';
import type { ClusterHost, ClusterSnapshot } from './types.js';

function hostState(h: ClusterHost): string {
  if (!h.fresh) return 'silent';
  if (!h.reachable) return 'unreachable';
  if (h.draining) return 'draining';
  return h.ready ? 'up' : 'starting';
}

export function HostsPanel({ cluster }: { cluster: ClusterSnapshot }) {
  return (
    <section class="hosts" data-testid="cluster-hosts">
      <h2>Cluster hosts</h2>
      <table>
        <thead><tr><th>host</th><th>address</th><th>state</th><th>sandboxes / capacity</th><th>load average</th><th>pool ready / target</th><th>heartbeat</th></tr></thead>
        <tbody>
          {cluster.hosts.map((h) => (
            <tr key={h.id} data-testid="host-row" data-host={h.id} data-state={hostState(h)}>
              <td class="mono">{h.id}</td>
              <td class="mono">{h.address}</td>
              <td><span class={`state host-${hostState(h)}`}>{hostState(h)}</span></td>
              <td data-testid="host-load"><meter min={0} max={Math.max(1, h.capacity)} value={h.live} /> {h.live} / {h.capacity}</td>
              <td>{h.loadavg ? h.loadavg.map((l) => l.toFixed(2)).join(' ') : '–'}</td>
              <td data-testid="host-pool"><meter min={0} max={Math.max(1, h.pool.target)} value={h.pool.ready} /> {h.pool.ready} / {h.pool.target}</td>
              <td>{duration(h.heartbeat_age_ms)} ago</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
