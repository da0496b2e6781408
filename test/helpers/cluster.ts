/**
 * A whole cluster on this one machine, as real processes: a throwaway PostgreSQL, N `podflare node`
 * processes each in its own network namespace (ip netns + veth, addresses 10.234.x.0/30 chosen
 * here) with its own state directory and sandbox uid range, and M `podflare gateway` processes on
 * loopback. Nodes reach PostgreSQL through its unix socket (the filesystem is shared across
 * network namespaces); gateways reach nodes over the veths. Traffic stays on loopback and these
 * veths. Shared by test/cluster.test.ts and the bench.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startTestPostgres, type TestPostgres } from './postgres.js';
import { IMAGES_DIR } from './server.js';

const CLI = path.resolve(import.meta.dirname, '../../packages/cli/dist/main.js');
export const CLUSTER_API_KEY = 'cluster-test-key-0123456789';
const NODE_TOKEN = `node-token-${randomBytes(12).toString('hex')}`;
const NODE_PORT = 7070;

export interface ClusterNode {
  id: string;
  /** The network namespace it runs in. */
  netns: string;
  /** Its address (inside its namespace) and the host's end of the veth. */
  ip: string;
  hostIp: string;
  stateDir: string;
  pid(): number;
  /**
   * Starts it (again, after a kill): resolves once it listens. `keep`: a later stop (SIGTERM) leaves
   * its sandboxes running for the next node process, as `podflare node` does by default; without
   * it a stop ends them, so that a test cluster leaves nothing behind.
   */
  start(opts?: { keep?: boolean }): Promise<void>;
  kill9(): Promise<void>;
  stop(): Promise<void>;
  signal(sig: NodeJS.Signals): void;
  /** Runs a command inside its network namespace (nft, ip). */
  inNetns(...args: string[]): string;
  /** A request straight to the node (with the node token): what the gateway sees. */
  direct(method: string, p: string, body?: unknown): Promise<Response>;
  stderr(): string;
}

export interface ClusterGateway {
  url: string;
  kill9(): Promise<void>;
  stop(): Promise<void>;
  start(): Promise<void>;
  stderr(): string;
}

export interface TestCluster {
  pg: TestPostgres;
  nodes: ClusterNode[];
  gateways: ClusterGateway[];
  apiKey: string;
  close(): Promise<void>;
}

export interface ClusterOptions {
  nodes?: number;
  gateways?: number;
  poolSize?: number;
  maxSandboxes?: number;
  hostTtlMs?: number;
  env?: Record<string, string>;
  /** A database the caller started (and stops), e.g. a Patroni cluster; default: a fresh PostgreSQL. */
  database?: TestPostgres;
}

interface Proc {
  child: ChildProcess;
  exited: Promise<void>;
  stderr: string;
}

function spawnUntil(cmd: string, args: string[], env: Record<string, string>, ready: RegExp, what: string): Promise<{ proc: Proc; match: RegExpExecArray }> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const proc: Proc = { child, stderr: '', exited: new Promise((r) => child.once('exit', () => r())) };
  child.stderr!.on('data', (d: Buffer) => { proc.stderr = (proc.stderr + d.toString()).slice(-8000); });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`${what} did not start: ${proc.stderr}`)); }, 120_000);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = ready.exec(out);
      if (m) { clearTimeout(timer); resolve({ proc, match: m }); }
    });
    void proc.exited.then(() => { clearTimeout(timer); reject(new Error(`${what} exited: ${proc.stderr.trim()}`)); });
  });
}

async function stopProc(proc: Proc | undefined, signal: NodeJS.Signals): Promise<void> {
  if (!proc || proc.child.exitCode !== null || proc.child.signalCode !== null) return;
  proc.child.kill(signal);
  const timer = setTimeout(() => proc.child.kill('SIGKILL'), 60_000);
  await proc.exited;
  clearTimeout(timer);
}

