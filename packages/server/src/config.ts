/**
 * Server configuration: defaults, overridden by the environment, overridden by explicit options
 * (CLI flags or a test's arguments). Resolved once into a plain object; nothing reads process.env
 * after this.
 */
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllowedHost, parseAllowedOrigin } from '@podflare/protocol/browser-access';
import type { RuntimeName } from '@podflare/runtime';
import { MB } from './limits.js';
import type { LogLevel } from './log.js';
import type { SandboxLimits } from './runtime/runtime.js';

export type { RuntimeName };
export type OnStop = 'keep' | 'destroy';
export type { OnIncompatible } from '@podflare/runtime';
import type { OnIncompatible } from '@podflare/runtime';

export interface ServerConfig {
  host: string;
  port: number;
  /** Sandboxes' layers and the SQLite database. @default PODFLARE_STATE_DIR or /var/lib/podflare */
  stateDir: string;
  /** Built images; shareable between servers. @default PODFLARE_IMAGES_DIR or <stateDir>/images */
  imagesDir: string;
  /** Bearer keys; empty means no auth (only allowed on loopback). @default PODFLARE_API_KEYS */
  apiKeys: string[];
  /** Ready sandboxes kept per template. @default PODFLARE_POOL_SIZE or sized to the machine */
  poolSize: number;
  /**
   * Warm sandboxes per template, overriding poolSize (default) and the on-demand size of the others
   * (a quarter of poolSize); a template named here is kept warm from start-up and never shrinks.
   * @default PODFLARE_TEMPLATE_POOL_SIZES, e.g. `python-datasci=2,scraper=1`
   */
  templatePoolSizes: Record<string, number>;
  /**
   * A template's pool (not `default`'s, nor one in templatePoolSizes) nobody took from for this long
   * shrinks to none. @default PODFLARE_TEMPLATE_POOL_IDLE_SECONDS or 600
   */
  templatePoolIdleSeconds: number;
  /**
   * The default runtime: a registered driver's name (runtime/drivers.ts) or `auto`; checked against
   * the registry when the server starts. @default PODFLARE_RUNTIME, else the first registered
   */
  runtime?: RuntimeName;
  /**
   * The most ready sandboxes the pool grows a key to while creates come fast (sized from the
   * observed create rate, back down to `poolSize` when idle). @default PODFLARE_POOL_MAX or 4 × poolSize (at most 32)
   */
  poolMaxSize: number;
  /** After this long without a create, a pool grown past `poolSize` shrinks back. @default PODFLARE_POOL_IDLE_SECONDS or 30 */
  poolIdleSeconds: number;
  /**
   * Per template, a pre-warmed zygote whose interpreter has imported the template's modules:
   * pool refills and misses are forks of it, not cold starts (namespace runtime). @default PODFLARE_ZYGOTE or on
   */
  zygote: boolean;
  /**
   * What the `default` template's zygote imports instead of its own light list (Python module
   * names), e.g. numpy,pandas,matplotlib,matplotlib.pyplot where users are data people: instant
   * imports, at the price of slower forks (bigger interpreters). @default PODFLARE_DEFAULT_PRELOAD (comma-separated), else the template's list
   */
  defaultTemplatePreload: string[] | null;
  logLevel: LogLevel;
  /** The repo's agent/ folder, copied into the image's agent layer. */
  agentDir: string;
  /** Default idle timeout of a sandbox. */
  idleTimeoutSeconds: number;
  /** Default and upper bound of a sandbox's whole life. */
  maxLifetimeSeconds: number;
  /** Server-wide cap on live sandboxes (the warm pool comes on top). @default PODFLARE_MAX_SANDBOXES or 256 */
  maxSandboxes: number;
  /** Cap on live sandboxes one API key owns (forks included). @default PODFLARE_MAX_SANDBOXES_PER_KEY or 128 */
  maxSandboxesPerKey: number;
  /**
   * Sustained requests per second one API key may make (a token bucket; 0 turns the limit off).
   * Applies only when API keys are configured. Generous by default: it stops runaway loops, not
   * busy agents. @default PODFLARE_RATE_LIMIT_RPS or 1000
   */
  rateLimitPerSecond: number;
  /** Requests a key may make in a burst above its rate. @default PODFLARE_RATE_LIMIT_BURST or 2000 */
  rateLimitBurst: number;
  /**
   * What a stop (SIGTERM/SIGINT, close()) does with live sandboxes: 'keep' leaves them running for
   * the next server on the state directory to adopt (a restart or an upgrade loses nothing; the
   * default of `podflare serve`), 'destroy' ends them (the default of `podflare demo` and of
   * servers started as a library). @default PODFLARE_ON_STOP or 'destroy'
   */
  onStop: OnStop;
  /**
   * Live sandboxes of an earlier server whose agent protocol has another major version (an
   * upgrade across an incompatible change): 'clean' ends them (recorded lost, logged), 'refuse'
   * refuses to start, naming them. @default PODFLARE_ON_INCOMPATIBLE or 'clean'
   */
  onIncompatible: OnIncompatible;
  /** How long an agent may take to say hello. */
  startTimeoutMs: number;
  /** Grace between an interrupt and killing the interpreter. */
  interruptGraceMs: number;
  /**
   * First host uid/gid of the range sandboxes run as (root inside = this uid on the host; 65536
   * ids): never host root. Pick a range no host account uses.
   */
  sandboxUidBase: number;
  /**
   * Size of the namespace runtime's disk volume (the btrfs filesystem holding every sandbox's
   * files, fork layers included), reserved on the state directory's filesystem at start: the
   * server refuses to start where that much is not free. Sandboxes' disk limits may add up to more
   * (a full volume answers 507 to its writers); the host's disk stays out of their reach.
   * @default PODFLARE_DISK_VOLUME_MB or 8192 MB
   */
  diskVolumeBytes: number;
  /**
   * First host id of the range VMs run as: the first is the group every VM's QEMU has (it may read
   * the templates), each QEMU gets one of the others as its own uid and gid, and each fork point
   * one as the group of its children. Must not overlap the sandboxes' range.
   * @default PODFLARE_VM_UID_BASE or sandboxUidBase + 65536 (just past the sandboxes' range)
   */
  vmUidBase: number;
  /** How many ids the VM range holds (at most one less VMs and fork points at a time). @default PODFLARE_VM_UID_COUNT or 4096 */
  vmUidCount: number;
  /** Limits of a sandbox created without any. */
  defaultLimits: SandboxLimits;
  /** The most a create may ask for. */
  maxLimits: SandboxLimits;
  /**
   * DNS servers ("ip" or "ip:port") through which the egress proxy resolves the names a sandbox's
   * allowlist permits. @default PODFLARE_EGRESS_DNS (comma-separated), else the host's resolver
   */
  egressDnsServers: string[];
  /**
   * Host names the API answers to besides loopback names (localhost, *.localhost) and IP literals,
   * e.g. the public name of a reverse proxy in front of it. Any other `Host` gets a 403 (a guard
   * against DNS rebinding). @default PODFLARE_ALLOWED_HOSTS (comma-separated), else none
   */
  allowedHosts: string[];
  /**
   * Web origins (`scheme://host[:port]`) whose pages may call the API cross-origin (with CORS).
   * Pages of other origins get a 403; the dashboard (the server's own origin) always works.
   * @default PODFLARE_ALLOWED_ORIGINS (comma-separated), else none
   */
  allowedOrigins: string[];
  /**
   * The host helper (root, does the namespace runtime's mounts, layer copies and diffs): how many
   * worker processes, and how long a call may take before its worker is killed and replaced —
   * `fastTimeoutMs` for mount ops, `slowTimeoutMs` for diffs, layer squashes and the rest.
   * @default PODFLARE_HOST_HELPER_WORKERS or 3; PODFLARE_HOST_HELPER_FAST_TIMEOUT_MS or 10000;
   * PODFLARE_HOST_HELPER_SLOW_TIMEOUT_MS or 120000
   */
  hostHelper: { workers: number; fastTimeoutMs: number; slowTimeoutMs: number };
}

