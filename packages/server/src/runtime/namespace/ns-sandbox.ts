/**
 * A live namespace sandbox. Two kinds share this class's bookkeeping:
 * - a root sandbox, started by bubblewrap (its agent is PID 1 of the sandbox, `--as-pid-1`);
 * - a forked sandbox, whose PID 1 is a fork of its parent's interpreter that entered namespaces
 *   of its own (see agent/podflare_fork.py).
 *
 * A forked sandbox's pid namespace is nested inside its parent's, so a parent must not take its
 * namespace down while children live ("deleting the parent does not kill its children"). A
 * destroyed sandbox with live children becomes a husk: every process of its own except PID 1 is
 * killed — those in pid namespaces its code made below its own included (`unshare -fp`) — and its
 * channel closed; its PID 1 (the agent) then only reaps, and the husk is finished off when its
 * last child ends. Its own processes are those in its cgroup (each fork child has a group of its
 * own); without cgroups, its process tree less its children's trees.
 */
import { readFileSync } from 'node:fs';
import { readFile, readlink, rm } from 'node:fs/promises';
import os from 'node:os';
import { AgentChannel } from '../../agent-channel.js';
import { SandboxError } from '@podflare/runtime';
import type { Logger } from '../../log.js';
import { isAlive, processTree, pssOf } from '../../proc.js';
import type { SandboxCgroup } from '../shared/cgroups.js';
import type { LimitCounters, RuntimeSandbox, SandboxLimits, SandboxSpec } from '../runtime.js';
import type { SandboxDirs } from './layout.js';
import { PortConnector } from './port-connector.js';
import type { Slirp } from '../shared/slirp.js';
import { killIfStill, waitProcessGone } from './holder.js';

/** A sandbox's holder: its pid, and its control socket (which its command line names). */
export interface HolderRef {
  pid: number;
  socket: string;
  /** false: an earlier build's holder, which cannot be asked to watch a server (SIGUSR1 would kill it). */
  watchable?: boolean;
}

export interface SandboxHooks {
  /** Sets the most the sandbox's directory may hold (where disk limits are enforced). */
  setDiskLimit(dir: string, bytes: number): Promise<void>;
  /** Removes the sandbox's directory (its processes are gone; nothing is mounted from it). */
  removeDir(dirs: SandboxDirs): Promise<void>;
  /** Called once the sandbox is finally gone (processes dead, directories removed). */
  onFinalized(sandbox: NsSandbox): void;
  /** A sandbox became a husk (its record must say so: the next server does not drive it). */
  onHusk?(sandbox: NsSandbox): void;
  /** Why a sandbox ended, from its holder's log (bwrap's last words). */
  diagnostics?(sandbox: NsSandbox): string;
  log: Logger;
}

export abstract class NsSandbox implements RuntimeSandbox {
  readonly channel: AgentChannel;
  readonly exited: Promise<{ reason: string }>;
  protected resolveExited!: (v: { reason: string }) => void;
  /** Host pid of the sandbox's PID 1 (its agent): any process in its namespaces. */
  initPid: number | null = null;
  slirp: Slirp | null = null;
  /** Its cgroups (limits), where the host has them. */
  cgroup: SandboxCgroup | null = null;
  /** Set while a fork child is still getting its network and being moved into its own cgroups. */
  ready?: Promise<void>;
  /** Its processes are gone (or going): nothing may be attached to it any more. */
  ended = false;
  readonly children = new Set<NsSandbox>();
  /** Set once the spawn tmpfs is mounted in this sandbox (fork points live there). */
  spawnAreaReady = false;
  private husk = false;
  /** Its holder: the process that keeps it while servers come and go (holder.ts). */
  holder: HolderRef | null = null;
  /** Let go of (the server stops and keeps its sandboxes): its channel closing is not its end. */
  protected detached = false;
  /** Dials the sandbox's ports for exposed-port requests (port-connector.ts); started on first use. */
  private portConnector: PortConnector | null = null;
  private finalizing: Promise<void> | null = null;
  protected readonly log: Logger;

  constructor(
    readonly spec: SandboxSpec,
    readonly dirs: SandboxDirs,
    /** Lower layers, topmost first (fork layers, then the image's agent and base); a restore replaces them. */
    public lowers: string[],
    readonly parent: NsSandbox | null,
    readonly depth: number,
    socket: import('node:stream').Duplex,
    protected readonly hooks: SandboxHooks,
  ) {
    this.log = hooks.log.child({ sandbox: spec.id });
    this.channel = new AgentChannel(socket);
    this.exited = new Promise((resolve) => { this.resolveExited = resolve; });
    void this.exited.then(() => {
      this.ended = true;
      this.slirp?.stop();
      this.portConnector?.close();
    });
    parent?.children.add(this);
  }

  get id(): string {
    return this.spec.id;
  }

  /** The layer stack of this sandbox's root, topmost first. */
  get stack(): string[] {
    return [this.dirs.upper, ...this.lowers];
  }

