/**
 * Resource limits of a sandbox through cgroups: memory (no swap around it), processes and CPU.
 * Works on cgroup v1 (one hierarchy per controller, as on Debian hosts booted that way) and on v2
 * (the unified hierarchy). Each sandbox gets `podflare/<id>` under every controller; its PID 1 is
 * moved there before it runs anything, and everything it starts inherits the group. Fork children
 * get groups of their own (their memory is accounted from the fork on).
 *
 * Counters of limit hits (OOM kills, refused forks) let the server say which limit an exec ran
 * into.
 */
import { existsSync, readFileSync } from 'node:fs';
import { appendFile, mkdir, readdir, stat, readFile, rmdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { LimitCounters, SandboxLimits } from '@podflare/runtime';

type Limits = Pick<SandboxLimits, 'cpus' | 'memoryBytes' | 'pids'>;

const ROOT = '/sys/fs/cgroup';
const GROUP = 'podflare';
const CPU_PERIOD_US = 100_000;

interface Hierarchy {
  version: 1 | 2;
  /** Directory of the podflare group per controller (v2: one, shared). */
  memory: string;
  pids: string;
  cpu: string;
}

/**
 * Finds the cgroup hierarchy in use; null where there is none. `scope` names this server's own
 * group under `podflare/` (several servers on one host never touch each other's sandboxes).
 */
export async function detectCgroups(scope: string): Promise<Cgroups | null> {
  const v2 = existsSync(path.join(ROOT, 'cgroup.controllers'));
  if (v2) {
    const available = (await readFile(path.join(ROOT, 'cgroup.controllers'), 'utf8')).split(/\s+/);
    if (!['memory', 'pids', 'cpu'].every((c) => available.includes(c))) return null;
    const dir = path.join(ROOT, GROUP, scope);
    return new Cgroups({ version: 2, memory: dir, pids: dir, cpu: dir });
  }
  const controller = (name: string) => {
    const dir = path.join(ROOT, name);
    return existsSync(path.join(dir, 'cgroup.procs')) ? path.join(dir, GROUP, scope) : null;
  };
  const memory = controller('memory');
  const pids = controller('pids');
  const cpu = controller('cpu') ?? controller('cpu,cpuacct');
  if (!memory || !pids || !cpu) return null;
  return new Cgroups({ version: 1, memory, pids, cpu });
}

export class Cgroups {
  private prepared: Promise<void> | null = null;

  constructor(private readonly h: Hierarchy) {}

  get version(): 1 | 2 {
    return this.h.version;
  }

  /** Creates the sandbox's groups with these limits. */
  async create(id: string, limits: Limits): Promise<SandboxCgroup> {
    await this.prepare();
    const group = new SandboxCgroup(this.h, id);
    await group.make();
    try {
      await group.setLimits(limits);
    } catch (err) {
      await group.remove();
      throw err;
    }
    return group;
  }

  /** The groups a sandbox already has (made by an earlier server: the sandbox was adopted). */
  existing(id: string): SandboxCgroup {
    return new SandboxCgroup(this.h, id);
  }

  /** Removes the groups of sandboxes that are gone (after a crash), killing what is left in them. */
  async cleanupOrphans(live: (id: string) => boolean): Promise<void> {
    for (const dir of new Set([this.h.memory, this.h.pids, this.h.cpu])) {
      let names: string[] = [];
      try {
        names = await readdir(dir, { withFileTypes: true }).then((es) => es.filter((e) => e.isDirectory()).map((e) => e.name));
      } catch {
        continue;
      }
      for (const name of names) if (!live(name)) await removeGroup(path.join(dir, name));
    }
    await this.removeDeadScopes();
  }

  /**
   * Groups other servers left (a test's temporary state directory never comes back): a sandbox's
   * group always holds its agent while it lives, so one that has been empty for a minute is dead,
   * and so is a scope with nothing left in it.
   */
  private async removeDeadScopes(): Promise<void> {
    const own = new Set([this.h.memory, this.h.pids, this.h.cpu]);
    for (const parent of new Set([...own].map((d) => path.dirname(d)))) {
      let scopes: string[] = [];
      try {
        scopes = (await readdir(parent, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => path.join(parent, e.name));
      } catch {
        continue;
      }
      for (const scope of scopes) {
        if (own.has(scope)) continue;
        const groups = (await readdir(scope, { withFileTypes: true }).catch(() => [])).filter((e) => e.isDirectory());
        for (const g of groups) {
          const dir = path.join(scope, g.name);
          try {
            const idle = Date.now() - (await stat(dir)).mtimeMs > 60_000;
            if (idle && (await readFile(path.join(dir, 'cgroup.procs'), 'utf8')).trim() === '') await rmdir(dir);
          } catch { /* busy or gone */ }
        }
        await rmdir(scope).catch(() => undefined); // only once empty
      }
    }
  }

  /** Removes this server's (empty) group once every sandbox is gone. */
  async close(): Promise<void> {
    for (const dir of new Set([this.h.memory, this.h.pids, this.h.cpu])) await rmdir(dir).catch(() => undefined);
  }

  private prepare(): Promise<void> {
    this.prepared ??= (async () => {
      for (const dir of new Set([this.h.memory, this.h.pids, this.h.cpu])) await mkdir(dir, { recursive: true });
      if (this.h.version === 2) {
        // Controllers must be enabled on the way down for the sandboxes' groups to have them.
        for (const dir of [ROOT, path.dirname(this.h.memory), this.h.memory]) {
          await appendFile(path.join(dir, 'cgroup.subtree_control'), '+memory +pids +cpu').catch((err: Error) => {
            if (dir === this.h.memory) throw err;
          });
        }
      } else {
        // v1 memory: limits of children count within the parent's (the default on modern kernels).
        for (const dir of [path.dirname(this.h.memory), this.h.memory]) {
          await writeFile(path.join(dir, 'memory.use_hierarchy'), '1').catch(() => undefined);
        }
      }
    })();
    this.prepared.catch(() => { this.prepared = null; });
    return this.prepared;
  }
}

export class SandboxCgroup {
  private readonly dirs: { memory: string; pids: string; cpu: string };

  constructor(private readonly h: Hierarchy, readonly id: string) {
    this.dirs = { memory: path.join(h.memory, id), pids: path.join(h.pids, id), cpu: path.join(h.cpu, id) };
  }

  async make(): Promise<void> {
    for (const dir of this.unique()) await mkdir(dir, { recursive: true });
  }

  /**
   * Moves a process (and so everything it starts later) into the sandbox's groups. On v1 a write
   * moves that one process: one it started before stays where it was. The writes go together: a
   * move may wait for an RCU grace period, and concurrent ones share it.
   */
  async add(pid: number): Promise<void> {
    await Promise.all(this.unique().map((dir) => writeFile(path.join(dir, 'cgroup.procs'), String(pid))));
  }

  /**
   * Writes `pid` (a process already in the groups: the sandbox's PID 1) into its pids group
   * again, which moves nothing. Why: on v1 a move waits for an RCU grace period (~10 ms) unless
   * another move happened just before; a fork calls this as it starts, so that its children's
   * moves, milliseconds later, find the grace period already passed.
   */
  async warmMoves(pid: number): Promise<void> {
    if (this.h.version === 1) await writeFile(path.join(this.dirs.pids, 'cgroup.procs'), String(pid));
  }

  /**
   * Host pids of every process in the sandbox's group: all of its processes, in whatever pid
   * namespace they made below its own (a fork child's are in the child's own group).
   */
  async processes(): Promise<number[]> {
    const text = await readFile(path.join(this.dirs.pids, 'cgroup.procs'), 'utf8');
    return text.split('\n').filter(Boolean).map(Number);
  }

  async setLimits(l: Limits): Promise<void> {
    const quota = Math.max(1000, Math.round(l.cpus * CPU_PERIOD_US));
    if (this.h.version === 2) {
      await writeFile(path.join(this.dirs.memory, 'memory.max'), String(l.memoryBytes));
      await writeFile(path.join(this.dirs.memory, 'memory.swap.max'), '0').catch(() => undefined);
      await writeFile(path.join(this.dirs.pids, 'pids.max'), String(l.pids));
      await writeFile(path.join(this.dirs.cpu, 'cpu.max'), `${quota} ${CPU_PERIOD_US}`);
      return;
    }
    // v1: memory+swap must stay >= memory, so order the writes by direction of change.
    const mem = path.join(this.dirs.memory, 'memory.limit_in_bytes');
    const memsw = path.join(this.dirs.memory, 'memory.memsw.limit_in_bytes');
    const hasSwapAccounting = existsSync(memsw);
    const current = Number((await readFile(mem, 'utf8')).trim());
    if (hasSwapAccounting && l.memoryBytes > current) {
      await writeFile(memsw, String(l.memoryBytes));
      await writeFile(mem, String(l.memoryBytes));
    } else {
      await writeFile(mem, String(l.memoryBytes));
      if (hasSwapAccounting) await writeFile(memsw, String(l.memoryBytes));
    }
    await writeFile(path.join(this.dirs.pids, 'pids.max'), String(l.pids));
    await writeFile(path.join(this.dirs.cpu, 'cpu.cfs_period_us'), String(CPU_PERIOD_US));
    await writeFile(path.join(this.dirs.cpu, 'cpu.cfs_quota_us'), String(quota));
  }

  /**
   * Read after every exec, so read synchronously: two tiny kernel files cost microseconds, while
   * the thread pool's open/stat/read/close hops would add a good part of a millisecond.
   */
  counters(): LimitCounters {
    const field = (file: string, key: string) => {
      try {
        const m = new RegExp(`^${key}\\s+(\\d+)$`, 'm').exec(readFileSync(file, 'utf8'));
        return m ? Number(m[1]) : 0;
      } catch {
        return 0;
      }
    };
    const oomFile = this.h.version === 2 ? 'memory.events' : 'memory.oom_control';
    return {
      oomKills: field(path.join(this.dirs.memory, oomFile), 'oom_kill'),
      pidsRefused: field(path.join(this.dirs.pids, 'pids.events'), 'max'),
    };
  }

  /** Kills whatever is still in the groups and removes them. */
  async remove(): Promise<void> {
    for (const dir of this.unique()) await removeGroup(dir);
  }

  private unique(): string[] {
    return [...new Set([this.dirs.memory, this.dirs.pids, this.dirs.cpu])];
  }
}

/** rmdir of a cgroup succeeds only once it has no process: kill them and wait a little. */
async function removeGroup(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 100; attempt++) {
    let procs: number[];
    try {
      procs = (await readFile(path.join(dir, 'cgroup.procs'), 'utf8')).split('\n').filter(Boolean).map(Number);
    } catch {
      return; // gone already
    }
    for (const pid of procs) {
      try { process.kill(pid, 'SIGKILL'); } catch { /* ended meanwhile */ }
    }
    try {
      await rmdir(dir);
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  throw new Error(`cgroup ${dir} still busy after its processes were killed`);
}
