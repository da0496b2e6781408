/**
 * `podflare serve`'s MCP endpoint: the MCP server's HTTP handler (@podflare/mcp) mounted at `/mcp`
 * on the Podflare server's own listener, so a user needs no second process.
 *
 * Why here and not in the server package: the MCP tools are written against the `podflare` SDK,
 * which talks HTTP to the server; the server importing them would make a cycle. The CLI depends on
 * both and joins them through the server's mount hook. The tools reach the server over loopback
 * with the caller's own API key, so an MCP call can do exactly what the caller's REST calls could
 * (same keys, same owner, same rate limit) and nothing more.
 */
import { createMcpHttpHandler, MCP_PATH } from '@podflare/mcp';
import type { HttpMount } from '@podflare/server';
import { Client } from 'podflare';

/** Makes the `/mcp` mount. Sessions and stateless requests are as in `podflare-mcp --http`. */
export function createMcpMount(log: (message: string) => void): HttpMount {
  const handler = createMcpHttpHandler({ log });
  // One connection pool per key (owner). Only keys the server accepted get here, so this is bounded
  // by the configured keys.
  const clients = new Map<string, Client>();
  return {
    path: MCP_PATH,
    methods: ['GET', 'POST', 'DELETE'],
    async handle(req, res, caller) {
      let client = clients.get(caller.owner);
      if (!client) {
        // An explicit key ('' without server keys) so the SDK does not fall back to $PODFLARE_API_KEY.
        client = new Client({ host: caller.loopbackUrl, apiKey: caller.apiKey ?? '' });
        clients.set(caller.owner, client);
      }
      await handler.handle(req, res, { client, identity: caller.owner });
    },
    async close() {
      await handler.close();
      for (const client of clients.values()) client.close();
    },
  };
}