  /** A socket connected to 127.0.0.1:port inside this sandbox's network namespace. */
  connectPort(port: number): Promise<import('node:net').Socket> {
    if (this.ended || !this.initPid) return Promise.reject(new SandboxError('sandbox_gone', `sandbox ${this.id} is gone`));
    this.portConnector ??= new PortConnector(this.initPid);
    return this.portConnector.connect(port);
  }

  async memoryPss(): Promise<number> {
    if (!this.initPid) return 0;
    const ns = await pidNamespace(this.initPid);
    const pids: number[] = [];
    for (const pid of await processTree(this.initPid)) if ((await pidNamespace(pid)) === ns) pids.push(pid);
    if (this.slirp) pids.push(this.slirp.pid);
    return pssOf(pids);
  }

  async setLimits(limits: SandboxLimits): Promise<void> {
    await this.cgroup?.setLimits(limits);
    await this.hooks.setDiskLimit(this.dirs.dir, limits.diskBytes);
  }

  async limitCounters(): Promise<LimitCounters> {
    return this.cgroup ? this.cgroup.counters() : { oomKills: 0, pidsRefused: 0 };
  }

  destroy(): Promise<void> {
    if (this.children.size === 0) return this.finalize();
    if (!this.husk) {
      this.husk = true;
      this.hooks.onHusk?.(this);
      this.channel.close('destroyed');
      this.slirp?.stop();
      this.resolveExited({ reason: 'destroyed' });
      if (this.initPid) return this.killAllButInit(this.initPid);
    }
    return Promise.resolve();
  }

  get isHusk(): boolean {
    return this.husk;
  }

  /** Taken over from an earlier server as a husk: kept (for its children) but never driven. */
  adoptAsHusk(): void {
    this.husk = true;
    this.channel.close('destroyed');
    this.resolveExited({ reason: 'destroyed' });
  }

  /**
   * The server stops but the sandbox lives on under its holder, for the next server to adopt:
   * only our connection to the holder closes.
   */
  detach(): void {
    this.detached = true;
    this.channel.close('the server let go of the sandbox');
  }

  /** A husk's end: every process of this sandbox but its PID 1, and none of its children's. */
  private async killAllButInit(init: number): Promise<void> {
    // A child still being moved into its own cgroup would otherwise be killed as one of ours (and
    // a fork child of our own gets its group only once ready).
    await Promise.all([this, ...this.children].map((s) => s.ready?.catch(() => undefined)));
    const group = this.cgroup;
    const ours = group
      ? () => group.processes()
      : async () => {
        const theirs = new Set<number>();
        for (const c of this.children) if (c.initPid) for (const pid of await processTree(c.initPid)) theirs.add(pid);
        return (await processTree(init)).filter((pid) => !theirs.has(pid));
      };
    // Again until none is left: a process may fork while its siblings are being killed.
    for (let round = 0; round < 100; round++) {
      const doomed = (await ours().catch(() => [])).filter((pid) => pid !== init);
      if (doomed.length === 0) return;
      for (const pid of doomed) {
        try { process.kill(pid, 'SIGKILL'); } catch { /* ended meanwhile */ }
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    this.log.warn('processes of a deleted sandbox survived SIGKILL', { init });
  }

  /** A child of ours is gone: a husk with no children left can go too. */
  childGone(child: NsSandbox): void {
    this.children.delete(child);
    if (this.husk && this.children.size === 0) void this.finalize().catch((e: Error) => this.log.warn('sandbox teardown failed', { error: e.message }));
  }

  protected finalize(): Promise<void> {
    this.finalizing ??= (async () => {
      this.channel.close('destroyed');
      this.slirp?.stop();
      // A dying process frees its memory in its own time slices: at the lowest priority, a
      // teardown does not slow down the live sandboxes (or the fork that may be running).
      if (this.initPid) {
        for (const pid of await processTree(this.initPid)) {
          try { os.setPriority(pid, 19); } catch { /* ended meanwhile */ }
        }
      }
      await this.killAll();
      await this.ready; // a fork child closed at once may still be getting its cgroups
      await this.cgroup?.remove().catch((e: Error) => this.log.warn('cgroup removal failed', { error: e.message }));
      this.resolveExited({ reason: 'destroyed' });
      // Its files failing to go (a stop closed the host helper meanwhile) must not keep it alive
      // in the books: the next server's reconcile removes what is left.
      await this.hooks.removeDir(this.dirs).catch((e: Error) => this.log.warn('could not remove the sandbox\'s directory', { error: e.message }));
      this.parent?.childGone(this);
      this.hooks.onFinalized(this);
    })();
    return this.finalizing;
  }

  /** Ends every process of the sandbox (its namespace and everything nested in it). */
  protected abstract killAll(): Promise<void>;
}

/** A sandbox started by bubblewrap, under its holder (holder.ts). */
export class RootSandbox extends NsSandbox {
  constructor(spec: SandboxSpec, dirs: SandboxDirs, lowers: string[], socket: import('node:net').Socket, holder: HolderRef, hooks: SandboxHooks) {
    super(spec, dirs, lowers, null, 0, socket, hooks);
    this.holder = holder;
    // The holder ends (and so closes our connection) when bwrap does: the sandbox is over.
    this.channel.once('close', (reason: string) => {
      if (this.detached || this.isHusk) return; // we let go of it; a husk ends with its last child
      const tail = hooks.diagnostics?.(this) ?? '';
      this.resolveExited({ reason: reason === 'channel closed' ? `sandbox exited${tail ? `: ${tail}` : ''}` : reason });
      void this.finalize().catch((e: Error) => this.log.warn('sandbox teardown failed', { error: e.message }));
    });
  }

  protected async killAll(): Promise<void> {
    await killHeld(this);
  }

  /** Raises (or lowers) the CPU priority of every process of the sandbox. */
  async setPriority(nice: number): Promise<void> {
    if (!this.initPid) return;
    const pids = await processTree(this.initPid);
    if (this.slirp) pids.push(this.slirp.pid);
    for (const pid of pids) {
      try { os.setPriority(pid, nice); } catch { /* ended meanwhile */ }
    }
  }
}

/** Kills a held sandbox's PID 1 (its whole pid namespace goes with it) and its holder, and waits for both. */
async function killHeld(s: NsSandbox): Promise<void> {
  const pid = s.initPid;
  if (pid && isAlive(pid)) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* ended meanwhile */ }
  }
  if (s.holder) {
    killIfStill(s.holder.pid, s.holder.socket);
    await waitProcessGone(s.holder.pid, 10_000);
  }
  // A fork child's PID 1 is reaped by its parent namespace's PID 1: wait until it is really gone.
  if (pid) await waitProcessGone(pid, 2_000);
}

