/**
 * Keeps web pages away from the API (the threat model is in @podflare/protocol's browser-access):
 * a server without API keys runs code for whoever reaches it, and a web page can reach a server on
 * the user's machine. Every request must
 *   - name a Host the server serves: a loopback name (`localhost`, `*.localhost`), an IP literal
 *     (DNS rebinding needs a name), or a configured `allowedHosts` name (403 otherwise);
 *   - come from the server's own origin (the dashboard), from no browser page at all (no `Origin`:
 *     the SDKs, curl), or from a configured `allowedOrigins` page, which gets CORS headers (403
 *     otherwise, and for `Origin: null`).
 * CORS preflights (OPTIONS) are answered for allowed origins only. JSON bodies must also say
 * `Content-Type: application/json` (body.ts): browsers send that only after a preflight.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isSameOrigin, isServedHost, originOf, type BrowserAccess } from '@podflare/protocol/browser-access';
import { ApiError } from './api-error.js';

const CORS_METHODS = 'GET, HEAD, POST, PUT, DELETE';
const CORS_ALLOWED_HEADERS = 'Authorization, Content-Type, Accept, traceparent';
/** Response headers a page may read besides the CORS-safelisted ones (the SDK reads these). */
const CORS_EXPOSED_HEADERS = 'Content-Length, Retry-After, traceparent';
const PREFLIGHT_MAX_AGE_SECONDS = '600';

/** What to do with a request: answered already (a preflight), or go on to the routes. */
export type GuardResult = 'answered' | 'continue';

export class BrowserGuard {
  private readonly origins: ReadonlySet<string>;

  constructor(private readonly access: BrowserAccess) {
    this.origins = new Set(access.allowedOrigins);
  }

  /** Refuses (403) a request naming a Host the server does not serve (a guard against DNS rebinding). */
  checkHost(req: IncomingMessage): void {
    const host = req.headers.host;
    if (!isServedHost(host, this.access.allowedHosts)) {
      const shown = host === undefined ? 'no Host header' : `Host ${JSON.stringify(host.slice(0, 200))}`;
      throw new ApiError('forbidden', `${shown} is not a name this server answers to (a guard against DNS rebinding). ` +
        'Use localhost or an IP address, or allow the name: podflare serve --allowed-host NAME, or PODFLARE_ALLOWED_HOSTS=NAME');
    }
  }

  /**
   * For a WebSocket to the API (the PTY): the Host as everywhere, and an `Origin` that is the
   * server's own or an allowed one (browsers send it on every WebSocket; CORS does not apply to
   * them, so this is the only thing keeping a foreign page from opening a shell).
   */
  checkUpgrade(req: IncomingMessage): void {
    this.checkHost(req);
    const origin = req.headers.origin;
    if (origin === undefined || isSameOrigin(origin, req.headers.host)) return;
    const serialized = originOf(origin);
    if (serialized === undefined || !this.origins.has(serialized)) {
      throw new ApiError('forbidden', `request from ${JSON.stringify(origin.slice(0, 200))} refused: web pages from other origins may not open a WebSocket or reach a sandbox's port with the key`);
    }
  }

  /**
   * Refuses requests for a foreign Host or from a foreign origin (throws a 403 ApiError), answers
   * CORS preflights of allowed origins, and adds CORS headers to their other requests.
   */
  check(req: IncomingMessage, res: ServerResponse): GuardResult {
    this.checkHost(req);
    const host = req.headers.host;
    const origin = req.headers.origin;
    if (origin === undefined || isSameOrigin(origin, host)) return 'continue';
    const serialized = originOf(origin);
    if (serialized === undefined || !this.origins.has(serialized)) {
      throw new ApiError('forbidden', `cross-origin request from ${JSON.stringify(origin.slice(0, 200))} refused: web pages from other origins ` +
        'may not call this server. Allow that origin: podflare serve --allowed-origin ORIGIN, or PODFLARE_ALLOWED_ORIGINS=ORIGIN');
    }
    res.setHeader('Access-Control-Allow-Origin', serialized);
    res.setHeader('Vary', 'Origin');
    if (req.method === 'OPTIONS' && req.headers['access-control-request-method'] !== undefined) {
      res.writeHead(204, {
        'Access-Control-Allow-Methods': CORS_METHODS,
        'Access-Control-Allow-Headers': CORS_ALLOWED_HEADERS,
        'Access-Control-Max-Age': PREFLIGHT_MAX_AGE_SECONDS,
      });
      res.end();
      return 'answered';
    }
    res.setHeader('Access-Control-Expose-Headers', CORS_EXPOSED_HEADERS);
    return 'continue';
  }
}
