/**
 * Starts a Podflare server: image, store, runtime, sandbox manager, HTTP. Everything hangs off the
 * returned object (no module-level state), so a test can run several servers in one process.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { chmod, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { assertStateDirReachable } from './state-dir-access.js';
import { isLoopback, type ServerConfig } from './config.js';
import { EgressService } from './egress/index.js';
import { createApp, type RequestListener } from './http/app.js';
import type { HttpMount } from './http/mounts.js';
import { ensureImage, type ImageProgress } from './image/index.js';
import { createLogger, type Logger } from './log.js';
import { NamespaceRuntime } from './runtime/namespace/namespace-runtime.js';
import { SandboxEventLog } from './sandbox-events.js';
import { createVmRuntime } from './runtime/vm/create.js';
import { SandboxManager } from './sandbox-manager.js';
import { lockStateDir, type StateDirLock } from './state-lock.js';
import { SqliteStore } from './store/sqlite-store.js';
import type { SandboxStore } from './store/store.js';
import { Spawner } from './spawner.js';

export interface RunningServer {
  url: string;
  config: ServerConfig;
  manager: SandboxManager;
  close(): Promise<void>;
}

export interface StartOptions {
  onImageProgress?: (p: ImageProgress) => void;
  /** Handlers to serve beside the API (e.g. the CLI's MCP endpoint at /mcp); closed first on close(). */
  mounts?: readonly HttpMount[];
  /** The records' store instead of the state directory's SQLite file (cluster nodes: PostgreSQL); closed with the server. */
  store?: SandboxStore;
  /** Wraps the HTTP handler (cluster nodes: refuse requests that do not come from a gateway). */
  wrapHandler?: (handler: RequestListener) => RequestListener;
}

export async function startServer(config: ServerConfig, opts: StartOptions = {}): Promise<RunningServer> {
  const log = createLogger(config.logLevel);
  if (!isLoopback(config.host) && config.apiKeys.length === 0) {
    throw new Error(`refusing to listen on ${config.host} without API keys: set PODFLARE_API_KEYS (or bind 127.0.0.1)`);
  }
  // Before anything is built or started: a state directory the sandboxes cannot reach would only
  // show later, as every sandbox failing.
  await assertStateDirReachable(config.stateDir);
  await mkdir(config.stateDir, { recursive: true });
  // Others may only pass through (sandboxes' and VMs' uids reach their own files below it).
  await chmod(config.stateDir, 0o711);
  const lock = await lockStateDir(config.stateDir);
  try {
    return await startLocked(config, opts, log, lock);
  } catch (err) {
    await lock.release();
    throw err;
  }
}

async function startLocked(config: ServerConfig, opts: StartOptions, log: Logger, lock: StateDirLock): Promise<RunningServer> {
  const image = await ensureImage({ imagesDir: config.imagesDir, agentDir: config.agentDir, onProgress: opts.onImageProgress, log: (m: string) => log.info(m) });
  const store = opts.store ?? new SqliteStore(path.join(config.stateDir, 'podflare.db'));
  const events = new SandboxEventLog();
  const egress = new EgressService({ dnsServers: config.egressDnsServers, events, log });
  // Starts the runtimes' helper processes (slirp4netns, QEMU): one per server, not per process.
  const spawner = new Spawner(log);
  const ns = new NamespaceRuntime({
    stateDir: config.stateDir,
    lowerDirs: [image.agent, image.base],
    startTimeoutMs: config.startTimeoutMs,
    interruptGraceMs: config.interruptGraceMs,
    uidBase: config.sandboxUidBase,
    diskVolumeBytes: config.diskVolumeBytes,
    log,
    egress,
    hostHelper: config.hostHelper,
    spawner,
    onIncompatible: config.onIncompatible,
  });
  const vm = await createVmRuntime(config, image, log, spawner, opts.onImageProgress);
  const runtimes = [ns, ...(vm ? [vm.runtime] : [])];
  if (vm && (config.runtime === 'vm' || (config.runtime === 'auto' && vm.runtime.accel.kind === 'kvm'))) runtimes.reverse();
  const runtime = runtimes[0]!;
  if (runtime.name === 'vm') await vm!.image(); // the default runtime's image is built before listening
  const manager = new SandboxManager(runtimes, store, config, log, events);
  manager.metrics.gauge('podflare_host_helper_restarts_total',
    'Host helper workers replaced: died on their own (exit), missed a call\'s timeout (timeout), or killed for a fault (fault).',
    () => ns.hostHelperRestarts().map(({ reason, count }) => ({ labels: { reason }, value: count })), 'counter');
  await manager.start();

  let loopbackUrl = '';
  const app = createApp({
    mounts: opts.mounts, loopbackUrl: () => loopbackUrl,
    manager, apiKeys: config.apiKeys, runtimeName: runtime.name, maxSandboxes: config.maxSandboxes, log,
    rateLimit: { perSecond: config.rateLimitPerSecond, burst: config.rateLimitBurst },
    browserAccess: { allowedHosts: config.allowedHosts, allowedOrigins: config.allowedOrigins },
  });
  const server = http.createServer({ noDelay: true, keepAliveTimeout: 65_000, maxHeaderSize: 16 * 1024 }, opts.wrapHandler ? opts.wrapHandler(app) : app);
  server.headersTimeout = 30_000;
  // Header size is capped by maxHeaderSize above (Node answers 431); the count too.
  server.maxHeadersCount = 100;
  server.requestTimeout = 0; // execs and uploads may legitimately run long
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  egress.protectedPorts.push(address.port);
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  loopbackUrl = `http://${loopbackHost(address)}:${address.port}`;
  log.info('podflare listening', { url, runtime: runtime.name, runtimes: runtimes.map((r) => r.name).join(','), vm_accel: vm?.runtime.accel.kind, pool: config.poolSize, image: image.id });

  let closing: Promise<void> | null = null;
  return {
    url,
    config,
    manager,
    close() {
      // The host helpers are unref'd when idle, and once the listener is closed a teardown step may
      // be waiting on nothing but them: hold the process up until the close is done, or it would
      // exit half-way (seen as "Promise resolution is still pending" at the VM tests' last stop).
      const keepAlive = closing ? undefined : setInterval(() => undefined, 60_000);
      closing ??= (async () => {
        // Mounts first, while the API still answers: they may act through it (MCP sessions destroy their sandboxes).
        await Promise.all((opts.mounts ?? []).map((m) => m.close?.().catch((err: unknown) => log.warn('closing a mount', { error: String(err) }))));
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        await manager.close();
        spawner.close(); // after the sandboxes: whatever it started dies with it
        server.closeAllConnections();
        await closed;
        await store.close();
        await lock.release();
      })().finally(() => clearInterval(keepAlive));
      return closing;
    },
  };
}

/** The address this process reaches the listener at: a wildcard bind is reached through loopback. */
function loopbackHost(address: AddressInfo): string {
  if (address.address === '0.0.0.0') return '127.0.0.1';
  if (address.address === '::') return '[::1]';
  return address.family === 'IPv6' ? `[${address.address}]` : address.address;
}
