/**
 * Option and result shapes of the SDK. Options are camelCase with units in their names; the SDK
 * converts them to the API's snake_case bodies. Exec event types come from `@podflare/protocol`.
 */
import type { Readable } from 'node:stream';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import type { DiffAnswer, SandboxInfo as ProtocolSandboxInfo, VarSummary, VarsDiff } from '@podflare/protocol';
import type { EgressSetting } from '@podflare/protocol/egress';
import type { SandboxState } from '@podflare/protocol/sandbox';
import type { ExecErrorInfo } from '@podflare/protocol/events';
import type { Client } from './client.js';
import type { Result } from './execution.js';

/**
 * The languages an exec can run. `python` runs in the sandbox's persistent interpreter; `bash` in a
 * fresh `bash -c`; `javascript` in the sandbox's persistent Node REPL (a fork's children start it afresh).
 */
export type Language = 'python' | 'bash' | 'javascript';

/**
 * Isolation runtime of a sandbox: one the server registers (built in: Linux namespaces, a micro-VM;
 * see its `/v1/capacity`), or `auto`, whichever the server prefers. The server checks the name.
 */
export type Runtime = string;

/**
 * Lifecycle state of a sandbox: `starting`, `ready` (idle), `running` (an exec in flight), `stopped`
 * (destroyed), `error` (crashed), `merged` (retired by `mergeInto`), `frozen`, `lost` (the server was killed
 * while it ran; cleaned up after the restart). Defined once in `@podflare/protocol`.
 */
export type { SandboxState };

/** How to reach the server. Give a `client` to share its connections; `host`/`apiKey` make a new one. */
export interface ConnectionOptions {
  /**
   * Base URL of the Podflare server (`http://host:port`, a bare `host:port` means http).
   * Ignored when `client` is given.
   * @default process.env.PODFLARE_HOST, else `http://127.0.0.1:7070`
   */
  host?: string;
  /**
   * API key sent as `Authorization: Bearer <key>`. Ignored when `client` is given.
   * @default process.env.PODFLARE_API_KEY (none: fine for a loopback server without keys)
   */
  apiKey?: string;
  /**
   * The client to talk through; its keep-alive connections are shared by every sandbox made with it.
   * @default a new Client when `host` or `apiKey` is given, else the lazily created default Client
   */
  client?: Client;
}

/** Options of {@link Sandbox.create}. */
export interface SandboxCreateOptions extends ConnectionOptions {
  /**
   * Template (image) to start from.
   * @default the server's default template (`default`)
   */
  template?: string;
  /**
   * Whether the sandbox may reach the network: `true` (anything but the host itself), `false`
   * (nothing, not even DNS), or `{ allow: [...] }`: only the hosts listed, through the server's
   * policy proxy (`"example.com"`, `"*.example.com"`, `"*"`, `"10.0.0.0/8"`). Programs in the
   * sandbox find the proxy through HTTP_PROXY / HTTPS_PROXY / ALL_PROXY; denied attempts show in
   * {@link Sandbox.events}.
   * @default true
   */
  egress?: EgressSetting;
  /**
   * Keep the sandbox when idle instead of destroying it after `idleTimeoutSeconds`.
   * @default false
   */
  persistent?: boolean;
  /**
   * Destroy the sandbox after this many seconds without a call.
   * @default 300 (the server's default)
   */
  idleTimeoutSeconds?: number;
  /**
   * Destroy the sandbox this many seconds after creation, busy or not.
   * @default the server's default (86400)
   */
  maxLifetimeSeconds?: number;
  /**
   * Isolation runtime.
   * @default the server's choice
   */
  runtime?: Runtime;
  /**
   * Resource limits, each within the server's maximum (a 400 names the one asked too high).
   * @default 2 CPUs, 1024 MB memory, 4096 MB disk, 512 processes (the server's defaults)
   */
  limits?: Partial<SandboxLimits>;
  /** Free-form string labels stored with the sandbox and returned by `info()`/`list()`. */
  metadata?: Record<string, string>;
  /**
   * Checkpoint before each exec and keep the last `history` (0–32): {@link Sandbox.rewind} then
   * undoes the last steps. Needs a runtime that can fork (namespace runtime).
   * @default 0 (no history)
   */
  history?: number;
}

/** A checkpoint of a sandbox (see {@link Sandbox.checkpoint}). */
export interface CheckpointInfo {
  id: string;
  /** The sandbox it belongs to: it can only be restored into that one. */
  sandbox: string;
  name: string | null;
  /** `manual`: made by `checkpoint()`; `history`: made before an exec (create's `history`). */
  kind: 'manual' | 'history';
  createdAt: string;
  /** For history checkpoints: the start of the code of the exec it was taken before. */
  beforeCode: string | null;
}

/**
 * What a sandbox may use. Exceeding memory kills the offending process (the exec reports
 * `MemoryLimitExceeded`); past `processes`, new processes are refused (`ProcessLimitExceeded`);
 * past `diskMb`, writes fail with "No space left on device".
 */
