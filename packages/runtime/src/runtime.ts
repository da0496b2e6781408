/**
 * The runtime interface: how the server gets an isolated Linux environment with an agent inside.
 * Runtimes declare what they can do (capabilities) rather than throwing when asked; the sandbox
 * manager and the API never look past this interface.
 */
import type { EgressSetting, FileDiff, VarInfo } from '@podflare/protocol';
import type { AgentClient } from './agent-client.js';
import type { RuntimeName } from './names.js';
export type { FileDiff };

export interface RuntimeCapabilities {
  /** Copy-on-write fork of a live sandbox. */
  fork: boolean;
  /** Freeze to disk and resume. */
  freeze: boolean;
  /** Outbound network when asked for (egress: true). */
  egress: boolean;
  /** Outbound network through the host's policy proxy (egress: {allow: [...]}). */
  egressPolicy: boolean;
  /** Live sandboxes can outlive the server (close with keepSandboxes) and be adopted by the next one. */
  outlivesServer?: boolean;
  /** Enforces each sandbox's CPU, memory and process limits (`setLimits`, `limitCounters`). */
  limits: boolean;
  /**
   * Pool sandboxes may be forks of a pre-warmed zygote (`fork` with `freshFiles`), cheap enough to
   * refill a pool with. @default false
   */
  zygote?: boolean;
  /** Starts templates other than `default` (their image layers over the base). @default false */
  templates?: boolean;
}

export interface SandboxSpec {
  /** The API id (sbx_…); also names the sandbox's directories. */
  id: string;
  template: string;
  /** true: user-mode networking; false: none; {allow}: only through the host's policy proxy. */
  egress: EgressSetting;
  hostname: string;
  /**
   * Start at low CPU priority (raised back once ready): warm-pool refills then never slow down
   * the execs of sandboxes in use on a small host.
   */
  background?: boolean;
  /** Extra environment for the agent (and so the interpreter). */
  env?: Record<string, string>;
  limits: SandboxLimits;
}

/** Resource limits of one sandbox (cgroups; disk: the size of its own layer). */
export interface SandboxLimits {
  cpus: number;
  memoryBytes: number;
  diskBytes: number;
  /** Processes and threads. */
  pids: number;
}

/** How often a sandbox ran into its limits so far (monotonic). */
export interface LimitCounters {
  oomKills: number;
  pidsRefused: number;
}

export interface RuntimeSandbox {
  readonly id: string;
  /** The sandbox's agent: exec, files, fork, variables. */
  readonly channel: AgentClient;
  /** Resolves once, when the sandbox has died for any reason (destroyed, crashed, killed). */
  readonly exited: Promise<{ reason: string }>;
  /** Kills every process of the sandbox and removes its files; safe to call more than once. */
  destroy(): Promise<void>;
  /** Proportional set size of all the sandbox's processes, in bytes. */
  memoryPss(): Promise<number>;
  /** Changes the limits of a running sandbox (a pooled one gets the creator's). */
  setLimits?(limits: SandboxLimits): Promise<void>;
  /** Where set, exec and fork must wait for it (a fork child still joining its cgroups). */
  readonly ready?: Promise<void>;
  /** Limit hits so far, where the runtime enforces limits. */
  limitCounters?(): Promise<LimitCounters>;
  /** A socket connected to a port the sandbox listens on (its own loopback), where the runtime can (exposed ports). */
  connectPort?(port: number): Promise<import('node:net').Socket>;
}

export interface ReconcileReport<S extends RuntimeSandbox = RuntimeSandbox> {
  /** Sandboxes of the earlier server still working, now driven by this one. */
  adopted: S[];
  /** Ids of sandboxes found dead or unreachable, and cleaned up completely. */
  cleaned: string[];
}

export interface DiffOptions {
  /** Restrict to these absolute paths (and what is below them). */
  paths?: string[];
  /** Add unified diffs of text files. */
  content?: boolean;
}

/** How much of a sandbox's files a template made from it may hold. */
export interface TemplateLayerBounds {
  /** Bytes of regular files (sparse files at their full size). */
  maxBytes: number;
  /** Files, directories and links. */
  maxEntries: number;
}

/** How a fork is made. */
export interface ForkOptions {
  /**
   * The children's files start as a fresh sandbox's (the parent's image layers), not as the
   * parent's: for a zygote (server zygote.ts), whose own files are nobody's. Memory is the
   * parent's as with any fork. No fork layer is made, so nothing of the parent's disk is copied.
   */
  freshFiles?: boolean;
  /**
   * The children's files are a fresh sandbox's of a template with these layers (topmost first,
   * base last; the runtime's agent layer goes on top): the zygote of a template made from the
   * parent (server manager/live-templates.ts) keeps the parent's interpreter over the template's
   * files. Implies `freshFiles`.
   */
  templateLayers?: string[];
}

/**
 * One runtime: starts, forks, freezes and diffs sandboxes of its own type `S`. Every method that
 * takes a sandbox is only ever given one this runtime returned (the manager keeps each sandbox with
 * its runtime), so a driver works on its own type with no downcast.
 */
