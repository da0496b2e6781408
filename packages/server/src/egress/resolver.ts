/**
 * How the egress proxy turns allowed names into addresses: the host's own resolver (getaddrinfo,
 * so /etc/hosts counts) by default, or the DNS servers the operator configured.
 */
import dns from 'node:dns';

export interface NameResolver {
  /** Addresses of `name` (family 4, 6, or 0 for both); empty when it has none. */
  resolve(name: string, family: 0 | 4 | 6): Promise<string[]>;
}

const NO_ANSWER = new Set(['ENODATA', 'ENOTFOUND', 'NOTFOUND', 'ENONAME', 'EAI_NONAME', 'EAI_NODATA']);

export function createResolver(servers: string[] = []): NameResolver {
  if (servers.length === 0) {
    return {
      async resolve(name, family) {
        try {
          const found = await dns.promises.lookup(name, { all: true, family, verbatim: true });
          return found.map((a) => a.address);
        } catch (err) {
          if (NO_ANSWER.has((err as NodeJS.ErrnoException).code ?? '')) return [];
          throw err;
        }
      },
    };
  }
  const resolver = new dns.promises.Resolver({ timeout: 2000, tries: 2 });
  resolver.setServers(servers);
  const one = async (name: string, f: 4 | 6) => {
    try {
      return f === 4 ? await resolver.resolve4(name) : await resolver.resolve6(name);
    } catch (err) {
      if (NO_ANSWER.has((err as NodeJS.ErrnoException).code ?? '')) return [];
      throw err;
    }
  };
  return {
    async resolve(name, family) {
      if (family !== 0) return one(name, family);
      const [v4, v6] = await Promise.all([one(name, 4), one(name, 6)]);
      return [...v4, ...v6];
    },
  };
}

/**
 * Shares lookups for a few seconds: a sandbox asking for an allowed name in a loop then costs the
 * host one lookup, not one per query (getaddrinfo runs on libuv's small thread pool, which the
 * server's file operations need too). Failures are not kept.
 */
export function cachedResolver(inner: NameResolver, ttlMs = 10_000, maxEntries = 5000): NameResolver {
  const cache = new Map<string, { until: number; addresses: Promise<string[]> }>();
  return {
    resolve(name, family) {
      const key = `${family}|${name}`;
      const now = Date.now();
      const hit = cache.get(key);
      if (hit && hit.until > now) return hit.addresses;
      if (cache.size >= maxEntries) cache.clear();
      const addresses = inner.resolve(name, family);
      cache.set(key, { until: now + ttlMs, addresses });
      addresses.catch(() => cache.delete(key));
      return addresses;
    },
  };
}
