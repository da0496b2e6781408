/**
 * A toy third runtime, for tests of the runtime boundary: each sandbox is the Python agent run as
 * a plain host process (as `nobody`) in a directory of its own below the state directory. No
 * isolation beyond the uid, so it declares no fork, freeze, egress or limits; what it does offer
 * (exec, files, diff of its directory, destroy) it must do as every driver does — the conformance
 * suite (test/helpers/conformance.ts) checks that. It plugs in with one registry line:
 * `builtinRuntimes().with('host', hostProcessDriver)`, and nothing outside this folder changes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chown, mkdir, readFile, rm } from 'node:fs/promises';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import type { Socket } from 'node:net';
import path from 'node:path';
import { AgentChannel, type DriverContext, type ServerDriver } from '@podflare/server';
import type { DiffOptions, FileDiff, ReconcileReport, Runtime, RuntimeName, RuntimeSandbox, SandboxSpec } from '@podflare/runtime';
import { diffTrees } from './tree-diff.js';

/** The host's `nobody`: the agent runs as it, never as root. */
const NOBODY = 65_534;
/** How long an agent whose channel closed may take to end its own children and exit. */
const EXIT_GRACE_MS = 5_000;

/** Processes running as nobody whose environment holds `entry` (the toy has no better boundary). */
function processesCarrying(entry: string): number[] {
  const found: number[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      if (statSync(`/proc/${pid}`).uid === NOBODY && readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(entry)) found.push(Number(pid));
    } catch { /* gone */ }
  }
  return found;
}

class HostProcessSandbox implements RuntimeSandbox {
  readonly channel: AgentChannel;
  readonly exited: Promise<{ reason: string }>;
  private destroying: Promise<void> | null = null;

  constructor(readonly id: string, readonly dir: string, private readonly agent: ChildProcess, private readonly onGone: (s: HostProcessSandbox) => void) {
    this.channel = new AgentChannel(agent.stdio[3] as Socket);
    this.exited = new Promise((resolve) => {
      agent.once('exit', (code, signal) => resolve({ reason: signal ? `the agent was killed by ${signal}` : `the agent exited (${code})` }));
    });
    // Killed from outside: what is left goes too.
    void this.exited.then(() => this.destroy());
  }

  async memoryPss(): Promise<number> {
    const rollup = await readFile(`/proc/${this.agent.pid}/smaps_rollup`, 'utf8').catch(() => '');
    return Number(/^Pss:\s+(\d+) kB/m.exec(rollup)?.[1] ?? 0) * 1024;
  }

  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      // The agent ends its interpreter and bash process groups when its channel closes; the
      // process group of its own (detached) goes after a grace, whatever it was doing.
      this.channel.close('destroyed');
      const gone = await Promise.race([this.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), EXIT_GRACE_MS))]);
      if (!gone) {
        try { process.kill(-this.agent.pid!, 'SIGKILL'); } catch { /* gone */ }
        await this.exited;
      }
      // What its code started in sessions of their own: no cgroup here, but they carry its id.
      for (const pid of processesCarrying(`PODFLARE_SANDBOX_ID=${this.id}`)) {
        try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      }
      await rm(this.dir, { recursive: true, force: true });
      this.onGone(this);
    })();
    return this.destroying;
  }
}

class HostProcessRuntime implements Runtime<HostProcessSandbox> {
  readonly capabilities = { fork: false, freeze: false, egress: false, egressPolicy: false, limits: false };
  private readonly live = new Map<string, HostProcessSandbox>();

  constructor(readonly name: RuntimeName, private readonly ctx: DriverContext) {}

  private get root(): string {
    return path.join(this.ctx.settings.stateDir, 'host-process');
  }

  async reconcile(): Promise<ReconcileReport<HostProcessSandbox>> {
    await rm(this.root, { recursive: true, force: true });
    return { adopted: [], cleaned: [] };
  }

  async start(spec: SandboxSpec): Promise<HostProcessSandbox> {
    const dir = path.join(this.root, spec.id);
    await mkdir(this.root, { recursive: true, mode: 0o711 }); // nobody passes through to its own
    await mkdir(dir, { mode: 0o700 });
    await chown(dir, NOBODY, NOBODY);
    const agent = spawn('python3', [path.join(this.ctx.settings.agentDir, 'podflare_agent.py'), `--sandbox=${spec.id}`], {
      cwd: dir,
      env: {
        PATH: '/usr/local/bin:/usr/bin:/bin', LANG: 'C.UTF-8', HOME: dir, PODFLARE_AGENT_HOME: dir,
        PODFLARE_SANDBOX_ID: spec.id, PODFLARE_INTERRUPT_GRACE_MS: String(this.ctx.settings.interruptGraceMs), ...spec.env,
      },
      // 3: the channel (a socketpair); the agent's own diagnostics on 1 and 2 are drained.
      stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
      uid: NOBODY,
      gid: NOBODY,
      detached: true,
    });
    agent.stdout!.resume();
    agent.stderr!.resume();
    const sandbox = new HostProcessSandbox(spec.id, dir, agent, (s) => this.live.delete(s.id));
    this.live.set(spec.id, sandbox);
    try {
      await sandbox.channel.waitHello(this.ctx.settings.startTimeoutMs);
      return sandbox;
    } catch (err) {
      await sandbox.destroy();
      throw err;
    }
  }

  fork(): Promise<HostProcessSandbox[]> {
    return Promise.reject(new Error('the host-process runtime cannot fork'));
  }

  /** Paths are `b`'s relative to `a`'s directory, shown under `a`'s (its agent's home). */
  diff(a: HostProcessSandbox, b: HostProcessSandbox, opts: DiffOptions): Promise<FileDiff> {
    return diffTrees(a.dir, b.dir, opts);
  }

  async close(): Promise<void> {
    await Promise.all([...this.live.values()].map((s) => s.destroy()));
  }
}

export const hostProcessDriver: ServerDriver = {
  async detect() {
    return existsSync('/usr/bin/python3') ? { usable: true } : { usable: false, reason: 'needs /usr/bin/python3' };
  },
  async create(ctx, name) {
    return { runtime: new HostProcessRuntime(name, ctx) };
  },
};
