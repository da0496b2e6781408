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
import type { HttpMount } from '@podflare/server';
import type { Client } from 'podflare';

/**
 * Where the mount answers: @podflare/mcp's MCP_PATH (its handler answers there and at `/`; a
 * mismatch would show as 404s from it). Written here so that the MCP server, its SDK and their
 * schemas are loaded on the first MCP request, not at every start: a restart's first exec on an
 * adopted sandbox does not wait for them.
 */
const MCP_PATH = '/mcp';

type McpHandler = ReturnType<typeof import('@podflare/mcp')['createMcpHttpHandler']>;

/** Makes the `/mcp` mount. Sessions and stateless requests are as in `podflare-mcp --http`. */
export function createMcpMount(log: (message: string) => void): HttpMount {
  let loading: Promise<{ handler: McpHandler; Client: typeof Client }> | null = null;
  const load = () => {
    loading ??= Promise.all([import('@podflare/mcp'), import('podflare')]).then(([mcp, sdk]) => {
      if (mcp.MCP_PATH !== MCP_PATH) throw new Error(`the MCP server answers at ${mcp.MCP_PATH}, not ${MCP_PATH}`);
      return { handler: mcp.createMcpHttpHandler({ log }), Client: sdk.Client };
    });
    return loading;
  };
  // One connection pool per key (owner). Only keys the server accepted get here, so this is bounded
  // by the configured keys.
  const clients = new Map<string, Client>();
  return {
    path: MCP_PATH,
    methods: ['GET', 'POST', 'DELETE'],
    async handle(req, res, caller) {
      const mcp = await load();
      let client = clients.get(caller.owner);
      if (!client) {
        // An explicit key ('' without server keys) so the SDK does not fall back to $PODFLARE_API_KEY.
        client = new mcp.Client({ host: caller.loopbackUrl, apiKey: caller.apiKey ?? '' });
        clients.set(caller.owner, client);
      }
      await mcp.handler.handle(req, res, { client, identity: caller.owner });
    },
    async close() {
      const loaded = await loading?.catch(() => null);
      if (loaded) await loaded.handler.close();
      for (const client of clients.values()) client.close();
    },
  };
}