/** The repo's agent/ folder, found relative to this file (packages/server/dist/config.js). */
function defaultAgentDir(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../agent');
}

/** Two warm sandboxes per core, between 2 and 16: enough to absorb bursts, cheap when idle (~20 MB each). */
function defaultPoolSize(): number {
  return Math.max(2, Math.min(16, os.availableParallelism() * 2));
}

/** The smallest disk volume worth making: btrfs keeps a few hundred MB of metadata and reserves. */
export const MIN_DISK_VOLUME_BYTES = 256 * MB;

function int(value: string | undefined, name: string): number | undefined {
  if (value === undefined || value === '') return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a non-negative integer, got "${value}"`);
  return n;
}

function num(value: string | undefined, name: string): number | undefined {
  if (value === undefined || value === '') return undefined;
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} must be a positive number, got "${value}"`);
  return n;
}


export function loadConfig(overrides: Partial<ServerConfig> = {}, env: NodeJS.ProcessEnv = process.env): ServerConfig {
  const stateDir = overrides.stateDir ?? env.PODFLARE_STATE_DIR ?? '/var/lib/podflare';
  const runtime = overrides.runtime ?? (env.PODFLARE_RUNTIME || undefined);
  const config: ServerConfig = {
    host: env.PODFLARE_BIND_HOST ?? '127.0.0.1',
    port: int(env.PODFLARE_PORT, 'PODFLARE_PORT') ?? 7070,
    stateDir,
    imagesDir: env.PODFLARE_IMAGES_DIR ?? path.join(overrides.stateDir ?? stateDir, 'images'),
    apiKeys: (env.PODFLARE_API_KEYS ?? '').split(',').map((k) => k.trim()).filter(Boolean),
    poolSize: int(env.PODFLARE_POOL_SIZE, 'PODFLARE_POOL_SIZE') ?? defaultPoolSize(),
    poolMaxSize: int(env.PODFLARE_POOL_MAX, 'PODFLARE_POOL_MAX') ?? -1, // -1: from poolSize (below)
    defaultTemplatePreload: env.PODFLARE_DEFAULT_PRELOAD === undefined ? null : list(env.PODFLARE_DEFAULT_PRELOAD),
    poolIdleSeconds: int(env.PODFLARE_POOL_IDLE_SECONDS, 'PODFLARE_POOL_IDLE_SECONDS') ?? 30,
    zygote: !['0', 'false', 'off', 'no'].includes((env.PODFLARE_ZYGOTE ?? '').trim().toLowerCase()),
    templatePoolSizes: templateSizes(env.PODFLARE_TEMPLATE_POOL_SIZES),
    templatePoolIdleSeconds: int(env.PODFLARE_TEMPLATE_POOL_IDLE_SECONDS, 'PODFLARE_TEMPLATE_POOL_IDLE_SECONDS') ?? 600,
    runtime,
    logLevel: (env.PODFLARE_LOG_LEVEL as LogLevel | undefined) ?? 'info',
    agentDir: env.PODFLARE_AGENT_DIR ?? defaultAgentDir(),
    idleTimeoutSeconds: int(env.PODFLARE_IDLE_TIMEOUT_SECONDS, 'PODFLARE_IDLE_TIMEOUT_SECONDS') ?? 300,
    maxLifetimeSeconds: int(env.PODFLARE_MAX_LIFETIME_SECONDS, 'PODFLARE_MAX_LIFETIME_SECONDS') ?? 24 * 3600,
    maxSandboxes: int(env.PODFLARE_MAX_SANDBOXES, 'PODFLARE_MAX_SANDBOXES') ?? 256,
    maxSandboxesPerKey: int(env.PODFLARE_MAX_SANDBOXES_PER_KEY, 'PODFLARE_MAX_SANDBOXES_PER_KEY') ?? 128,
    rateLimitPerSecond: int(env.PODFLARE_RATE_LIMIT_RPS, 'PODFLARE_RATE_LIMIT_RPS') ?? 1000,
    rateLimitBurst: int(env.PODFLARE_RATE_LIMIT_BURST, 'PODFLARE_RATE_LIMIT_BURST') ?? 2000,
    onStop: onStopSetting(env.PODFLARE_ON_STOP, 'PODFLARE_ON_STOP') ?? 'destroy',
    onIncompatible: onIncompatibleSetting(env.PODFLARE_ON_INCOMPATIBLE) ?? 'clean',
    startTimeoutMs: 15_000,
    interruptGraceMs: int(env.PODFLARE_INTERRUPT_GRACE_MS, 'PODFLARE_INTERRUPT_GRACE_MS') ?? 2000,
    diskVolumeBytes: (int(env.PODFLARE_DISK_VOLUME_MB, 'PODFLARE_DISK_VOLUME_MB') ?? 8192) * MB,
    sandboxUidBase: int(env.PODFLARE_SANDBOX_UID_BASE, 'PODFLARE_SANDBOX_UID_BASE') ?? 100_000,
    vmUidBase: int(env.PODFLARE_VM_UID_BASE, 'PODFLARE_VM_UID_BASE') ?? -1, // -1: past the sandboxes' range (below)
    vmUidCount: int(env.PODFLARE_VM_UID_COUNT, 'PODFLARE_VM_UID_COUNT') ?? 4096,
    // The hosted services' defaults: 2 vCPU, 1 GB RAM, 4 GB disk; 512 processes.
    defaultLimits: {
      cpus: num(env.PODFLARE_DEFAULT_CPUS, 'PODFLARE_DEFAULT_CPUS') ?? 2,
      memoryBytes: (int(env.PODFLARE_DEFAULT_MEMORY_MB, 'PODFLARE_DEFAULT_MEMORY_MB') ?? 1024) * MB,
      diskBytes: (int(env.PODFLARE_DEFAULT_DISK_MB, 'PODFLARE_DEFAULT_DISK_MB') ?? 4096) * MB,
      pids: int(env.PODFLARE_DEFAULT_PROCESSES, 'PODFLARE_DEFAULT_PROCESSES') ?? 512,
    },
    maxLimits: {
      cpus: num(env.PODFLARE_MAX_CPUS, 'PODFLARE_MAX_CPUS') ?? Math.max(2, os.availableParallelism()),
      memoryBytes: (int(env.PODFLARE_MAX_MEMORY_MB, 'PODFLARE_MAX_MEMORY_MB') ?? 8192) * MB,
      diskBytes: (int(env.PODFLARE_MAX_DISK_MB, 'PODFLARE_MAX_DISK_MB') ?? 65536) * MB,
      pids: int(env.PODFLARE_MAX_PROCESSES, 'PODFLARE_MAX_PROCESSES') ?? 4096,
    },
    egressDnsServers: list(env.PODFLARE_EGRESS_DNS),
    allowedHosts: list(env.PODFLARE_ALLOWED_HOSTS),
    allowedOrigins: list(env.PODFLARE_ALLOWED_ORIGINS),
    hostHelper: {
      workers: int(env.PODFLARE_HOST_HELPER_WORKERS, 'PODFLARE_HOST_HELPER_WORKERS') ?? 3,
      fastTimeoutMs: int(env.PODFLARE_HOST_HELPER_FAST_TIMEOUT_MS, 'PODFLARE_HOST_HELPER_FAST_TIMEOUT_MS') ?? 10_000,
      slowTimeoutMs: int(env.PODFLARE_HOST_HELPER_SLOW_TIMEOUT_MS, 'PODFLARE_HOST_HELPER_SLOW_TIMEOUT_MS') ?? 120_000,
    },
  };
  if (config.sandboxUidBase < 1 || config.sandboxUidBase + 65_536 > 0xffff_fffe) {
    throw new Error(`PODFLARE_SANDBOX_UID_BASE must leave room for 65536 ids above it and be at least 1, got ${config.sandboxUidBase}`);
  }
  const merged = { ...config, ...stripUndefined(overrides) };
  // A partial override (a test's short timeout) keeps the other fields.
  if (overrides.hostHelper) merged.hostHelper = { ...config.hostHelper, ...stripUndefined(overrides.hostHelper) };
  const { workers, fastTimeoutMs, slowTimeoutMs } = merged.hostHelper;
  if (workers < 1 || fastTimeoutMs < 1 || slowTimeoutMs < 1) {
    throw new Error(`the host helper needs at least 1 worker and timeouts of at least 1 ms, got ${JSON.stringify(merged.hostHelper)}`);
  }
  if (merged.diskVolumeBytes < MIN_DISK_VOLUME_BYTES) {
    throw new Error(`PODFLARE_DISK_VOLUME_MB must be at least ${MIN_DISK_VOLUME_BYTES / MB} (a btrfs volume needs room for its metadata), got ${Math.floor(merged.diskVolumeBytes / MB)}`);
  }
  if (overrides.stateDir && !overrides.imagesDir && !env.PODFLARE_IMAGES_DIR) merged.imagesDir = path.join(overrides.stateDir, 'images');
  if (merged.vmUidBase < 0) merged.vmUidBase = merged.sandboxUidBase + 65_536;
  if (merged.poolMaxSize < 0) merged.poolMaxSize = Math.min(32, 4 * merged.poolSize);
  if (merged.poolMaxSize < merged.poolSize) merged.poolMaxSize = merged.poolSize;
  checkVmUidRange(merged);
  merged.allowedHosts = checked(merged.allowedHosts, parseAllowedHost, 'allowed host (PODFLARE_ALLOWED_HOSTS, --allowed-host)');
  merged.allowedOrigins = checked(merged.allowedOrigins, parseAllowedOrigin, 'allowed origin (PODFLARE_ALLOWED_ORIGINS, --allowed-origin)');
  return merged;
}