export interface SandboxLimits {
  /** CPU time in cores (fractions allowed). */
  cpus: number;
  memoryMb: number;
  diskMb: number;
  /** Processes and threads. */
  processes: number;
}

/** Options of {@link Sandbox.list}. */
export interface SandboxListOptions extends ConnectionOptions {
  /** Keep only descendants (fork children, grandchildren…) of this sandbox. */
  ancestor?: string | { readonly id: string };
  /** Keep only sandboxes in this state. */
  state?: SandboxState;
  /**
   * Include destroyed sandboxes the server still remembers.
   * @default false
   */
  all?: boolean;
}

/** What the server knows about a sandbox (`GET /v1/sandboxes/:id`). */
export interface SandboxInfo {
  /** `sbx_` followed by 32 hex digits. */
  id: string;
  state: SandboxState;
  template: string;
  /** The runtime that runs it. */
  runtime: string;
  egress: EgressSetting;
  persistent: boolean;
  /** The sandbox this one was forked from, or null. */
  parent: string | null;
  /** Ids of the sandboxes forked from this one. */
  children: string[];
  createdAt: Date;
  lastActiveAt: Date;
  idleTimeoutSeconds: number;
  limits: SandboxLimits;
  metadata: Record<string, string>;
  /** Why it ended (deleted, idle timeout, crash, its agent's channel broke, ...); null while live. */
  endReason: string | null;
}

/** Options of {@link Sandbox.runCodeStream} (and the base of {@link RunCodeOptions}). */
export interface ExecOptions {
  /**
   * Language of `code`.
   * @default 'python'
   */
  language?: Language;
  /**
   * Server-side limit on the code's run time; when hit the code is interrupted (the interpreter is
   * restarted if it does not yield) and the exit code is 124.
   * @default the server's default
   */
  timeoutMs?: number;
  /** Environment variables for this call only. */
  env?: Record<string, string>;
  /** Working directory for this call only. */
  cwd?: string;
  /**
   * Undo everything the code did if it fails (an exception, a non-zero exit): memory and files go
   * back to how they were before the call; `Execution.rolledBack` says so. The output is kept.
   * @default false
   */
  atomic?: boolean;
  /** Aborts the call: the request is cancelled and the promise rejects with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Client-side bound on the whole call, streaming included. Unlike other calls, an exec has none by
   * default (a long cell or one queued behind another is legitimate): only connecting is bounded, by
   * the Client's `requestTimeoutMs`. Prefer `timeoutMs`, which stops the code itself.
   * @default none
   */
  requestTimeoutMs?: number;
}

/** Options of {@link Sandbox.runCode}: {@link ExecOptions} plus callbacks called as events arrive. */
export interface RunCodeOptions extends ExecOptions {
  /** Called with each stdout chunk as it is produced. A returned promise is awaited. */
  onStdout?: (text: string) => void | Promise<void>;
  /** Called with each stderr chunk as it is produced. A returned promise is awaited. */
  onStderr?: (text: string) => void | Promise<void>;
  /** Called with each rich result (figures, `display()`, the last expression's value). */
  onResult?: (result: Result) => void | Promise<void>;
  /** Called with the uncaught exception, if any. It is also on `Execution.error`; it is not thrown. */
  onError?: (error: ExecErrorInfo) => void | Promise<void>;
}

/** `runCode({ code, ... })`: the code inside the options. */
export interface RunCodeRequest extends RunCodeOptions {
  code: string;
}

/** `runCodeStream({ code, ... })`: the code inside the options. */
export interface ExecRequest extends ExecOptions {
  code: string;
}

/** An entry of a sandbox's filesystem. */
export interface FileStat {
  name: string;
  /** Absolute path inside the sandbox. */
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  /** Size in bytes. */
  size: number;
  /** Unix permission bits. */
  mode: number;
  /** Modification time, in seconds since the epoch. */
  mtime: number;
}

/**
 * What `upload` accepts. Strings are written as UTF-8; byte arrays are sent as is; streams and async
 * iterables are streamed as the request body chunk by chunk, never held in memory as a whole.
 */
export type UploadData =
  | string
  | Uint8Array
  | Readable
  | WebReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>;

/** Answer of an upload: where the file landed and how many bytes it has. */
export interface UploadResult {
  path: string;
  size: number;
}

/** Options of file transfers and file operations. */
export interface FileOptions {
  /** Aborts the call; the promise (or stream) fails with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Client-side bound: for transfers, on connecting and on waiting for the answer's headers (the body
   * itself may stream for as long as it takes); for the other calls, on the whole call.
   * @default the Client's `requestTimeoutMs`
   */
  requestTimeoutMs?: number;
}

/** Options of `files.remove`. */
export interface RemoveOptions extends FileOptions {
  /**
   * Remove a directory and everything under it.
   * @default false
   */
  recursive?: boolean;
}

