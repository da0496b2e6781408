/**
 * The server's metrics, in one place: counters and latency histograms that other modules increment,
 * plus gauges read at scrape time (pool fill, sandboxes by state). Rendered as Prometheus text for
 * `GET /v1/metrics` and as JSON for the dashboard's "Pool and host" panel. One instance per server
 * (no module-level state), so several servers can share a test process.
 */
import type { HistogramSnapshot } from '@podflare/protocol';

type Labels = Record<string, string>;

/** Seconds: from a fork of a small parent (~15 ms) to a cold start or a long exec. */
export const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

const labelKey = (labels: Labels) => JSON.stringify(Object.entries(labels).sort(([a], [b]) => a.localeCompare(b)));

function renderLabels(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"')}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
}

const num = (n: number) => (Number.isFinite(n) ? String(n) : n > 0 ? '+Inf' : n < 0 ? '-Inf' : 'NaN');

export class Counter {
  private readonly values = new Map<string, { labels: Labels; value: number }>();

  constructor(readonly name: string, readonly help: string, initial: Labels[] = [{}]) {
    // Series that exist before anything happens, so a scrape shows them at 0.
    for (const labels of initial) this.inc(labels, 0);
  }

  inc(labels: Labels = {}, by = 1): void {
    const key = labelKey(labels);
    const entry = this.values.get(key);
    if (entry) entry.value += by;
    else this.values.set(key, { labels, value: by });
  }

  get(labels: Labels = {}): number {
    return this.values.get(labelKey(labels))?.value ?? 0;
  }

  render(): string[] {
    return [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`,
      ...[...this.values.values()].map((e) => `${this.name}${renderLabels(e.labels)} ${num(e.value)}`)];
  }
}

export class Histogram {
  private readonly counts: number[];
  private count = 0;
  private sum = 0;

  constructor(readonly name: string, readonly help: string, readonly buckets: number[] = LATENCY_BUCKETS) {
    this.counts = new Array<number>(buckets.length + 1).fill(0);
  }

  observe(seconds: number): void {
    let i = this.buckets.findIndex((b) => seconds <= b);
    if (i === -1) i = this.buckets.length;
    this.counts[i]!++;
    this.count++;
    this.sum += seconds;
  }

  /** Starts a timer; calling the result records the elapsed time. */
  time(): () => number {
    const started = performance.now();
    return () => {
      const seconds = (performance.now() - started) / 1000;
      this.observe(seconds);
      return seconds;
    };
  }

  snapshot(): HistogramSnapshot {
    return { buckets: [...this.buckets], counts: [...this.counts], count: this.count, sum: this.sum };
  }

  render(): string[] {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    let cumulative = 0;
    this.buckets.forEach((b, i) => {
      cumulative += this.counts[i]!;
      lines.push(`${this.name}_bucket{le="${b}"} ${cumulative}`);
    });
    lines.push(`${this.name}_bucket{le="+Inf"} ${this.count}`, `${this.name}_sum ${this.sum}`, `${this.name}_count ${this.count}`);
    return lines;
  }
}

/**
 * Series read from their owner when scraped (no copy to keep in sync): gauges, or counters some
 * other module already keeps (the pool's hits and misses).
 */
export class Gauge {
  constructor(
    readonly name: string,
    readonly help: string,
    private readonly read: () => Array<{ labels: Labels; value: number }>,
    private readonly type: 'gauge' | 'counter' = 'gauge',
  ) {}

  values() {
    return this.read();
  }

  render(): string[] {
    return [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} ${this.type}`,
      ...this.read().map((e) => `${this.name}${renderLabels(e.labels)} ${num(e.value)}`)];
  }
}

/** The resource limits whose kills are counted (issue #7's MemoryLimitExceeded and friends). */
export const LIMIT_KINDS = ['memory', 'pids', 'disk', 'cpu', 'output', 'timeout'] as const;
export type LimitKind = (typeof LIMIT_KINDS)[number];

export class ServerMetrics {
  readonly createSeconds = new Histogram('podflare_sandbox_create_seconds', 'Time to create a sandbox (pool hit or cold start).');
  readonly execSeconds = new Histogram('podflare_exec_seconds', 'Time an exec ran, from its turn in the queue to its exit.');
  readonly forkSeconds = new Histogram('podflare_fork_seconds', 'Time a fork(n) call took, for all its children.');
  readonly execs = new Counter('podflare_execs_total', 'Execs finished, by language and outcome.', []);
  readonly limitKills = new Counter('podflare_limit_kills_total', 'Processes killed for exceeding a sandbox resource limit.',
    LIMIT_KINDS.map((limit) => ({ limit })));
  readonly requests = new Counter('podflare_http_requests_total', 'HTTP requests answered, by method and status code.', []);
  private readonly gauges: Gauge[] = [];
  private readonly started = Date.now();

  /** Adds a gauge read at scrape time (the manager registers pool and sandbox gauges). */
  gauge(name: string, help: string, read: () => Array<{ labels: Labels; value: number }>, type: 'gauge' | 'counter' = 'gauge'): void {
    this.gauges.push(new Gauge(name, help, read, type));
  }

  /** Counts a limit kill from an exec's error name (`MemoryLimitExceeded` → memory). */
  countLimitKill(errorName: string): void {
    const m = /^(\w+?)LimitExceeded$/i.exec(errorName);
    if (!m) return;
    const raw = m[1]!.toLowerCase();
    const kind = raw.startsWith('mem') ? 'memory' : raw.startsWith('pid') || raw.startsWith('process') ? 'pids' : raw;
    this.limitKills.inc({ limit: kind });
  }

  /** Prometheus text exposition format 0.0.4. */
  render(): string {
    const families: Array<{ render(): string[] }> = [
      ...this.gauges, this.createSeconds, this.execSeconds, this.forkSeconds, this.execs, this.limitKills, this.requests,
      new Gauge('podflare_uptime_seconds', 'Seconds since this server started.', () => [{ labels: {}, value: (Date.now() - this.started) / 1000 }]),
    ];
    return families.flatMap((f) => f.render()).join('\n') + '\n';
  }

  /** The same numbers as JSON, for the dashboard. */
  snapshot() {
    return {
      uptime_seconds: (Date.now() - this.started) / 1000,
      gauges: Object.fromEntries(this.gauges.map((g) => [g.name, g.values()])),
      histograms: {
        create: this.createSeconds.snapshot(),
        exec: this.execSeconds.snapshot(),
        fork: this.forkSeconds.snapshot(),
      },
      limit_kills: Object.fromEntries(LIMIT_KINDS.map((k) => [k, this.limitKills.get({ limit: k })])),
    };
  }
}
