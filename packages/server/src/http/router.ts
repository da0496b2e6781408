/** A small method + path router: routes are data, matched in order; params are named groups. */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ApiError } from './api-error.js';

export interface RequestContext {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  query: URLSearchParams;
  /** sha256 of the caller's API key ('' when auth is off). */
  owner: string;
}

export type Handler = (ctx: RequestContext) => Promise<void> | void;

interface Route {
  method: string;
  pattern: RegExp;
  handler: Handler;
  auth: boolean;
}

export class Router {
  private readonly routes: Route[] = [];

  add(method: string, path: string, handler: Handler, opts: { auth?: boolean } = {}): this {
    const pattern = new RegExp('^' + path.replace(/:(\w+)/g, '(?<$1>[^/]+)') + '/?$');
    this.routes.push({ method, pattern, handler, auth: opts.auth ?? true });
    return this;
  }

  /** The matching route and its params; 404 for an unknown path, 405 for a known path and wrong method. */
  match(method: string, path: string): { route: Route; params: Record<string, string> } {
    let pathKnown = false;
    for (const route of this.routes) {
      const m = route.pattern.exec(path);
      if (!m) continue;
      pathKnown = true;
      if (route.method === method || (method === 'HEAD' && route.method === 'GET')) {
        const params: Record<string, string> = {};
        for (const [k, v] of Object.entries(m.groups ?? {})) params[k] = decodeParam(k, v);
        return { route, params };
      }
    }
    if (pathKnown) throw new ApiError('method_not_allowed', `${method} is not allowed on ${path}`);
    throw new ApiError('not_found', `no such endpoint: ${method} ${path}`);
  }
}

function decodeParam(name: string, value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    throw new ApiError('bad_request', `${name}: not a valid percent-encoded path segment`, name);
  }
}
