/** What `podflare node` and `podflare gateway` share: the database and token options, and running until a signal. */
import { EXIT_OK, UsageError } from '../args.js';

export const CLUSTER_OPTIONS = {
  db: { type: 'string' },
  'node-token': { type: 'string' },
} as const;

export const CLUSTER_HELP = `  --db URL           the cluster's PostgreSQL: postgres://user:pass@host:5432/db, or a unix
                     socket postgres://user@/db?host=/run/postgresql (default: $PODFLARE_DB);
                     one that fails over: every member, ?target_session_attrs=read-write
                     (postgres://user:pass@db1:5432,db2:5432/db?target_session_attrs=read-write)
  --node-token TOKEN shared secret gateways present to nodes, at least 16 characters
                     (default: $PODFLARE_NODE_TOKEN; prefer the environment: flags show in ps)`;

export function clusterValues(values: Record<string, unknown>, command: string): { db: string; nodeToken: string } {
  const db = (values.db as string | undefined) ?? process.env.PODFLARE_DB;
  if (!db) throw new UsageError('--db (or PODFLARE_DB) is required', command);
  const nodeToken = (values['node-token'] as string | undefined) ?? process.env.PODFLARE_NODE_TOKEN ?? '';
  if (nodeToken.length < 16) throw new UsageError('--node-token (or PODFLARE_NODE_TOKEN) of at least 16 characters is required', command);
  return { db, nodeToken };
}

/** Resolves with the exit code once SIGINT/SIGTERM has closed `close` (a second signal exits at once). */
export function untilSignal(close: () => Promise<void>): Promise<number> {
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: NodeJS.Signals) => {
      if (stopping) process.exit(1);
      stopping = true;
      process.stderr.write(`${signal}: stopping\n`);
      close().then(() => resolve(EXIT_OK), (err: unknown) => {
        process.stderr.write(`podflare: error while stopping: ${(err as Error).message}\n`);
        resolve(1);
      });
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
