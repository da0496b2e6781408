/**
 * A highly available PostgreSQL as operators run it, on loopback: one etcd (Debian's etcd-server)
 * and two PostgreSQL instances managed by Patroni (Debian's patroni), with synchronous replication
 * so an acknowledged commit survives a failover. Everything lives in a fresh temporary directory;
 * etcd, Patroni's REST APIs and PostgreSQL's replication listen on 127.0.0.1 only, and each
 * PostgreSQL also on a unix socket in its own directory, which processes in a test's network
 * namespaces reach (the filesystem is shared). Clients get a libpq multi-host URL over both
 * sockets with `target_session_attrs=read-write`: they follow the primary themselves.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { chown, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { postgresBinDir, type TestPostgres } from './postgres.js';

export interface PatroniMember {
  name: string;
  socketDir: string;
  restUrl: string;
  /** Patroni's and its PostgreSQL's processes killed at once (a host lost), no clean-up. */
  kill9(): Promise<void>;
}

export interface PatroniCluster extends TestPostgres {
  members: PatroniMember[];
  /** The member Patroni names leader now (its REST API), or undefined mid-failover. */
  leader(): Promise<string | undefined>;
  /** A planned switchover to `candidate` through Patroni's REST API. */
  switchover(from: string, candidate: string): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const freePort = () => 20_000 + Math.floor(Math.random() * 30_000);

interface Proc { child: ChildProcess; exited: Promise<void>; log: string }

function start(cmd: string, args: string[], opts: { uid?: number; gid?: number; env?: NodeJS.ProcessEnv } = {}): Proc {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], uid: opts.uid, gid: opts.gid, env: opts.env ?? process.env });
  const proc: Proc = { child, log: '', exited: new Promise((r) => child.once('exit', () => r())) };
  const keep = (d: Buffer) => { proc.log = (proc.log + d.toString()).slice(-20_000); };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  return proc;
}

async function kill(proc: Proc, signal: NodeJS.Signals): Promise<void> {
  if (proc.child.exitCode !== null || proc.child.signalCode !== null) return;
  proc.child.kill(signal);
  const timer = setTimeout(() => proc.child.kill('SIGKILL'), 30_000);
  await proc.exited;
  clearTimeout(timer);
}

