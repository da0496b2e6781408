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
import { createApp, type RequestListener, type UpgradeListener } from './http/app.js';
import type { HttpMount } from './http/mounts.js';
import { ensureImage, TemplateCatalog, type ImageProgress } from './image/index.js';
import { createLogger, type Logger } from './log.js';
import type { ServerRuntimes } from './runtime/driver-context.js';
import { builtinRuntimes } from './runtime/drivers.js';
import { SandboxEventLog } from './sandbox-events.js';
import { SandboxManager } from './sandbox-manager.js';
import { lockStateDir, type StateDirLock } from './state-lock.js';
import { SqliteStore } from './store/sqlite-store.js';
import type { SandboxStore } from './store/store.js';
import { Spawner } from './runtime/shared/spawner.js';

export interface RunningServer {
  url: string;
  config: ServerConfig;
  /** The default runtime's name (what `runtime` omitted or `auto` gets). */
  runtime: string;
  manager: SandboxManager;
  close(): Promise<void>;
}

export interface StartOptions {
  onImageProgress?: (p: ImageProgress) => void;
  /** Handlers to serve beside the API (e.g. the CLI's MCP endpoint at /mcp); closed first on close(). */
  mounts?: readonly HttpMount[];
  /** The runtime drivers to offer (default: the built-in ones, runtime/drivers.ts). */
  runtimes?: ServerRuntimes;
  /** The records' store instead of the state directory's SQLite file (cluster nodes: PostgreSQL); closed with the server. */
  store?: SandboxStore;
  /** Wraps the HTTP handler (cluster nodes: refuse requests that do not come from a gateway). */
  wrapHandler?: (handler: RequestListener) => RequestListener;
  /** Wraps the Upgrade (WebSocket) listener likewise. */
  wrapUpgrade?: (listener: UpgradeListener) => UpgradeListener;
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
  const registry = opts.runtimes ?? builtinRuntimes();
  let started;
  try {
    started = await registry.startAll(config.runtime ?? registry.names()[0]!, {
      settings: config, image, log, spawner, egress, onImageProgress: opts.onImageProgress,
      layersFor: (template: string): Promise<string[]> => templates.layers(template),
    });
  } catch (err) {
    spawner.close();
    await store.close();
    throw err;
  }
  for (const s of started.skipped) log.debug('runtime not offered', { runtime: s.name, reason: s.reason });
  const { instances } = started;
  const runtimes = instances.map((i) => i.runtime);
  const runtime = runtimes[0]!;
  await instances[0]!.prepareDefault?.(); // e.g. the default runtime's image, built before listening
  // Templates other than `default` are built on first use (or by `podflare template build`).
  const templates: TemplateCatalog = new TemplateCatalog({
    imagesDir: config.imagesDir, base: { rootfs: image.base, hash: image.baseHash }, runtimes: runtimes.map((r) => r.name),
    templateRuntimes: runtimes.filter((r) => r.capabilities.templates).map((r) => r.name),
    log: (m: string) => log.info(m),
    onProgress: (p) => log.info('template build', { message: p.message, step: p.step, seconds: Math.round(p.elapsedMs / 1000) }),
  });
  const manager = new SandboxManager(runtimes, store, config, log, events, registry.names(), templates);
  for (const g of instances.flatMap((i) => i.gauges ?? [])) manager.metrics.gauge(g.name, g.help, () => g.read(), g.kind);
  await manager.start();

  let loopbackUrl = '';
  const app = createApp({
    mounts: opts.mounts, loopbackUrl: () => loopbackUrl,
    manager, templates, apiKeys: config.apiKeys, runtimeName: runtime.name, maxSandboxes: config.maxSandboxes, log,
    rateLimit: { perSecond: config.rateLimitPerSecond, burst: config.rateLimitBurst },
    browserAccess: { allowedHosts: config.allowedHosts, allowedOrigins: config.allowedOrigins },
  });
  const server = http.createServer({ noDelay: true, keepAliveTimeout: 65_000, maxHeaderSize: 16 * 1024 }, opts.wrapHandler ? opts.wrapHandler(app) : app);
  server.on('upgrade', opts.wrapUpgrade ? opts.wrapUpgrade(app.upgrade) : app.upgrade); // WebSockets to exposed ports and terminals
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
  // The warm pool fills behind the listener: a restart's adopted sandboxes answer without waiting for it.
  manager.warmPool();
  log.info('podflare listening', {
    url, runtime: runtime.name, runtimes: runtimes.map((r) => r.name).join(','), ...Object.assign({}, ...instances.map((i) => i.logFields)),
    pool: config.poolSize, image: image.id,
  });

  let closing: Promise<void> | null = null;
  return {
    url,
    config,
    runtime: runtime.name,
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