/** `name=n,name=n` (PODFLARE_TEMPLATE_POOL_SIZES). */
function templateSizes(value: string | undefined): Record<string, number> {
  const sizes: Record<string, number> = {};
  for (const entry of list(value)) {
    const m = /^([a-z][a-z0-9-]{0,39})=(\d+)$/.exec(entry);
    if (!m) throw new Error(`PODFLARE_TEMPLATE_POOL_SIZES: expected template=count, got "${entry}"`);
    sizes[m[1]!] = Number(m[2]);
  }
  return sizes;
}

/** 'keep' or 'destroy' (see ServerConfig.onStop); undefined when unset. */
export function onStopSetting(value: string | undefined, name: string): OnStop | undefined {
  if (value === undefined || value === '') return undefined;
  if (value !== 'keep' && value !== 'destroy') throw new Error(`${name} must be keep or destroy, got "${value}"`);
  return value;
}

function onIncompatibleSetting(value: string | undefined): OnIncompatible | undefined {
  if (value === undefined || value === '') return undefined;
  if (value !== 'clean' && value !== 'refuse') throw new Error(`PODFLARE_ON_INCOMPATIBLE must be clean or refuse, got "${value}"`);
  return value;
}

function list(value: string | undefined): string[] {
  return (value ?? '').split(',').map((s) => s.trim()).filter(Boolean);
}

