/**
 * The cluster's connection pool to PostgreSQL, following the primary across a failover.
 *
 * Operators run PostgreSQL highly available with Patroni (or pg_auto_failover, or an operator on
 * Kubernetes). Clients then either connect through something that tracks the primary (HAProxy on
 * Patroni's REST `/primary`, a Kubernetes `-rw` Service) — a plain single-host URL here — or list
 * every member in a libpq multi-host URL with `target_session_attrs=read-write`, so the client
 * itself finds the writable one. The `pg` driver does not understand multi-host URLs, so this
 * module does what libpq does: it accepts
 *
 *   postgres://user:pw@db1:5432,db2:5432/podflare?target_session_attrs=read-write
 *   postgres://user@/podflare?host=/run/pg-a,/run/pg-b&port=5432,5433&target_session_attrs=read-write
 *
 * and every new pooled connection goes to the member that answers `transaction_read_only = off`.
 * The last member found writable is tried first; a standby (or a demoted primary) is skipped. A
 * query that fails removes its connection from the pool (pg-pool does), so after a failover the
 * next connection looks for the primary again. Connects and queries have timeouts: with the
 * database away, callers get an error in seconds, never a hang.
 */
import pg from 'pg';

export interface PgPoolOptions {
  max?: number;
  /** A connect (to one member, and the whole search for the primary) gives up after this. @default 5000 */
  connectTimeoutMs?: number;
  /** A query gives up after this (client side; the server may still finish it). @default 15000 */
  queryTimeoutMs?: number;
}

interface Member {
  host: string;
  port: number;
}

/** A connection string split into its members and the rest (user, password, database, options). */
export interface ParsedTargets {
  members: Member[];
  /** Everything but the members (host and port are set per connection). */
  base: pg.ClientConfig;
  readWrite: boolean;
}

/** Thrown when no member of a multi-host URL accepts writes (mid-failover, or all down). */
export class NoPrimaryError extends Error {
  override name = 'NoPrimaryError';
}

