/** Pool fill per template, hit rate, latency histograms, lifecycle counters and the host's load. */
import { bytes, duration, seconds } from './format.js';
import type { HistogramSnapshot, HostSnapshot } from './types.js';

export function PoolPanel({ host }: { host: HostSnapshot | null }) {
  if (!host) return <p class="empty">Waiting for the server…</p>;
  const h = host.host;
  return (
    <section class="pool" data-testid="pool-panel">
      <h2>Pool and host{host.cluster_host ? ` (${host.cluster_host})` : ''}</h2>
      <h3>Warm pool</h3>
      <table>
        <thead><tr><th>template</th><th>egress</th><th>ready / target</th><th>starting</th><th>hits</th><th>misses</th><th>hit rate</th></tr></thead>
        <tbody>
          {host.pools.map((p) => {
            const total = p.hits + p.misses;
            return (
              <tr key={`${p.template}-${p.egress}`} data-testid="pool-row">
                <td>{p.template}</td><td>{p.egress ? 'on' : 'off'}</td>
                <td><meter min={0} max={Math.max(1, p.target)} value={p.ready} /> {p.ready} / {p.target}</td>
                <td>{p.starting}</td><td>{p.hits}</td><td>{p.misses}</td>
                <td>{total ? `${Math.round((100 * p.hits) / total)}%` : '–'}</td>
              </tr>
            );
          })}
        </tbody>
      </table>
      <h3>Latency</h3>
      <div class="histograms">
        <Histogram title="create" h={host.metrics.histograms.create} />
        <Histogram title="exec" h={host.metrics.histograms.exec} />
        <Histogram title="fork" h={host.metrics.histograms.fork} />
      </div>
      <h3>Sandboxes</h3>
      <dl class="facts counters" data-testid="counters">
        {Object.entries(host.sandboxes).map(([k, v]) => [<dt key={`t${k}`}>{k}</dt>, <dd key={`d${k}`}>{v}</dd>])}
        {Object.entries(host.metrics.limit_kills).map(([k, v]) => [<dt key={`lt${k}`}>{k} limit kills</dt>, <dd key={`ld${k}`}>{v}</dd>])}
      </dl>
      <h3>Host</h3>
      <dl class="facts">
        <dt>host</dt><dd>{h.hostname}</dd>
        <dt>CPUs</dt><dd>{h.cpus}</dd>
        <dt>load</dt><dd>{h.loadavg.map((l) => l.toFixed(2)).join(' ')}</dd>
        <dt>memory</dt><dd>{bytes(h.total_memory - h.free_memory)} used of {bytes(h.total_memory)}</dd>
        <dt>server RSS</dt><dd>{bytes(h.server_rss)}</dd>
        <dt>exec history</dt><dd>{bytes(host.history_bytes)}</dd>
        <dt>server uptime</dt><dd>{duration(host.metrics.uptime_seconds * 1000)}</dd>
        <dt>Node</dt><dd>{h.node}</dd>
      </dl>
    </section>
  );
}

function Histogram({ title, h }: { title: string; h: HistogramSnapshot }) {
  const max = Math.max(1, ...h.counts);
  const labels = [...h.buckets.map((b) => `≤${seconds(b)}`), `>${seconds(h.buckets[h.buckets.length - 1] ?? 0)}`];
  return (
    <figure class="histogram" data-testid={`histogram-${title}`}>
      <figcaption>{title}: {h.count} calls{h.count ? `, mean ${seconds(h.sum / h.count)}` : ''}</figcaption>
      <div class="bars">
        {h.counts.map((c, i) => (
          <div key={i} class="bar" title={`${labels[i]}: ${c}`}>
            <div class="fill" style={{ height: `${(100 * c) / max}%` }} />
            <span class="count">{c || ''}</span>
            <span class="label">{labels[i]}</span>
          </div>
        ))}
      </div>
    </figure>
  );
}
