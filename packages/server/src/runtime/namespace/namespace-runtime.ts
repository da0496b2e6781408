/**
 * The namespace runtime: each sandbox is a bubblewrap sandbox whose root is an overlay of the
 * read-only image (agent layer over the Debian base) plus the sandbox's own upper layer.
 *
 * The overlay is mounted on the host only while the sandbox starts: bwrap binds it as the sandbox's
 * root, and once the agent says hello the host mount is detached. From then on the mount exists only
 * inside the sandbox's mount namespace and disappears with it, so a crash of the server cannot
 * leave mounts behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import net from 'node:net';
import { AgentChannel } from '../../agent-channel.js';
import type { Logger } from '../../log.js';
import { isAlive, processTree, pssOf, run } from '../../proc.js';
import type { Runtime, RuntimeSandbox, SandboxSpec } from '../runtime.js';
import { bwrapArgs, SANDBOX_PATH } from './bwrap-args.js';
import { assertMountablePath, sandboxDirs, sandboxesDir, type SandboxDirs } from './layout.js';
import { startSlirp, type Slirp } from './network.js';

export interface NamespaceRuntimeOptions {
  stateDir: string;
  /** Lower layers, topmost first: the agent layer, then the Debian base. */
  lowerDirs: string[];
  startTimeoutMs: number;
  interruptGraceMs: number;
  log: Logger;
}

const AGENT_COMMAND = ['/usr/bin/python3', '/opt/podflare/podflare_agent.py'];

export class NamespaceRuntime implements Runtime {
  readonly name = 'ns' as const;
  readonly capabilities = { fork: false, freeze: false, egress: true };
  private readonly live = new Map<string, NamespaceSandbox>();

  constructor(private readonly opts: NamespaceRuntimeOptions) {
    for (const d of [opts.stateDir, ...opts.lowerDirs]) assertMountablePath(d);
  }

  async cleanupOrphans(): Promise<void> {
    const root = sandboxesDir(this.opts.stateDir);
    await mkdir(root, { recursive: true });
    // Host mounts survive only if a server died between mounting and the agent's hello.
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
    for (const line of mountinfo.split('\n')) {
      const mountPoint = line.split(' ')[4];
      if (mountPoint && mountPoint.startsWith(root + '/')) await run('umount', ['-l', mountPoint]).catch(() => undefined);
    }
    for (const name of await readdir(root)) {
      if (this.live.has(name)) continue;
      await rm(`${root}/${name}`, { recursive: true, force: true });
    }
  }

  async start(spec: SandboxSpec): Promise<RuntimeSandbox> {
    const dirs = sandboxDirs(this.opts.stateDir, spec.id);
    await Promise.all([mkdir(dirs.upper, { recursive: true }), mkdir(dirs.work, { recursive: true }), mkdir(dirs.root, { recursive: true })]);
    await run('mount', ['-t', 'overlay', 'overlay', '-o',
      `lowerdir=${this.opts.lowerDirs.join(':')},upperdir=${dirs.upper},workdir=${dirs.work}`, dirs.root]);
    const sandbox = new NamespaceSandbox(spec, dirs, this.opts);
    this.live.set(spec.id, sandbox);
    void sandbox.exited.then(() => this.live.delete(spec.id));
    try {
      await sandbox.boot();
    } catch (err) {
      await sandbox.destroy();
      throw err;
    }
    return sandbox;
  }

  async close(): Promise<void> {
    await Promise.all([...this.live.values()].map((s) => s.destroy()));
  }
}

class NamespaceSandbox implements RuntimeSandbox {
  readonly channel: AgentChannel;
  readonly exited: Promise<{ reason: string }>;
  private readonly bwrap: ChildProcess;
  private slirp: Slirp | null = null;
  private innerPid: number | null = null;
  private destroying: Promise<void> | null = null;
  private hostMounted = true;
  private readonly log: Logger;

