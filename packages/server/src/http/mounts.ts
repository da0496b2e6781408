/**
 * Handlers other packages mount on the server's HTTP listener. `podflare serve` (the CLI) mounts
 * the MCP endpoint at `/mcp` this way: the MCP package uses the SDK, which talks HTTP to this
 * server, so the server cannot import it without a dependency cycle; the CLI depends on both and
 * joins them. A mount sits behind everything a route does: the browser guard, the API key check and
 * the per-key rate limit.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

/** Who called a mount, as the server established it. */
export interface MountCaller {
  /** sha256 of the caller's API key, hex ('' when the server has no keys). */
  owner: string;
  /** The key the caller sent, to act on its behalf (undefined when the server has no keys). */
  apiKey: string | undefined;
  /** This server's API as reachable from this process (a loopback address). */
  loopbackUrl: string;
}

/** A handler mounted at one path of the server. */
export interface HttpMount {
  /** The path it answers at, e.g. `/mcp` (a trailing slash is allowed too). */
  path: string;
  /** The methods it answers; others get 405. */
  methods: readonly string[];
  /** Answers a request that passed the server's access checks. May throw an ApiError. */
  handle(req: IncomingMessage, res: ServerResponse, caller: MountCaller): Promise<void>;
  /**
   * Called first when the server closes, while the API still answers (a mount acting through the
   * API may need it to clean up).
   */
  close?(): Promise<void>;
}