/** Splits a libpq-style URL into members; a single host without `target_session_attrs` gives one member. */
export function parseTargets(connectionString: string): ParsedTargets {
  // libpq's URI allows a comma list in the authority, which WHATWG URLs reject: take it out first.
  const m = /^(postgres(?:ql)?:\/\/)([^/?#]*)(.*)$/.exec(connectionString);
  if (!m) throw new Error('the database URL must start with postgres:// or postgresql://');
  const [, scheme, authority, tail] = m as unknown as [string, string, string, string];
  const at = authority.lastIndexOf('@');
  const userinfo = at >= 0 ? authority.slice(0, at + 1) : '';
  const hostList = at >= 0 ? authority.slice(at + 1) : authority;
  const url = new URL(`${scheme}${userinfo}placeholder${tail}`);
  const readWrite = url.searchParams.get('target_session_attrs') === 'read-write';
  url.searchParams.delete('target_session_attrs');
  const members: Member[] = [];
  const defaultPort = (p: string | undefined) => (p ? Number(p) : 5432);
  if (hostList) {
    for (const part of hostList.split(',')) {
      const hp = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(part);
      if (!hp) throw new Error(`the database URL: cannot read the host ${JSON.stringify(part)}`);
      members.push({ host: hp[1]!.replace(/^\[|\]$/g, ''), port: defaultPort(hp[2]) });
    }
  }
  const hostParam = url.searchParams.get('host');
  if (hostParam) {
    const ports = (url.searchParams.get('port') ?? '').split(',');
    hostParam.split(',').forEach((host, i) => members.push({ host, port: defaultPort(ports[i] || ports[0]) }));
    url.searchParams.delete('host');
    url.searchParams.delete('port');
  }
  if (!members.length) members.push({ host: '/var/run/postgresql', port: 5432 });
  // A config object, not a string: pg lets a connection string's host override the config's.
  const sslmode = url.searchParams.get('sslmode');
  const base: pg.ClientConfig = {
    user: decodeURIComponent(url.username) || undefined, password: decodeURIComponent(url.password) || undefined,
    database: decodeURIComponent(url.pathname.slice(1)) || undefined,
    application_name: url.searchParams.get('application_name') ?? undefined,
    ...(sslmode && sslmode !== 'disable' && sslmode !== 'prefer' && sslmode !== 'allow'
      ? { ssl: sslmode === 'require' ? { rejectUnauthorized: false } : true } : {}),
  };
  return { members, base, readWrite };
}

/**
 * A pg.Pool for `connectionString`. One member without `target_session_attrs=read-write`: a plain
 * pool (with timeouts). Otherwise a pool whose connections go to the writable member.
 */
export function openPgPool(connectionString: string, opts: PgPoolOptions = {}): pg.Pool {
  const connectTimeoutMs = opts.connectTimeoutMs ?? 5000;
  const common = {
    max: opts.max ?? 8, connectionTimeoutMillis: connectTimeoutMs, query_timeout: opts.queryTimeoutMs ?? 15_000,
    keepAlive: true, keepAliveInitialDelayMillis: 5000,
  };
  const targets = parseTargets(connectionString);
  if (targets.members.length === 1 && !targets.readWrite) return new pg.Pool({ connectionString, ...common });
  const finder = new PrimaryFinder(targets, connectTimeoutMs);
  const Client = primaryFollowingClient(finder);
  return new pg.Pool({ ...targets.base, ...common, Client });
}

/** Remembers the member last found writable; looks through all of them when it no longer is. */
class PrimaryFinder {
  private preferred = 0;

  constructor(private readonly targets: ParsedTargets, private readonly connectTimeoutMs: number) {}

  /** The members in the order to try: the last writable one first. */
  order(): Member[] {
    const { members } = this.targets;
    return members.map((_, i) => members[(this.preferred + i) % members.length]!);
  }

  found(member: Member): void {
    this.preferred = Math.max(0, this.targets.members.indexOf(member));
  }

  get readWrite(): boolean {
    return this.targets.readWrite;
  }

  get base(): pg.ClientConfig {
    return this.targets.base;
  }

  get timeoutMs(): number {
    return this.connectTimeoutMs;
  }
}

function primaryFollowingClient(finder: PrimaryFinder): typeof pg.Client {
  /** A client that, on connect, tries the members in turn and keeps the first writable one. */
  return class PrimaryFollowingClient extends pg.Client {
    private readonly settings: pg.ClientConfig;

    constructor(config?: pg.ClientConfig) {
      super(config);
      this.settings = config ?? {};
    }

    override connect(): Promise<void>;
    override connect(callback: (err: Error) => void): void;
    override connect(callback?: (err: Error) => void): Promise<void> | void {
      const done = this.findAndConnect();
      if (!callback) return done;
      // pg-pool passes a callback and expects it called with no error on success.
      done.then(() => (callback as (err?: Error) => void)(), callback);
    }

    /** Tries each member on a probe connection, then connects this client to the writable one. */
    private async findAndConnect(): Promise<void> {
      const failures: string[] = [];
      const deadline = Date.now() + finder.timeoutMs;
      for (const member of finder.order()) {
        const left = deadline - Date.now();
        if (left <= 0) break;
        const probe = new pg.Client({ ...this.settings, host: member.host, port: member.port,
          connectionTimeoutMillis: left, query_timeout: left });
        probe.on('error', () => {});
        try {
          await probe.connect();
          const { rows } = await probe.query<{ transaction_read_only: string }>('SHOW transaction_read_only');
          if (finder.readWrite && rows[0]?.transaction_read_only !== 'off') {
            failures.push(`${member.host}:${member.port} is read-only (a standby)`);
            continue;
          }
        } catch (err) {
          failures.push(`${member.host}:${member.port}: ${(err as Error).message}`);
          continue;
        } finally {
          await probe.end().catch(() => {});
        }
        finder.found(member);
        this.host = member.host;
        this.port = member.port;
        return await super.connect();
      }
      throw new NoPrimaryError(`no writable PostgreSQL member: ${failures.join('; ') || 'timed out'}`);
    }
  };
}
