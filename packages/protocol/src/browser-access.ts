/**
 * Which browser requests a local HTTP server should answer, shared by the Podflare API server and
 * the MCP HTTP server. Pure string logic (no `node:http`), runtime-dependency free.
 *
 * Threat model: a web page the user opens may send requests to a server on the user's machine.
 *   - DNS rebinding: the page's own name (`evil.example`) is re-pointed at 127.0.0.1, so the browser
 *     treats the server's answers as same-origin for the page and lets it read them. The browser
 *     still sends `Host: evil.example`, so a server that answers only the Host names it serves
 *     (loopback names, IP literals, names it is configured with) stops it. An IP literal is safe to
 *     answer: rebinding needs a name the attacker controls, and nobody controls `127.0.0.1`.
 *   - Cross-site requests: a page may send "simple" requests (a form POST, `fetch` with no-cors)
 *     without a CORS preflight; the browser then sends an `Origin` header naming the page. A
 *     server that refuses requests whose Origin is not its own (nor configured) stops them.
 */

/** Host names and origins a server answers besides its own loopback names and IP literals. */
export interface BrowserAccess {
  /** Host names (no port) clients may address the server by, e.g. a public name behind a proxy. */
  allowedHosts: readonly string[];
  /** Web origins (`scheme://host[:port]`) whose pages may call the server cross-origin. */
  allowedOrigins: readonly string[];
}

const HOST_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

/**
 * The host name of a `Host` header value, lower case, IPv6 without brackets
 * (`localhost:7070` → `localhost`, `[::1]:80` → `::1`); undefined when it is not a host[:port].
 */
export function hostHeaderName(host: string | undefined): string | undefined {
  if (host === undefined || host === '' || /[\s/?#@\\]/.test(host)) return undefined;
  try {
    const url = new URL(`http://${host}`);
    if (url.username || url.password || url.pathname !== '/' || url.search || url.hash) return undefined;
    return url.hostname.replace(/^\[(.*)\]$/, '$1');
  } catch {
    return undefined;
  }
}

/** An IPv4 or IPv6 literal as the URL parser writes it (`127.0.0.1`, `::1`). */
export function isIpLiteral(name: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(name) || (name.includes(':') && /^[0-9a-f:.]+$/.test(name));
}

/**
 * Names that mean this machine: `localhost` and any name below it (RFC 6761: browsers resolve them
 * to loopback themselves, never through DNS, so no attacker can point one elsewhere).
 */
export function isLoopbackName(name: string): boolean {
  return name === 'localhost' || name.endsWith('.localhost');
}

/** Loopback addresses (127/8, ::1) and loopback names. */
export function isLoopbackHost(name: string): boolean {
  return isLoopbackName(name) || /^127(\.\d{1,3}){3}$/.test(name) || name === '::1';
}

/** Does a request with this `Host` header address a server that serves `allowedHosts`? */
export function isServedHost(host: string | undefined, allowedHosts: readonly string[]): boolean {
  const name = hostHeaderName(host);
  if (name === undefined) return false;
  return isLoopbackName(name) || isIpLiteral(name) || allowedHosts.includes(name.replace(/\.$/, ''));
}

/** An `Origin` header in its serialized form (`http://localhost:7070`); undefined when it is not one. */
export function originOf(origin: string): string | undefined {
  try {
    const url = new URL(origin);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') return undefined;
    return url.origin;
  } catch {
    return undefined;
  }
}

/**
 * Is `origin` the server's own, i.e. the page was served from the very host and port the request
 * went to? (`http:` or `https:`: behind a TLS proxy the page's scheme differs from the server's.)
 * `null` origins (sandboxed frames, file pages, redirects) are never the server's own.
 */
export function isSameOrigin(origin: string, host: string | undefined): boolean {
  const o = originOf(origin);
  if (o === undefined || host === undefined || hostHeaderName(host) === undefined) return false;
  const url = new URL(o);
  return [`http://${host}`, `https://${host}`].some((own) => {
    try {
      return new URL(own).origin === url.origin;
    } catch {
      return false;
    }
  });
}

/** A configured allowed host name, checked; an error message when it is not one. */
export function parseAllowedHost(raw: string): string | { error: string } {
  const name = raw.trim().toLowerCase().replace(/\.$/, '');
  if (name === '*') return { error: '"*" is not allowed: list the names the server is reached by' };
  const labels = name.split('.');
  if (name.length === 0 || name.length > 253 || !labels.every((l) => HOST_LABEL.test(l))) {
    return { error: `"${raw}" is not a host name (give the name alone, without scheme or port)` };
  }
  return name;
}

/** A configured allowed origin, in serialized form; an error message when it is not one. */
export function parseAllowedOrigin(raw: string): string | { error: string } {
  const trimmed = raw.trim();
  if (trimmed === '*' || trimmed === 'null') {
    return { error: `"${trimmed}" is not allowed: list the origins (scheme://host[:port]) of the pages that may call the server` };
  }
  const origin = originOf(trimmed);
  if (origin === undefined || !/^https?:\/\/[^/]+\/?$/i.test(trimmed)) {
    return { error: `"${raw}" is not an origin: give scheme://host[:port], e.g. https://app.example.com` };
  }
  return origin;
}