export async function startCluster(opts: ClusterOptions = {}): Promise<TestCluster> {
  const tag = randomBytes(2).toString('hex');
  const pg = opts.database ?? await startTestPostgres();
  const nodes: ClusterNode[] = [];
  const gateways: ClusterGateway[] = [];
  const cleanups: Array<() => Promise<void>> = [];
  const close = async () => {
    for (const g of gateways) await g.stop().catch(() => {});
    await Promise.all(nodes.map((n) => n.stop().catch(() => {})));
    for (const c of cleanups.reverse()) await c().catch(() => {});
    if (!opts.database) await pg.stop();
  };
  try {
    const baseEnv = {
      PODFLARE_API_KEYS: CLUSTER_API_KEY, PODFLARE_NODE_TOKEN: NODE_TOKEN, PODFLARE_DB: pg.url, PODFLARE_DISK_VOLUME_MB: '1024',
      ...opts.env,
    };
    for (let i = 0; i < (opts.nodes ?? 3); i++) {
      const octet = (parseInt(tag, 16) * 7 + i) % 250 + 1;
      const netns = `pfc-${tag}-${i}`;
      const hostIf = `pfc${tag}h${i}`;
      const nsIf = `pfc${tag}n${i}`;
      const hostIp = `10.234.${octet}.1`;
      const ip = `10.234.${octet}.2`;
      const ipcmd = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' }).toString();
      ipcmd('netns', 'add', netns);
      cleanups.push(async () => {
        try { ipcmd('link', 'del', hostIf); } catch { /* gone with the namespace */ }
        ipcmd('netns', 'del', netns);
      });
      ipcmd('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
      ipcmd('link', 'set', nsIf, 'netns', netns);
      ipcmd('addr', 'add', `${hostIp}/30`, 'dev', hostIf);
      ipcmd('link', 'set', hostIf, 'up');
      ipcmd('-n', netns, 'addr', 'add', `${ip}/30`, 'dev', nsIf);
      ipcmd('-n', netns, 'link', 'set', nsIf, 'up');
      ipcmd('-n', netns, 'link', 'set', 'lo', 'up');
      const stateDir = await mkdtemp(path.join(os.tmpdir(), `pf-node${i}-`));
      cleanups.push(() => rm(stateDir, { recursive: true, force: true }));
      const id = `node-${i}`;
      // Each node its own uid ranges: sandboxes (65536 ids) and VMs (4096) apart from every other
      // node's and from the default range other tests' servers use.
      const uidBase = 3_000_000 + i * 200_000;
      let proc: Proc | undefined;
      const node: ClusterNode = {
        id, netns, ip, hostIp, stateDir,
        pid: () => proc?.child.pid ?? -1,
        async start(startOpts = {}) {
          // nsenter, not `ip netns exec`: that one mounts a fresh /sys, hiding the cgroup hierarchies.
          const { proc: p } = await spawnUntil('nsenter', [`--net=/run/netns/${netns}`, process.execPath, CLI, 'node',
            '--host', ip, '--port', String(NODE_PORT), '--advertise', `${ip}:${NODE_PORT}`, '--node-id', id,
            '--state-dir', stateDir, '--images-dir', IMAGES_DIR, '--pool-size', String(opts.poolSize ?? 1), '--log-level', 'warn',
            '--on-stop', startOpts.keep ? 'keep' : 'destroy'],
          { ...baseEnv, PODFLARE_SANDBOX_UID_BASE: String(uidBase), PODFLARE_VM_UID_BASE: String(uidBase + 70_000),
            PODFLARE_MAX_SANDBOXES: String(opts.maxSandboxes ?? 64) }, /listening on/, `node ${id}`);
          proc = p;
        },
        async kill9() { await stopProc(proc, 'SIGKILL'); },
        async stop() {
          if (proc?.child.signalCode === null && proc.child.exitCode === null) proc.child.kill('SIGCONT');
          await stopProc(proc, 'SIGTERM');
        },
        signal(sig) { proc?.child.kill(sig); },
        inNetns: (...args) => execFileSync('nsenter', [`--net=/run/netns/${netns}`, ...args], { stdio: 'pipe' }).toString(),
        direct: (method, p, body) => fetch(`http://${ip}:${NODE_PORT}${p}`, {
          method, body: body === undefined ? undefined : JSON.stringify(body),
          headers: { authorization: `Bearer ${CLUSTER_API_KEY}`, 'x-podflare-node-token': NODE_TOKEN, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
        }),
        stderr: () => proc?.stderr ?? '',
      };
      nodes.push(node);
    }
    await Promise.all(nodes.map((n) => n.start()));
    for (let i = 0; i < (opts.gateways ?? 2); i++) {
      let proc: Proc | undefined;
      let port = 0;
      const gateway: ClusterGateway = {
        url: '',
        async start() {
          const { proc: p, match } = await spawnUntil(process.execPath, [CLI, 'gateway', '--port', String(port), '--log-level', 'warn',
            ...(opts.hostTtlMs ? ['--host-ttl-ms', String(opts.hostTtlMs)] : [])], baseEnv,
          /listening on (http:\/\/127\.0\.0\.1:(\d+))/, `gateway ${i}`);
          proc = p;
          gateway.url = match[1]!;
          port = Number(match[2]); // a restart takes the same port back
        },
        async kill9() { await stopProc(proc, 'SIGKILL'); },
        async stop() { await stopProc(proc, 'SIGTERM'); },
        stderr: () => proc?.stderr ?? '',
      };
      await gateway.start();
      gateways.push(gateway);
    }
  } catch (err) {
    await close();
    throw err;
  }
  return { pg, nodes, gateways, apiKey: CLUSTER_API_KEY, close };
}