/** A sandbox made by fork: PID 1 is a fork of the parent's interpreter (now its agent). */
export class ForkedSandbox extends NsSandbox {
  constructor(spec: SandboxSpec, dirs: SandboxDirs, lowers: string[], parent: NsSandbox, socket: import('node:net').Socket, hooks: SandboxHooks) {
    super(spec, dirs, lowers, parent, parent.depth + 1, socket, hooks);
    // No process handle to watch: the agent's channel closing is how its death shows.
    this.channel.once('close', (reason: string) => {
      if (this.detached) return;
      this.resolveExited({ reason: `sandbox agent gone (${reason})` });
    });
  }

  protected async killAll(): Promise<void> {
    await killHeld(this);
  }
}

export async function pidNamespace(pid: number): Promise<string | null> {
  try {
    return await readlink(`/proc/${pid}/ns/pid`);
  } catch {
    return null;
  }
}

/** Now, in the clock of /proc/<pid>/stat start times (ticks since boot; USER_HZ is 100 on Linux). */
export function bootTicksNow(): number {
  return Math.floor(Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * 100);
}

/** Where fork children are in their parent's process tree: PID 1 (supervisor) → worker → child. */
const FORK_CHILD_GENERATION = 2;

/**
 * Host pids of fork children, from their pids in the parent's namespace as the parent's agent names
 * them. The agent is untrusted, so only pids the server can prove are children of this fork are
 * returned: each is PID 1 of a pid namespace one level below the parent's (NSpid in
 * /proc/<pid>/status lists a process's pid at every level) inside the parent's process tree, was
 * started no earlier than the fork request (`notBefore`, in boot ticks), and is not the PID 1 of a
 * sandbox the server already knows (`known`: a sibling from an earlier fork). The agent's worker
 * (a child of the parent's PID 1) forks them, so only two generations below the parent's PID 1
 * are looked at: a zygote's whole tree holds every sandbox forked from it. A named pid that is alive in the parent's namespace but not proven maps to
 * null; a named pid found nowhere (ended) is absent.
 */
export async function hostPidsOfForkChildren(
  parentInit: number, nsPids: number[], proof: { notBefore: number; known: ReadonlySet<number> },
): Promise<Map<number, number | null>> {
  const levelsOf = (pid: number) => {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8'); // procfs: microseconds, on the fork path
    const line = /^NSpid:\s+(.+)$/m.exec(status);
    return line ? line[1]!.trim().split(/\s+/).map(Number) : [];
  };
  const startedAt = (pid: number) => {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
  };
  const depth = levelsOf(parentInit).length;
  const wanted = new Set(nsPids);
  const found = new Map<number, number | null>();
  for (const pid of await processTree(parentInit, FORK_CHILD_GENERATION)) {
    try {
      const levels = levelsOf(pid);
      const inParent = levels[depth - 1]!;
      if (!wanted.has(inParent)) continue;
      const proven = !proof.known.has(pid) && levels.length === depth + 1 && levels[depth] === 1 && startedAt(pid) >= proof.notBefore;
      found.set(inParent, proven ? pid : null);
    } catch { /* ended meanwhile */ }
  }
  return found;
}
