/**
 * A gateway's reachability checks of its nodes. Heartbeats say a node is alive to PostgreSQL, not
 * that this gateway can reach it: across a partition the node heartbeats on while requests on
 * pooled keep-alive connections would hang (no connect to time out). So each gateway probes each
 * live node's health endpoint on a new connection every `intervalMs`; after `failuresToMark`
 * failures in a row the node is unreachable from here (its sandboxes answer 503 at once, and
 * `onUnreachable` drops the connections pooled to it), until a probe succeeds again.
 */
import http from 'node:http';
import type { HostTable } from './host-table.js';

export interface NodeProberOptions {
  intervalMs?: number;
  timeoutMs?: number;
  failuresToMark?: number;
  onUnreachable?: (hostId: string) => void;
}

export class NodeProber {
  private readonly failures = new Map<string, number>();
  private readonly unreachable = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private running = false;

  constructor(private readonly hosts: HostTable, private readonly opts: NodeProberOptions = {}) {}

  start(): void {
    this.timer = setInterval(() => void this.round(), this.opts.intervalMs ?? 500);
  }

  isReachable(hostId: string): boolean {
    return !this.unreachable.has(hostId);
  }

  private async round(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      await Promise.all(this.hosts.all().filter((h) => this.hosts.isFresh(h)).map(async (h) => {
        const ok = await probe(h.address, this.opts.timeoutMs ?? 2000);
        if (ok) {
          this.failures.delete(h.id);
          this.unreachable.delete(h.id);
          return;
        }
        const n = (this.failures.get(h.id) ?? 0) + 1;
        this.failures.set(h.id, n);
        if (n >= (this.opts.failuresToMark ?? 2) && !this.unreachable.has(h.id)) {
          this.unreachable.add(h.id);
          this.opts.onUnreachable?.(h.id);
        }
      }));
    } finally {
      this.running = false;
    }
  }

  close(): void {
    clearInterval(this.timer);
  }
}

/** GET /v1/healthz on a new connection; true on a 200 within the timeout. */
function probe(address: string, timeoutMs: number): Promise<boolean> {
  const at = address.lastIndexOf(':');
  return new Promise((resolve) => {
    const req = http.get({ host: address.slice(0, at).replace(/^\[|\]$/g, ''), port: Number(address.slice(at + 1)), path: '/v1/healthz',
      agent: false, headers: { host: address } }, (res) => {
      clearTimeout(timer);
      res.resume();
      resolve(res.statusCode === 200);
    });
    // A whole-probe timer: req.setTimeout starts only once connected, and a partition drops the SYN.
    const timer = setTimeout(() => req.destroy(new Error('probe timed out')), timeoutMs);
    req.on('error', () => { clearTimeout(timer); resolve(false); });
  });
}