/** The pid in a PostgreSQL data directory's postmaster.pid, if it runs. */
function postmasterPid(dataDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(path.join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}

export async function startPatroniCluster(): Promise<PatroniCluster> {
  const bin = postgresBinDir();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'podflare-patroni-'));
  const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
  const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
  await chown(dir, uid, gid);
  const scope = `pf-${randomBytes(3).toString('hex')}`;
  const etcdClient = freePort();
  const etcdPeer = freePort();
  const etcd = start('etcd', ['--name', 'e0', '--data-dir', path.join(dir, 'etcd'),
    '--listen-client-urls', `http://127.0.0.1:${etcdClient}`, '--advertise-client-urls', `http://127.0.0.1:${etcdClient}`,
    '--listen-peer-urls', `http://127.0.0.1:${etcdPeer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${etcdPeer}`,
    '--initial-cluster', `e0=http://127.0.0.1:${etcdPeer}`, '--listen-metrics-urls', `http://127.0.0.1:${freePort()}`]);
  const procs = new Map<string, Proc>();
  const dataDirs = new Map<string, string>();
  const pgPorts = new Map<string, number>();
  const stopAll = async () => {
    for (const [name, proc] of procs) {
      await kill(proc, 'SIGTERM');
      const pm = postmasterPid(dataDirs.get(name)!);
      if (pm) { try { process.kill(pm, 'SIGKILL'); } catch { /* gone */ } }
    }
    await kill(etcd, 'SIGTERM');
    // The postmasters' children leave once they see their postmaster gone.
    for (let i = 0; i < 50 && [...dataDirs.values()].some((d) => postmasterPid(d)); i++) await sleep(100);
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await waitUntil('etcd', async () => (await fetch(`http://127.0.0.1:${etcdClient}/health`)).ok, 30_000, () => etcd.log);
    const members: PatroniMember[] = [];
    for (const name of ['pg0', 'pg1']) {
      const home = path.join(dir, name);
      await mkdir(home);
      await chown(home, uid, gid);
      const restPort = freePort();
      const pgPort = freePort();
      const data = path.join(home, 'data');
      dataDirs.set(name, data);
      pgPorts.set(name, pgPort);
      const config = patroniConfig({ scope, name, home, data, bin, restPort, pgPort, etcdClient });
      const file = path.join(home, 'patroni.yml');
      await writeFile(file, config);
      await chown(file, uid, gid);
      const spawnPatroni = () => {
        const proc = start('patroni', [file], { uid, gid, env: { ...process.env, HOME: home, PATH: `${bin}:${process.env.PATH}` } });
        procs.set(name, proc);
      };
      spawnPatroni();
      members.push({
        name, socketDir: home, restUrl: `http://127.0.0.1:${restPort}`,
        async kill9() {
          const pm = postmasterPid(data);
          await kill(procs.get(name)!, 'SIGKILL');
          if (pm) { try { process.kill(pm, 'SIGKILL'); } catch { /* gone */ } }
          for (let i = 0; i < 100 && postmasterPid(data); i++) await sleep(100);
        },
      });
      // The first member bootstraps alone (it initdb's); the second clones it.
      if (members.length === 1) {
        await waitUntil(`patroni ${name} to lead`, async () => (await fetch(`http://127.0.0.1:${restPort}/primary`)).status === 200, 120_000,
          () => procs.get(name)!.log);
      }
    }
    const [first, second] = members as [PatroniMember, PatroniMember];
    await waitUntil('the replica to stream (synchronously)', async () => {
      const r = await fetch(`${second.restUrl}/sync`);
      return r.status === 200;
    }, 180_000, () => procs.get('pg1')!.log);
    const psqlAt = (socketDir: string, port: number, sql: string, db = 'podflare') =>
      execFileSync('runuser', ['-u', 'postgres', '--', path.join(bin, 'psql'), '-h', socketDir, '-p', String(port), '-d', db, '-XAtqc', sql],
        { stdio: 'pipe', timeout: 30_000 }).toString();
    const leader = async (): Promise<string | undefined> => {
      for (const m of members) {
        try {
          if ((await fetch(`${m.restUrl}/primary`, { signal: AbortSignal.timeout(2000) })).status === 200) return m.name;
        } catch { /* down */ }
      }
      return undefined;
    };
    psqlAt(first.socketDir, pgPorts.get('pg0')!, 'CREATE DATABASE podflare', 'postgres');
    const url = `postgres://postgres@/podflare?host=${members.map((m) => encodeURIComponent(m.socketDir)).join(',')}` +
      `&port=${members.map((m) => pgPorts.get(m.name)).join(',')}&target_session_attrs=read-write`;
    return {
      url, socketDir: first.socketDir, members, leader,
      psql(sql) {
        let lastError: unknown;
        for (const m of members) {
          try {
            return psqlAt(m.socketDir, pgPorts.get(m.name)!, sql);
          } catch (err) { lastError = err; }
        }
        throw lastError;
      },
      async switchover(from, candidate) {
        const res = await fetch(`${members.find((m) => m.name === from)!.restUrl}/switchover`, {
          method: 'POST', body: JSON.stringify({ leader: from, candidate }), headers: { 'content-type': 'application/json' },
        });
        if (res.status !== 200) throw new Error(`switchover: ${res.status} ${await res.text()}`);
      },
      stop: stopAll,
    };
  } catch (err) {
    const logs = [...procs.entries()].map(([n, p]) => `--- ${n}\n${p.log.slice(-3000)}`).join('\n');
    await stopAll();
    throw new Error(`${(err as Error).message}\n${logs}`);
  }
}

async function waitUntil(what: string, ok: () => Promise<boolean>, timeoutMs: number, log: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await ok().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${log().slice(-3000)}`);
    await sleep(250);
  }
}

interface MemberConfig { scope: string; name: string; home: string; data: string; bin: string; restPort: number; pgPort: number; etcdClient: number }

/**
 * Short timings so a failover takes seconds, not the defaults' half minute: the leader key lives
 * 10 s (a killed primary is replaced ~10 s later), Patroni loops every second.
 */
function patroniConfig(c: MemberConfig): string {
  return `scope: ${c.scope}
name: ${c.name}
log:
  level: WARNING
restapi:
  listen: 127.0.0.1:${c.restPort}
  connect_address: 127.0.0.1:${c.restPort}
etcd3:
  hosts: 127.0.0.1:${c.etcdClient}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 200
        wal_log_hints: 'on'
  initdb:
    - encoding: UTF8
    - auth: trust
postgresql:
  listen: 127.0.0.1:${c.pgPort}
  connect_address: 127.0.0.1:${c.pgPort}
  data_dir: ${c.data}
  bin_dir: ${c.bin}
  pgpass: ${c.home}/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: '${c.home}'
    fsync: 'off'
    full_page_writes: 'on'
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
`;
}