/** Options of {@link Sandbox.diff}. */
export interface DiffOptions {
  /**
   * Compare only under these paths.
   * @default all paths (the server's choice)
   */
  paths?: string[];
  /**
   * Include a unified diff per modified text file in `content`.
   * @default false
   */
  content?: boolean;
  /**
   * Include the interpreter variables that differ in `vars`.
   * @default false
   */
  vars?: boolean;
}

/**
 * Answer of {@link Sandbox.diff}: the paths that differ between the two sandboxes (`content`,
 * `binary` and `too_large` when `content: true` was asked), and the interpreter variables that
 * differ (`vars`, when `vars: true` was asked), as the server reports them.
 */
export type DiffResult = DiffAnswer;
export type { VarSummary, VarsDiff };

/** Options of {@link Sandbox.mergeInto}. */
export interface MergeOptions {
  /**
   * Copy only these paths from the winner and keep this sandbox's interpreter; the winner stays alive.
   * @default the whole state is swapped and the winner retired
   */
  paths?: string[];
}

/**
 * A template made from a live sandbox ({@link Sandbox.saveTemplate}): `Sandbox.create({ template: name })`
 * then starts with that sandbox's files and, where `carries.interpreter`, its interpreter's state.
 */
export interface SavedTemplate {
  name: string;
  kind: 'directory';
  description: string;
  /** The sandbox it was made from. */
  fromSandbox: string;
  /** Bytes of the files it adds to its image. */
  sizeBytes: number;
  builtAt: Date;
  /** Runtimes that can start it. */
  runtimes: string[];
  /** What a sandbox started from it has of the original. */
  carries: { files: boolean; interpreter: boolean };
}

/** @internal The wire form of {@link SavedTemplate}. */
export interface WireSavedTemplate {
  name: string; kind: 'directory'; description: string; from_sandbox: string; size_bytes: number; built_at: string; runtimes: string[];
  carries: { files: boolean; interpreter: boolean };
}

/** @internal Converts the wire form of a saved template. */
export function toSavedTemplate(w: WireSavedTemplate): SavedTemplate {
  return {
    name: w.name, kind: w.kind, description: w.description, fromSandbox: w.from_sandbox, sizeBytes: w.size_bytes,
    builtAt: new Date(w.built_at), runtimes: w.runtimes, carries: w.carries,
  };
}

/** One template of `GET /v1/templates` ({@link Sandbox.listTemplates}). */
export interface TemplateInfo {
  name: string;
  kind: 'base' | 'builtin' | 'recipe' | 'directory';
  description?: string;
  /** Whether a sandbox can start from it now. */
  built: boolean;
  sizeBytes: number | null;
  runtimes: string[];
  /** Its warm pool across runtimes and egress settings; null when it has none. */
  pool: { ready: number; target: number } | null;
}

/** Counters of one warm pool: sandboxes ready to hand out, the target, those booting, hits and misses. */
export interface PoolStats {
  template: string;
  ready: number;
  target: number;
  starting: number;
  hits: number;
  misses: number;
}

/** Answer of `GET /v1/capacity`: warm pool and sandbox counters (servers may add more fields). */
export interface Capacity {
  /** The default template's pool; null when the server keeps no pool. */
  pool: PoolStats | null;
  sandboxes: { active: number; max: number } & Record<string, number>;
  /** The runtime the server uses: `ns` or `vm`. */
  runtime: string;
}

/**
 * @internal The wire (snake_case) form of {@link SandboxInfo}: the protocol's, with the fields older
 * servers leave out optional.
 */
export type WireSandboxInfo = Omit<ProtocolSandboxInfo, 'limits' | 'end_reason'> & Partial<Pick<ProtocolSandboxInfo, 'limits' | 'end_reason'>>;

/** @internal A checkpoint as the server sends it. */
export interface WireCheckpoint {
  id: string; sandbox: string; name: string | null; kind: 'manual' | 'history'; created_at: string; before_code: string | null;
}

/** @internal Converts the wire form of a checkpoint. */
export function toCheckpointInfo(w: WireCheckpoint): CheckpointInfo {
  return { id: w.id, sandbox: w.sandbox, name: w.name, kind: w.kind, createdAt: w.created_at, beforeCode: w.before_code };
}

/** @internal Converts the wire form of a sandbox record. */
export function toSandboxInfo(w: WireSandboxInfo): SandboxInfo {
  return {
    id: w.id,
    state: w.state,
    template: w.template,
    runtime: w.runtime,
    egress: w.egress,
    persistent: w.persistent,
    parent: w.parent ?? null,
    children: w.children ?? [],
    createdAt: new Date(w.created_at),
    lastActiveAt: new Date(w.last_active_at),
    idleTimeoutSeconds: w.idle_timeout_seconds,
    limits: {
      cpus: w.limits?.cpus ?? 0, memoryMb: w.limits?.memory_mb ?? 0, diskMb: w.limits?.disk_mb ?? 0, processes: w.limits?.processes ?? 0,
    },
    metadata: w.metadata ?? {},
    endReason: w.end_reason ?? null,
  };
}