/** Each entry in its normal form; the first bad one throws, naming where it came from. */
function checked(entries: string[], parse: (raw: string) => string | { error: string }, what: string): string[] {
  return entries.map((raw) => {
    const parsed = parse(raw);
    if (typeof parsed !== 'string') throw new Error(`bad ${what}: ${parsed.error}`);
    return parsed;
  });
}

/** The VM range: inside the id space, never root, and apart from the namespace sandboxes' ids. */
function checkVmUidRange(c: ServerConfig): void {
  const { vmUidBase: base, vmUidCount: count, sandboxUidBase: sandboxes } = c;
  if (count < 2) throw new Error(`PODFLARE_VM_UID_COUNT must be at least 2 (a group and one VM), got ${count}`);
  if (base < 1 || base + count > 0xffff_fffe) {
    throw new Error(`PODFLARE_VM_UID_BASE must be at least 1 and leave room for ${count} ids above it, got ${base}`);
  }
  // A VM sharing an id with a namespace sandbox could reach its files (and it the VM's).
  if (base < sandboxes + 65_536 && sandboxes < base + count) {
    const ranges = `${base}–${base + count - 1} overlaps the sandboxes' ${sandboxes}–${sandboxes + 65_535}`;
    throw new Error(`the VM uid range ${ranges}: set PODFLARE_VM_UID_BASE apart`);
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}
