/** GET /v1/metrics: the server's metrics in the Prometheus text exposition format. */
import type { SandboxManager } from '../sandbox-manager.js';
import type { Router } from './router.js';

export function addMetricsRoutes(router: Router, manager: SandboxManager): void {
  router.add('GET', '/v1/metrics', ({ res }) => {
    const text = manager.metrics.render();
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8', 'Content-Length': Buffer.byteLength(text), 'Cache-Control': 'no-store' });
    res.end(text);
  });
}