  constructor(private readonly spec: SandboxSpec, private readonly dirs: SandboxDirs, private readonly opts: NamespaceRuntimeOptions) {
    this.log = opts.log.child({ sandbox: spec.id });
    const env: Record<string, string> = {
      PATH: SANDBOX_PATH,
      HOME: '/root',
      LANG: 'C.UTF-8',
      PODFLARE_SANDBOX_ID: spec.id,
      PODFLARE_INTERRUPT_GRACE_MS: String(opts.interruptGraceMs),
      ...spec.env,
    };
    // stdio: 0 none, 1/2 the agent's own diagnostics, 3 the protocol channel (a socketpair), 4 bwrap's info.
    this.bwrap = spawn('bwrap', bwrapArgs({ root: dirs.root, hostname: spec.hostname, env, infoFd: 4, command: AGENT_COMMAND }), {
      stdio: ['ignore', 'pipe', 'pipe', 'pipe', 'pipe'],
    });
    this.channel = new AgentChannel(this.bwrap.stdio[3] as net.Socket);
    let diagnostics = '';
    const keep = (d: Buffer) => { diagnostics = (diagnostics + d.toString()).slice(-4000); };
    this.bwrap.stdout!.on('data', keep);
    this.bwrap.stderr!.on('data', keep);
    this.exited = new Promise((resolve) => {
      const done = (reason: string) => {
        this.channel.close(reason);
        resolve({ reason });
      };
      this.bwrap.once('error', (err) => done(`cannot start bwrap: ${err.message}`));
      this.bwrap.once('exit', (code, signal) => {
        const tail = diagnostics.trim().split('\n').slice(-5).join(' | ');
        done(signal ? `sandbox killed by ${signal}` : `sandbox exited with code ${code}${tail ? `: ${tail}` : ''}`);
      });
    });
    void this.exited.then(({ reason }) => {
      this.slirp?.stop();
      if (!this.destroying) this.log.warn('sandbox died', { reason });
    });
  }

  get id(): string {
    return this.spec.id;
  }

  async boot(): Promise<void> {
    const info = await readInfo(this.bwrap.stdio[4] as Readable, this.opts.startTimeoutMs);
    this.innerPid = info.childPid;
    const network = this.spec.egress ? startSlirp(info.childPid, this.opts.startTimeoutMs).then((s) => { this.slirp = s; }) : Promise.resolve();
    await Promise.all([this.channel.waitHello(this.opts.startTimeoutMs), network]);
    // bwrap has bound the overlay as the sandbox's root: the host's copy is no longer needed.
    await this.unmountHostCopy();
  }

  async memoryPss(): Promise<number> {
    if (this.bwrap.pid === undefined) return 0;
    const pids = await processTree(this.bwrap.pid);
    if (this.slirp?.process.pid) pids.push(this.slirp.process.pid);
    return pssOf(pids);
  }

  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      // Killing the sandbox's PID 1 makes the kernel kill everything in its pid namespace.
      if (this.innerPid && isAlive(this.innerPid)) process.kill(this.innerPid, 'SIGKILL');
      if (this.bwrap.exitCode === null && this.bwrap.signalCode === null) this.bwrap.kill('SIGKILL');
      this.slirp?.stop();
      await this.exited;
      await this.unmountHostCopy();
      await rm(this.dirs.dir, { recursive: true, force: true });
    })();
    return this.destroying;
  }

  private async unmountHostCopy(): Promise<void> {
    if (!this.hostMounted) return;
    this.hostMounted = false;
    await run('umount', ['-l', this.dirs.root]).catch((err: Error) => this.log.warn('umount failed', { error: err.message }));
  }
}

/** Reads bwrap's `--info-fd` JSON, which names the sandbox's PID 1 as seen from the host. */
function readInfo(stream: Readable, timeoutMs: number): Promise<{ childPid: number }> {
  return new Promise((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => reject(new Error('bwrap did not report its child pid')), timeoutMs);
    const finish = () => {
      const m = /"child-pid":\s*(\d+)/.exec(text);
      clearTimeout(timer);
      if (m) resolve({ childPid: Number(m[1]) });
      else reject(new Error('bwrap exited before starting the sandbox'));
    };
    stream.on('data', (d: Buffer) => {
      text += d.toString();
      if (/"child-pid":\s*\d+/.test(text) && text.includes('}')) {
        stream.removeAllListeners('end');
        finish();
      }
    });
    stream.once('end', finish);
  });
}
