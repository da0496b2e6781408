/**
 * A throwaway PostgreSQL (Debian's postgresql package, installed by `scripts/setup.sh --test`):
 * `initdb` and `pg_ctl` run as the postgres user on a data directory in a temporary folder, reached
 * only through a unix socket there (no TCP at all), so a test never touches the host's own cluster
 * and processes in the test's network namespaces reach it too. `stop()` removes everything.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export interface TestPostgres {
  /** A connection string for the database `podflare` (unix socket). */
  url: string;
  /** The unix socket's directory. */
  socketDir: string;
  /** Runs SQL through psql as the superuser (for test setup and inspection). */
  psql(sql: string): string;
  stop(): Promise<void>;
}

/** The newest installed server's bin directory (Debian: /usr/lib/postgresql/<major>/bin). */
export function postgresBinDir(): string {
  const root = '/usr/lib/postgresql';
  const majors = existsSync(root) ? readdirSync(root).filter((d) => existsSync(path.join(root, d, 'bin', 'initdb'))) : [];
  if (!majors.length) throw new Error('PostgreSQL is not installed: run `bash scripts/setup.sh --test` (Debian package postgresql)');
  return path.join(root, majors.sort((a, b) => Number(b) - Number(a))[0]!, 'bin');
}

export async function startTestPostgres(): Promise<TestPostgres> {
  const bin = postgresBinDir();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'podflare-pg-'));
  const data = path.join(dir, 'data');
  await mkdir(data);
  const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
  const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
  await chown(dir, uid, gid);
  await chown(data, uid, gid);
  await chmod(dir, 0o755);
  await chmod(data, 0o700);
  const port = 20_000 + Math.floor(Math.random() * 30_000);
  const asPostgres = (cmd: string, args: string[]) =>
    execFileSync('runuser', ['-u', 'postgres', '--', path.join(bin, cmd), ...args], { stdio: 'pipe', cwd: dir, timeout: 120_000 });
  const stop = async () => {
    try { asPostgres('pg_ctl', ['-D', data, '-m', 'immediate', '-w', 'stop']); } catch { /* not running */ }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    asPostgres('initdb', ['-D', data, '-A', 'trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8']);
    // No TCP listener; durability off (a test database), enough connections for several nodes and gateways.
    const options = `-k ${dir} -p ${port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200`;
    asPostgres('pg_ctl', ['-D', data, '-o', options, '-l', path.join(dir, 'log'), '-w', '-t', '60', 'start']);
    const psql = (sql: string, db = 'podflare') =>
      execFileSync('runuser', ['-u', 'postgres', '--', path.join(bin, 'psql'), '-h', dir, '-p', String(port), '-d', db, '-XAtqc', sql],
        { stdio: 'pipe', cwd: dir }).toString();
    psql('CREATE DATABASE podflare', 'postgres');
    return { url: `postgres://postgres@/podflare?host=${encodeURIComponent(dir)}&port=${port}`, socketDir: dir, psql: (sql) => psql(sql), stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
