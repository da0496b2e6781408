/** Signed URLs of exposed ports (docs/ports.md); the proxying itself is http/port-proxy.ts. */
import { z } from 'zod';
import { ApiError } from './api-error.js';
import { checkPort, MAX_PORT_URL_TTL_SECONDS } from '../manager/ports.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendJson } from './body.js';
import type { Router } from './router.js';
import { sandboxId } from './sandbox-routes.js';

const PortUrlBody = z.object({ expires_in_seconds: z.number().int().min(1).max(MAX_PORT_URL_TTL_SECONDS).optional() }).strict();

export function addPortRoutes(router: Router, manager: SandboxManager): void {
  const ports = manager.ports;
  /**
   * A signed URL for one port: whoever holds it reaches that port (HTTP and WebSocket) until it
   * expires, without the API key. `host` is E2B's `getHost` shape (no scheme).
   */
  router.add('POST', '/v1/sandboxes/:id/ports/:port/url', async (ctx) => {
    const id = sandboxId(ctx);
    const text = ctx.params.port ?? '';
    if (!/^\d{1,5}$/.test(text)) throw new ApiError('bad_request', `port: must be 1-65535, got "${text.slice(0, 20)}"`, 'port');
    const port = checkPort(Number(text));
    const body = await readBody(ctx.req, PortUrlBody);
    await manager.get(id, ctx.owner || undefined);
    const { token, expiresAt } = ports.sign(id, port, body.expires_in_seconds);
    const host = `${ctx.req.headers.host}/v1/ports/${token}`;
    sendJson(ctx.res, 200, { url: `http://${host}/`, host, token, port, expires_at: expiresAt });
  });
}