export interface CloseOptions {
  /** Leave live sandboxes running for the next server (a restart or an upgrade). */
  keepSandboxes?: boolean;
}

/** A checkpoint a runtime holds inside its sandbox (Runtime.heldCheckpoints); opaque to the manager. */
export interface HeldCheckpoint {
  readonly ref: string;
}

/**
 * Checkpoints held inside the sandbox itself (namespace runtime): a frozen copy of the interpreter
 * in the sandbox's own namespaces and cgroup, and a frozen copy of its files in its own directory,
 * so that they count against the sandbox's memory and disk limits. A restore is in place: the
 * sandbox keeps its runtime object, namespaces, network and channel. Where absent, the manager
 * makes checkpoints out of fork children.
 */
export interface HeldCheckpoints<S extends RuntimeSandbox = RuntimeSandbox> {
  /** The sandbox's state as of now (idle, between calls). Rejects with `not_supported` for an agent too old to hold one. */
  take(sandbox: S): Promise<HeldCheckpoint>;
  /** The sandbox goes back to `cp`; with `keep`, `cp` stays restorable (`kept`: it did). */
  restore(sandbox: S, cp: HeldCheckpoint, keep: boolean): Promise<{ kept: boolean }>;
  /** Frees `cp` (its process and its files); idempotent, and fine once the sandbox has ended. */
  drop(sandbox: S, cp: HeldCheckpoint): Promise<void>;
  /** The sandbox's files (`b`) relative to `cp`'s. */
  diff(cp: HeldCheckpoint, sandbox: S, opts: DiffOptions): Promise<FileDiff>;
  /** `cp`'s interpreter variables. */
  vars(sandbox: S, cp: HeldCheckpoint): Promise<Record<string, VarInfo>>;
}

export interface Runtime<S extends RuntimeSandbox = RuntimeSandbox> {
  /** The name it is registered under (the API's `runtime` field). */
  readonly name: RuntimeName;
  readonly capabilities: RuntimeCapabilities;
  /**
   * At most this many warm sandboxes per pool key, where they are costly (a VM's QEMU); unset:
   * the server's pool size.
   */
  readonly warmPoolMax?: number;
  /**
   * Start-up after an earlier server on the same state directory ended (maybe killed): takes over
   * the sandboxes whose agents still answer and removes everything else it left (processes,
   * mounts, cgroups, layers, directories). `knownIds` are the sandboxes the store lists as live.
   */
  reconcile(knownIds: string[]): Promise<ReconcileReport<S>>;
  start(spec: SandboxSpec): Promise<S>;
  /**
   * Copy-on-write children of a live, idle sandbox: memory and files as of now (capability `fork`).
   * Resolves once every child's agent answers.
   */
  fork(parent: S, children: SandboxSpec[], opts?: ForkOptions): Promise<S[]>;
  /**
   * Freezes a sandbox into `dir` (memory and disk; capability `freeze`) and ends its processes.
   * What is in `dir` survives a server restart.
   */
  freeze?(sandbox: S, dir: string): Promise<void>;
  /** Resumes a sandbox frozen into `dir` under `spec` (its own id); `dir` may be removed after. */
  resume?(spec: SandboxSpec, dir: string): Promise<S>;
  /**
   * Gives a sandbox started with `egress: false` (a checkpoint, which never runs code) the
   * user-mode network `egress: true` gets, when it becomes a sandbox's live state (a restore).
   * Where absent, checkpoints are made with their sandbox's egress from the start.
   */
  attachNetwork?(sandbox: S): Promise<void>;
  /**
   * Copies what a live sandbox changed over its image (its own layers) into a new read-only layer
   * at `target` (a directory of the server's that does not exist yet), for a template made from
   * it (POST /v1/sandboxes/:id/template). Resolves with that template's lower layers, topmost
   * first (`target`, then the sandbox's image layers below its agent layer, the base last).
   * Throws SandboxError('insufficient_storage') past `bounds`. Where absent, the runtime cannot
   * make templates from live sandboxes.
   */
  saveTemplateLayer?(sandbox: S, target: string, bounds: TemplateLayerBounds): Promise<{ layers: string[]; bytes: number }>;
  /** Checkpoints held inside the sandbox (see HeldCheckpoints); where absent, checkpoints are fork children. */
  readonly heldCheckpoints?: HeldCheckpoints<S>;
  /** What differs between two sandboxes' filesystems: `b` relative to `a`. */
  diff(a: S, b: S, opts: DiffOptions): Promise<FileDiff>;
  /**
   * Destroys every sandbox this runtime started, or with `keepSandboxes` (where the runtime can)
   * lets go of them alive, for the next server on the state directory to adopt (`reconcile`).
   */
  close(opts?: CloseOptions): Promise<void>;
}

/**
 * What a starting server does with sandboxes of an earlier server whose agent protocol it cannot
 * speak (another major version): end them (`clean`, marked lost) or refuse to start.
 */
export type OnIncompatible = 'clean' | 'refuse';
