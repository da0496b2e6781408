/** The manager's gauges in GET /v1/metrics: the warm pool and its zygotes, sandboxes by state, lifecycle events. */
import type { ManagerContext } from './context.js';
import type { PoolUse } from './pool-use.js';

export function registerManagerGauges(ctx: ManagerContext, pool: PoolUse): void {
  const m = ctx.metrics;
  const pools = () => pool.stats();
  const poolLabels = (p: { template: string; egress: boolean }) => ({ template: p.template, egress: String(p.egress) });
  m.gauge('podflare_pool_ready', 'Warm sandboxes ready to hand out, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.ready })));
  m.gauge('podflare_pool_target', 'Warm sandboxes the pool aims to keep, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.target })));
  m.gauge('podflare_pool_starting', 'Warm sandboxes starting, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.starting })));
  m.gauge('podflare_pool_hits_total', 'Creates served from the warm pool.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.hits })), 'counter');
  m.gauge('podflare_pool_misses_total', 'Creates that had to start a sandbox on demand.',
    () => pools().map((p) => ({ labels: poolLabels(p), value: p.misses })), 'counter');
  m.gauge('podflare_create_cold_total',
    'Creates that started their sandbox cold, by why: pool_off, cold_key, refilling (the pool did not keep up), starts_failing, empty, egress_policy.',
    () => [
      ...pool.missReasons().map((r) => ({ labels: { ...poolLabels(r.key), reason: r.reason }, value: r.count })),
      { labels: { template: '*', egress: 'policy', reason: 'egress_policy' }, value: pool.policyCreates },
    ], 'counter');
  const zygotes = () => pool.zygoteStats();
  m.gauge('podflare_zygote_ready', 'Whether the template\'s zygote (what pool refills and misses are forked from) is ready.',
    () => zygotes().map((z) => ({ labels: { template: z.template }, value: z.ready ? 1 : 0 })));
  m.gauge('podflare_zygote_forks_total', 'Sandboxes forked from the template\'s zygotes.',
    () => zygotes().map((z) => ({ labels: { template: z.template }, value: z.forked })), 'counter');
  m.gauge('podflare_zygote_starts_total', 'Zygotes started per template (more than one: one died and was replaced).',
    () => zygotes().map((z) => ({ labels: { template: z.template }, value: z.started })), 'counter');
  m.gauge('podflare_sandboxes', 'Live sandboxes by state.', () => {
    const byState: Record<string, number> = { ready: 0, running: 0 };
    for (const s of ctx.live.values()) byState[s.record.state] = (byState[s.record.state] ?? 0) + 1;
    return Object.entries(byState).map(([state, value]) => ({ labels: { state }, value }));
  });
  m.gauge('podflare_sandbox_events_total', 'Sandbox lifecycle events since start (created, destroyed, crashed, expired, forked, merged).',
    // Limit kills have their own series, by limit.
    () => Object.entries(ctx.counters).filter(([event]) => event !== 'limitKills').map(([event, value]) => ({ labels: { event }, value })), 'counter');
}
