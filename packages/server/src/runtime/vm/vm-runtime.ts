/**
 * The microVM runtime: every sandbox is a QEMU `microvm` with its own kernel (Debian's cloud
 * kernel), the sandbox image as its root disk and the same Python agent as PID 1, reached over a
 * virtio-serial port.
 *
 * Booting takes seconds (under TCG), so it happens once per template: the template VM boots, its
 * agent starts the interpreter, then the VM is frozen — QMP `stop`, and a migration with
 * `x-ignore-shared` writes only the device state to a file, because its RAM already lives in a
 * memfd (`memory-backend-file,share=on,mem-path=/dev/fd/3`), sealed once its QEMU is gone (so it
 * never changes while clones map it: shared-ram.ts). Every sandbox is then a *clone*: a QEMU with
 * the same devices maps that RAM `share=off` (MAP_PRIVATE: copy-on-write, the template's
 * pages shared until written), loads the device state (`-incoming defer`, then `migrate-incoming`
 * from a unix socket the server writes the state into) and continues. The agent is told the time,
 * fresh entropy, its hostname and id right after, because every clone resumes with the template's
 * clock and RNG state.
 *
 * A fork point is a frozen point of the same kind, made from a running VM (see forkMemory): by
 * copy, the template's RAM and a state holding the parent's own pages and device state; or
 * by migration, its stream split by the server into fresh shared RAM (sealed) and the device state.
 *
 *   <stateDir>/vm/templates/<name>-<net|nonet>-<rand>/disk.qcow2  template disk (read-only once frozen)
 *   <stateDir>/vm/templates/<…>/{state,clone.qcow2}               device state, an empty overlay to copy
 *   memfd podflare-<statehash>-<pid>-t<rand>.ram                  template RAM (sealed; held by the spawner)
 *   memfd podflare-<statehash>-<pid>-p<point>.ram                 a fork point's RAM (sealed; let go once mapped)
 *   /dev/shm/podflare-<statehash>-<pid>-r<rand>.ram               a resumed VM's own RAM file
 *   <stateDir>/vm/layers/<point>.{qcow2,top.qcow2,sock}           fork layer, its children's empty overlay, stream socket
 *   <stateDir>/vm/points/<point>.dev                              a fork point's device state (QEMU writes it, the server reads it)
 *   <stateDir>/vm/<sandbox id>/{disk.qcow2,console.log,out.sock}  the VM's files (its directory is root's)
 *   <stateDir>/vm/<sandbox id>/run/{agent.sock,qmp.sock,in.sock}  QEMU's own sockets (the one directory it owns)
 *   <stateDir>/frozen/<sandbox id>/{state,disk.qcow2,vm.json}     a frozen VM (root's alone)
 *
 * Disks: the shared read-only ext4 root ← template overlay ← each sandbox's own qcow2 overlay.
 *
 * Identity: every QEMU runs as a uid of its own (vm-ids.ts), and who may read what, and how the
 * server (root) touches files a QEMU can reach, is in vm-files.ts (its threat model on top).
 */
import { createHash, randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { copyFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { ChannelClosedError, type AgentChannel } from '../../agent-channel.js';
import type { VmImagePaths } from '../../image/vm-image.js';
import type { Logger } from '../../log.js';
import { isAlive, pssOf, run } from '../../proc.js';
import {
  SandboxError, type CloseOptions, type DiffOptions, type FileDiff, type OnIncompatible, type ReconcileReport, type Runtime, type RuntimeName,
  type RuntimeSandbox, type SandboxSpec,
} from '@podflare/runtime';
import { AGENT_PROTOCOL, agentProtocolCompatible } from '@podflare/protocol';
import { killIfStill, waitProcessGone } from '../namespace/holder.js';
import { settleAdopted } from '../namespace/adopt.js';
import { IncompatibleSandboxesError } from '../namespace/namespace-runtime.js';
import { adoptedSlirp } from '../shared/slirp.js';
import {
  AdoptedQemu, HELD_VM_RECORD_VERSION, heldVmPaths, loadHeldVmRecords, prepareHeldVmDir, processStart, reconnectVm, removeHeldVmFiles,
  removeStrayHeldVmFiles, saveHeldVmRecord, watchQemu, type HeldVmRecord,
} from './vm-held.js';
import type { ProcessRef } from './vm-ids.js';
import { InFlight } from '../in-flight.js';
import type { Acceleration } from './qemu-args.js';
import { vmDiff } from './vm-diff.js';
import { ForkMemoryWorker } from './fork-memory.js';
import { deviceSections, forkSkeleton, type ForkSkeleton } from './fork-state.js';
import { OverlayMaker } from './overlay-maker.js';
import { incoming, migrateToFile, MIGRATION_CAPABILITIES, UNTHROTTLED, waitMigration, type StateSource } from './vm-migration.js';
import type { Qmp } from './qmp.js';
import type { Spawner } from '../shared/spawner.js';
import { consoleTail, kvmGroup, launchQemu, qemuPidsUnder, setPriorityAll, stopVm, waitExit, type QemuHost, type VmProcess } from './vm-process.js';
import { copyRegular, freshDir, handOver, privateFile, readRegular, rootDir, runAsVm, vmDir, writeNew, type Owner, type VmIdentity } from './vm-files.js';
import { VmIdPool } from './vm-ids.js';
import { SharedRam } from './shared-ram.js';

export interface VmRuntimeOptions {
  /** The name it is registered under (runtime/drivers.ts). */
  name: RuntimeName;
  stateDir: string;
  accel: Acceleration;
  /** The guest image; built on first use when this returns a promise that builds it. */
  image: () => Promise<VmImagePaths>;
  /** Guest RAM. */
  memoryMb?: number;
  /**
   * A fork copies the parent's own pages (those it wrote since it was cloned) into each child when
   * they are at most this much; above it, children share a fork point's RAM file (default: an
   * eighth of the RAM).
   */
  forkCopyLimitMb?: number;
  /** How long a template may take to boot to its agent's hello (TCG: seconds). */
  bootTimeoutMs?: number;
  /** How long a clone may take from QEMU start to the agent's answer after restore. */
  startTimeoutMs: number;
  /**
   * Host ids VMs run as (never root, apart from the namespace sandboxes'): the first is the group
   * of every VM, each QEMU gets one of the others of its own, each fork point one as its group.
   */
  ids: { base: number; count: number; lockDir?: string };
  /** Starts QEMU, slirp4netns and tools run as a VM's uid (the server's, shared with other runtimes). */
  spawner: Spawner;
  log: Logger;
  /**
   * VMs of an earlier server whose agent speaks another major protocol version: 'clean' (ended,
   * recorded lost) or 'refuse' (reconcile throws: the server does not start). @default 'clean'
   */
  onIncompatible?: OnIncompatible;
  /** How long an adopted VM's interrupted exec may take to end. @default 5000 */
  interruptGraceMs?: number;
  /**
   * VMs outlive a server that dies without a stop (`--on-stop keep`), for the next one to adopt;
   * otherwise they end with it, adopted ones included (a watcher kills them). @default false
   */
  outliveServer?: boolean;
}

const MB = 1024 * 1024;
const DEFAULT_MEMORY_MB = 512;
/** A VM's device state is tens of KB (the RAM is apart): a file much larger is not one. */
const MAX_DEVICE_STATE = 16 * MB;
/** A template's state: its device state and a few small ROM blocks (its RAM stays in the RAM file). */
const MAX_TEMPLATE_STATE = 64 * MB;
/** A frozen VM's state holds its whole RAM, with page headers and device state on top. */
const FROZEN_STATE_OVERHEAD = 64 * MB;
/** vm.json of a frozen VM. */
const MAX_FROZEN_META = 64 * 1024;

/** A fork point's memory: the shared RAM the children map, and the state they load. */
interface ForkMemory {
  ram: SharedRam;
  state: Promise<StateSource>;
  /** The fork failed before the parent continued: stop taking it. */
  abandon(): Promise<void>;
  /** Once every child has mapped the RAM file (or failed). */
  release(): Promise<void>;
}
/** The guest RAM block's name in migration streams (the id of qemu-args' memory backend). */
const RAM_BLOCK = 'mem';

interface Template {
  dir: string;
  disk: string;
  /** The state, read once: every clone gets it from memory. */
  stateData: StateSource;
  /** An empty overlay over `disk`, copied for each clone (cheaper than a qemu-img per clone). */
  cloneOverlay: string;
  /** Its RAM, sealed (shared-ram.ts); null for a resumed VM's (its RAM is its own file). */
  ram: SharedRam | null;
  image: VmImagePaths;
  network: boolean;
  /** Its state cut for forks by copy (fork-state.ts); null: this QEMU cannot save device state alone. */
  skeleton: ForkSkeleton | null;
}

export class VmSandbox implements RuntimeSandbox {
  readonly exited: Promise<{ reason: string }>;
  private resolveExited!: (v: { reason: string }) => void;
  private destroying: Promise<void> | null = null;
  readonly channel: AgentChannel;
  /** A RAM file of this VM alone (a resumed VM), removed with it. */
  ownRamFile: string | null = null;
  /** The sandbox it was forked from (its record names it for the next server). */
  parentId: string | null = null;
  /** What the next server needs to adopt it (vm-held.ts); null for none. */
  heldRecord: HeldVmRecord | null = null;
  /** The server let go of it (a stop that keeps VMs): its QEMU runs on, nothing here ends it. */
  private letGo = false;

  constructor(
    readonly id: string,
    readonly dir: string,
    readonly template: Template,
    /** The shared RAM it maps copy-on-write: its template's, or a fork point's (null: a RAM file of its own). */
    readonly ram: SharedRam | null,
    /** This VM's own overlay. */
    readonly disk: string,
    /** Fork layers (read-only qcow2) under this VM's disk, which must outlive it. */
    readonly layers: string[],
    readonly vm: VmProcess,
    /** Who its QEMU runs as. */
    readonly identity: VmIdentity,
    /** Once its QEMU is gone: its files removed, its uid given back (after every process of it is dead). */
    private readonly onGone: (s: VmSandbox) => Promise<void>,
  ) {
    this.channel = vm.channel;
    this.exited = new Promise((resolve) => { this.resolveExited = resolve; });
    const qemu = vm.qemu;
    const done = async (reason: string) => {
      if (this.letGo) return; // the spawner ended with the server: QEMU (detached) did not
      vm.slirp?.stop();
      this.channel.close(reason);
      vm.qmp.close();
      this.resolveExited({ reason });
      // Killed from outside or crashed: release its files without waiting for a destroy().
      await this.destroy();
    };
    if (qemu.exitCode !== null || qemu.signalCode !== null) void done('the VM had already exited');
    qemu.once('exit', (code: number | null, signal: NodeJS.Signals | null) => {
      void (async () => {
        const tail = await consoleTail(vm.consoleLog);
        await done(signal ? `the VM's QEMU was killed by ${signal}` : `the VM stopped (QEMU exit ${code})${tail ? `: ${tail}` : ''}`);
      })();
    });
  }

  get pid(): number | undefined {
    return this.vm.qemu.pid;
  }

  /** Lets go of the VM alive, for the next server (vm-held.ts): only this server's connections close. */
  detach(): void {
    this.letGo = true;
    this.channel.close('the server let go of the sandbox');
    this.vm.qmp.close();
    if (this.vm.qemu instanceof AdoptedQemu) this.vm.qemu.stopWatching();
  }

  async memoryPss(): Promise<number> {
    const pids = [this.vm.qemu.pid, this.vm.slirp?.pid].filter((p): p is number => p !== undefined);
    return pssOf(pids);
  }

  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      await stopVm(this.vm, 'destroyed');
      this.resolveExited({ reason: 'destroyed' });
      await this.onGone(this);
    })();
    return this.destroying;
  }
}

export class VmRuntime implements Runtime<VmSandbox> {
  readonly name: RuntimeName;
  /** VM clones cost far more than namespace sandboxes (a QEMU each, ~100 MB): few warm per key. */
  readonly warmPoolMax = 2;
  readonly capabilities = { fork: true, freeze: true, egress: true, egressPolicy: false, limits: false, outlivesServer: true };
  /** Fork layers: how many VMs stand on each, and its fork point's group. */
  private readonly layerRefs = new Map<string, { refs: number; gid: number }>();
  private readonly ids: VmIdPool;
  private readonly live = new Map<string, VmSandbox>();
  private readonly templates = new Map<string, Promise<Template>>();
  /** Templates of an earlier server that adopted VMs stand on, by directory (no RAM: nothing new is cloned from them). */
  private readonly adoptedTemplates = new Map<string, Template>();
  private readonly inFlight = new InFlight();
  private readonly forkWorker = new ForkMemoryWorker();
  private readonly overlays = new OverlayMaker();
  private readonly memoryMb: number;
  private readonly forkCopyLimitMb: number;
  /** Names this server's RAM files on /dev/shm (shared by every server on the machine). */
  private readonly shmPrefix: string;

  /** What every QEMU of this runtime is started with. */
  private readonly qemuHost: QemuHost;

  constructor(private readonly opts: VmRuntimeOptions) {
    this.name = opts.name;
    this.memoryMb = opts.memoryMb ?? DEFAULT_MEMORY_MB;
    this.forkCopyLimitMb = opts.forkCopyLimitMb ?? this.memoryMb / 8;
    this.qemuHost = { accel: opts.accel, memoryMb: this.memoryMb, kvmGid: kvmGroup(opts.accel), image: () => opts.image(), spawner: opts.spawner };
    this.ids = new VmIdPool({ ...opts.ids, spawner: opts.spawner });
    this.shmPrefix = `podflare-${createHash('sha256').update(path.resolve(opts.stateDir)).digest('hex').slice(0, 10)}-`;
  }

  get accel(): Acceleration {
    return this.opts.accel;
  }

  private get vmDir(): string {
    return path.join(this.opts.stateDir, 'vm');
  }

  /**
   * Start-up after an earlier server on this state directory ended (maybe killed): takes over
   * every VM it left alive (vm-held.ts: QEMU reconnected, the agent settled) and removes
   * everything else it left (QEMUs, files, RAM files, VM ids).
   */
  async reconcile(knownIds: string[]): Promise<ReconcileReport<VmSandbox>> {
    await prepareHeldVmDir(this.opts.stateDir);
    const records = await loadHeldVmRecords(this.opts.stateDir);
    // Only sandboxes the store lists are worth reconnecting to: a warm-pool VM (no record there)
    // would only be destroyed again; it goes with the rest.
    const known = new Set(knownIds);
    const wanted = records.filter((r) => known.has(r.spec.id));
    const incompatible = wanted.filter((r) => !agentProtocolCompatible(r.agentProtocol));
    if (incompatible.length && this.opts.onIncompatible === 'refuse') {
      const list = incompatible.map((r) => `${r.spec.id} (agent protocol ${r.agentProtocol})`).join(', ');
      throw new IncompatibleSandboxesError(`${incompatible.length} live VM sandbox(es) of an earlier server speak an agent protocol this ` +
        `server (${AGENT_PROTOCOL}) cannot drive: ${list}. Start the earlier version again to let them finish, or start this one ` +
        'with --on-incompatible clean (PODFLARE_ON_INCOMPATIBLE=clean) to end them (they are recorded lost)');
    }
    const t0 = performance.now();
    const adopted = (await Promise.all(wanted.map((r) => this.adoptVm(r)))).filter((v): v is VmSandbox => v !== null);
    const adoptMs = Math.round(performance.now() - t0);
    const keep = new Set(adopted.map((v) => v.id));
    const keptPids = new Set(adopted.map((v) => v.pid));
    // What was not adopted goes: its QEMU (its slirp4netns, detached, by the pid its record names).
    for (const r of records) if (!keep.has(r.spec.id) && r.slirpPid) killIfStill(r.slirpPid, String(r.qemuPid));
    const killed: number[] = [];
    for (const pid of await qemuPidsUnder(this.vmDir)) {
      if (keptPids.has(pid)) continue;
      try { process.kill(pid, 'SIGKILL'); killed.push(pid); } catch { /* gone */ }
    }
    // Gone before their ids' locks are looked at: a lock naming a QEMU is live while it runs.
    await Promise.all(killed.map((pid) => waitProcessGone(pid, 10_000)));
    // Whatever else ran as a dead server's VM ids goes before their directories are walked
    // (the adopted VMs' ids are this server's now).
    await this.ids.reclaimStale();
    await this.removeFilesBut(adopted);
    await removeStrayHeldVmFiles(this.opts.stateDir, keep);
    // Ours (an earlier run on this state directory), and those of servers that died for good (a
    // test's temporary state directory never comes back): the name carries the server's pid. An
    // adopted VM's own RAM file may go too: its QEMU's mapping keeps the memory.
    for (const name of await readdir('/dev/shm').catch(() => [] as string[])) {
      const m = /^podflare-[0-9a-f]{10}-(\d+)-[0-9a-fr]+\.ram$/.exec(name);
      if (m && (name.startsWith(this.shmPrefix) || !isAlive(Number(m[1])))) await rm(path.join('/dev/shm', name), { force: true });
    }
    if (adopted.length) this.opts.log.info('adopted the previous server\'s VMs', { sandboxes: adopted.length, adoptMs, cleanupMs: Math.round(performance.now() - t0) - adoptMs });
    const cleaned = [...new Set([...knownIds, ...records.map((r) => r.spec.id)])].filter((id) => !keep.has(id));
    return { adopted, cleaned };
  }

  /** Removes the VM files of the state directory but what the adopted VMs stand on (their directories, templates, layers). */
  private async removeFilesBut(adopted: VmSandbox[]): Promise<void> {
    const keep = new Set<string>();
    for (const v of adopted) {
      keep.add(v.dir);
      keep.add(v.template.dir);
      for (const l of v.layers) keep.add(l);
    }
    if (keep.size === 0) return void (await rm(this.vmDir, { recursive: true, force: true }));
    // Only names this runtime made are walked: <id>, templates/<t>, layers/<point>.qcow2; the rest goes.
    const sweep = async (dir: string, depth: number): Promise<void> => {
      for (const name of await readdir(dir).catch(() => [] as string[])) {
        const p = path.join(dir, name);
        if (keep.has(p)) continue;
        if (depth === 0 && (name === 'templates' || name === 'layers')) await sweep(p, 1);
        else await rm(p, { recursive: true, force: true });
      }
    };
    await sweep(this.vmDir, 0);
  }

  /**
   * Takes over one VM an earlier server left (its record): its QEMU still the one recorded, its
   * ids taken over, QMP and the agent reconnected and resynchronized (vm-held.ts), a VM paused by
   * a fork the dead server never finished continued, an exec the dead server ran interrupted.
   * Null when it cannot be: it is then killed with everything else the earlier server left.
   */
  private async adoptVm(r: HeldVmRecord): Promise<VmSandbox | null> {
    const id = r.spec.id;
    const why = (reason: string) => { this.opts.log.warn('a VM of the previous server cannot be adopted', { sandbox: id, reason }); return null; };
    if (!agentProtocolCompatible(r.agentProtocol)) {
      return why(`its agent speaks protocol ${r.agentProtocol}, incompatible with this server's ${AGENT_PROTOCOL} (another major version): it is ended and recorded lost`);
    }
    if (r.memoryMb !== this.memoryMb) return why(`it has ${r.memoryMb} MB of RAM, this server gives VMs ${this.memoryMb} MB`);
    const start = processStart(r.qemuPid);
    if (start !== r.qemuStart) return why('its QEMU is gone');
    const me: ProcessRef = { pid: r.qemuPid, start };
    const ids = [r.uid, ...r.layers.map((l) => l.gid)];
    const taken: number[] = [];
    for (const i of ids) {
      if (!(await this.ids.adopt(i, [me]))) break;
      taken.push(i);
    }
    let held: Awaited<ReturnType<typeof reconnectVm>> & { watcher?: { kill(): void } };
    try {
      if (taken.length !== ids.length) throw new Error('its VM ids are held by another live server');
      held = await reconnectVm(heldVmPaths(this.opts.stateDir, id), me, this.opts.startTimeoutMs);
    } catch (err) {
      // Its QEMU goes with its uid; layer groups taken stay this server's until it closes (another VM may share them).
      if (taken.includes(r.uid)) await this.ids.release(r.uid);
      return why((err as Error).message);
    }
    const { qemu, qmp, channel } = held;
    // A server whose stop destroys its VMs takes them along when it dies without one: the VM an
    // earlier server started detached gets a watcher that dies with this server and kills it.
    if (!this.opts.outliveServer) {
      const watcher = await watchQemu(this.opts.spawner, me).catch((err: Error) => err);
      if (watcher instanceof Error) {
        qmp.close();
        channel.close('not adopted');
        await this.ids.release(r.uid);
        return why(`cannot watch its QEMU: ${watcher.message}`);
      }
      qemu.once('exit', () => watcher.kill());
      held.watcher = watcher;
    }
    const dir = path.join(this.vmDir, id);
    const vm: VmProcess = {
      qemu, stderr: () => '', qmp, channel, consoleLog: path.join(dir, 'console.log'),
      slirp: r.slirpPid ? adoptedSlirp(r.slirpPid, r.qemuPid, killIfStill) : null,
    };
    const tpl: Template = this.adoptedTemplates.get(r.templateDir) ?? {
      dir: r.templateDir, disk: path.join(r.templateDir, 'disk.qcow2'), stateData: { data: Buffer.alloc(0) }, cloneOverlay: '', ram: null,
      image: r.image, network: r.network, skeleton: null,
    };
    this.adoptedTemplates.set(r.templateDir, tpl);
    for (const l of r.layers) this.retainLayer(l.file, l.gid);
    const sandbox = new VmSandbox(id, dir, tpl, null, path.join(dir, 'disk.qcow2'), r.layers.map((l) => l.file), vm, { uid: r.uid, groups: r.groups },
      (s) => this.vmGone(s, () => rm(dir, { recursive: true, force: true })));
    sandbox.parentId = r.parentId;
    sandbox.heldRecord = r;
    this.live.set(id, sandbox);
    try {
      await settleAdopted(sandbox, this.opts.startTimeoutMs + (this.opts.interruptGraceMs ?? 5000));
    } catch (err) {
      await sandbox.destroy();
      return why((err as Error).message);
    }
    return sandbox;
  }

  /** A VM's QEMU is gone: its uid given back once its files are removed, its layers and adopted template let go of. */
  private async vmGone(s: VmSandbox, removeFiles: () => Promise<void>): Promise<void> {
    this.live.delete(s.id);
    await this.ids.release(s.identity.uid, async () => {
      await removeFiles();
      await removeHeldVmFiles(this.opts.stateDir, s.id);
    });
    for (const l of s.layers) void this.releaseLayer(l);
    // An earlier server's template: removed with the last VM that stands on it (a resumed VM's
    // "template" is its frozen directory, the manager's: never removed here).
    const tpl = s.template;
    if (this.adoptedTemplates.get(tpl.dir) === tpl && ![...this.live.values()].some((v) => v.template === tpl)) {
      this.adoptedTemplates.delete(tpl.dir);
      if (path.dirname(tpl.dir) === path.join(this.vmDir, 'templates')) await rm(tpl.dir, { recursive: true, force: true });
    }
  }

  start(spec: SandboxSpec): Promise<VmSandbox> {
    return this.inFlight.track(() => this.startClone(spec));
  }

  fork(parent: VmSandbox, specs: SandboxSpec[]): Promise<VmSandbox[]> {
    return this.inFlight.track(() => this.forkChildren(parent, specs));
  }

  diff(a: VmSandbox, b: VmSandbox, opts: DiffOptions): Promise<FileDiff> {
    return vmDiff(a.channel, b.channel, opts);
  }

  async close(opts: CloseOptions = {}): Promise<void> {
    await this.inFlight.close();
    if (opts.keepSandboxes && this.live.size > 0) return this.letGoOfVms();
    await Promise.all([...this.live.values()].map((s) => s.destroy()));
    const templates = await Promise.allSettled([...this.templates.values()]);
    this.templates.clear();
    for (const t of templates) {
      if (t.status === 'fulfilled') await removeTemplate(t.value);
    }
    await rm(this.vmDir, { recursive: true, force: true });
    await this.ids.releaseAll();
    await this.forkWorker.close();
  }

  /**
   * A stop that keeps the VMs: each runs on (its record written when it started), only this
   * server's connections close; its ids stay taken (their locks live through the VMs). What no
   * VM stands on goes: templates no live VM was cloned from (their RAM lives on in the clones'
   * mappings), fork scratch files.
   */
  private async letGoOfVms(): Promise<void> {
    const all = [...this.live.values()];
    for (const s of all) s.detach();
    this.live.clear();
    const inUse = new Set(all.map((s) => s.template.dir));
    const templates = await Promise.allSettled([...this.templates.values()]);
    this.templates.clear();
    for (const t of templates) {
      if (t.status !== 'fulfilled') continue;
      if (inUse.has(t.value.dir)) await t.value.ram?.close();
      else await removeTemplate(t.value);
    }
    await rm(path.join(this.vmDir, 'points'), { recursive: true, force: true });
    this.ids.forgetAll();
    await this.forkWorker.close();
    this.opts.log.info('VMs left running for the next server', { sandboxes: all.length });
  }

  /** The frozen template for (template, network), booted on first use; a failed boot is retried next time. */
  private template(name: string, network: boolean): Promise<Template> {
    const key = `${name}|${network ? 'net' : 'nonet'}`;
    let t = this.templates.get(key);
    if (!t) {
      t = this.bootTemplate(name, network);
      this.templates.set(key, t);
      t.catch(() => this.templates.delete(key));
    }
    return t;
  }

  private async bootTemplate(name: string, network: boolean): Promise<Template> {
    const image = await this.opts.image();
    const rand = randomBytes(4).toString('hex');
    const dir = path.join(this.vmDir, 'templates', `${name}-${network ? 'net' : 'nonet'}-${rand}`);
    const statePath = path.join(dir, 'state');
    const tpl: Template = { dir, disk: path.join(dir, 'disk.qcow2'), stateData: { data: Buffer.alloc(0) }, cloneOverlay: path.join(dir, 'clone.qcow2'), ram: null, image, network, skeleton: null };
    const bootTimeoutMs = this.opts.bootTimeoutMs ?? (this.opts.accel.kind === 'kvm' ? 20_000 : 90_000);
    const t0 = performance.now();
    await rootDir(path.dirname(dir), 0o711, this.opts.stateDir);
    // The template's QEMU has a uid of its own while it boots; once frozen, its disk is root's,
    // readable by the VMs' group, and its RAM (a memfd it wrote while it ran) is sealed.
    const uid = await this.ids.allocate();
    const owner: Owner = { uid, gid: uid };
    const shared: Owner = { uid: 0, gid: this.ids.group };
    try {
      // A TCG boot can stall early on a loaded host: one more attempt before giving up.
      for (let attempt = 1; ; attempt++) {
        await tpl.ram?.close();
        tpl.ram = null;
        const { runDir, consoleLog } = await vmDir(dir, owner, this.ids.group, 0o750);
        let vm: VmProcess | undefined;
        try {
          await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', image.rootfs, tpl.disk]);
          await handOver(tpl.disk, owner, 0o600);
          tpl.ram = await SharedRam.create(this.opts.spawner, `${this.shmPrefix}${process.pid}-t${rand}.ram`, this.memoryMb * MB);
          vm = await launchQemu(this.qemuHost, { identity: { uid, groups: [this.ids.group] }, runDir, consoleLog, disk: tpl.disk, ram: { shared: tpl.ram }, shareRam: true, network, incoming: false, background: false }, bootTimeoutMs);
          await vm.channel.waitHello(bootTimeoutMs);
          // The interpreter is up (and has imported what it preloads) before the freeze.
          const ready = await withTimeout(vm.channel.exec({ op: 'exec', language: 'python', code: 'pass' }, () => undefined), bootTimeoutMs, 'the template interpreter did not start');
          if (ready.code !== 0) throw new Error('the template interpreter failed to start');
          const booted = performance.now();
          await vm.qmp.command('stop');
          // Forks by copy need the device state alone: tried once here, on this QEMU (one without
          // the command fails here too).
          const devicesAlone = await this.saveDevices(vm, uid, path.join(this.vmDir, 'points', `template-${rand}.dev`)).then(deviceSections).then(() => true, (err: Error) => {
            this.opts.log.warn('vm template: forks will migrate (no device state alone from this QEMU)', { error: err.message });
            return false;
          });
          await vm.qmp.command('migrate-set-capabilities', { capabilities: MIGRATION_CAPABILITIES });
          await migrateToFile(vm.qmp, { file: statePath, socketPath: path.join(dir, 'out.sock'), uid, maxBytes: MAX_TEMPLATE_STATE }, bootTimeoutMs, vm.stderr);
          await vm.qmp.command('quit').catch(() => undefined);
          await waitExit(vm.qemu, 10_000);
          vm.channel.close('template frozen');
          // Its QEMU is gone (nothing maps it shared any more): from now on its RAM never changes.
          await tpl.ram.seal();
          // Nothing of the template's uid stays in its directory (the uid goes to other VMs).
          await rm(runDir, { recursive: true, force: true });
          await handOver(consoleLog, { uid: 0, gid: 0 }, 0o600);
          // Written by a guest that ran our image alone (no tenant's code yet): its disk is trusted.
          await handOver(tpl.disk, shared, 0o440);
          const stateData = await readRegular(statePath, MAX_TEMPLATE_STATE);
          tpl.stateData = { data: stateData };
          // Forks by copy also need a template stream the split understands; else they migrate.
          if (devicesAlone) {
            try {
              tpl.skeleton = forkSkeleton(stateData, RAM_BLOCK, this.memoryMb * MB);
            } catch (err) {
              this.opts.log.warn('vm template: forks will migrate (its stream cannot be cut for forks by copy)', { error: (err as Error).message });
            }
          }
          await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', tpl.disk, tpl.cloneOverlay]);
          await handOver(tpl.cloneOverlay, { uid: 0, gid: 0 }, 0o600);
          this.opts.log.info('vm template ready', { template: name, network, boot_ms: Math.round(booted - t0), freeze_ms: Math.round(performance.now() - booted), accel: this.opts.accel.kind });
          return tpl;
        } catch (err) {
          const tail = await consoleTail(consoleLog);
          if (vm) await stopVm(vm, 'template boot failed');
          const message = `${(err as Error).message}${tail ? ` (console: ${tail})` : ''}`;
          if (attempt >= 2 || this.inFlight.closed) {
            await removeTemplate(tpl);
            throw new Error(`the VM template did not boot: ${message}`);
          }
          this.opts.log.warn('vm template boot failed, retrying', { error: message });
        }
      }
    } finally {
      await this.ids.release(uid);
    }
  }

  private async startClone(spec: SandboxSpec): Promise<VmSandbox> {
    const tpl = await this.template(spec.template, spec.egress === true);
    return this.restore(spec, { template: tpl, ram: { shared: tpl.ram! }, disk: { overlayOf: tpl.cloneOverlay }, state: tpl.stateData, layers: [] });
  }

  /**
   * A new VM from a frozen point: the template's (RAM: the template's shared RAM), a fork point's
   * (RAM: the fork point's shared RAM) or a frozen sandbox's (RAM: all in the state, loaded into a
   * RAM file of its own). Shared RAM is mapped copy-on-write; the state is the rest of the migration stream (device state, and
   * whatever RAM the file does not hold), handed to QEMU from memory over a unix socket, or
   * read from a file. QEMU starts (and maps the RAM file) before the state is needed: `state`
   * may still be in the making.
   */
  private async restore(spec: SandboxSpec, from: {
    template: Template;
    /** Shared RAM (sealed), or a RAM file of this VM's own, made here (a resumed VM: the state holds all its RAM). */
    ram: { shared: SharedRam } | { file: string };
    /** A copy of a ready-made empty overlay (over the right backing file), or a copy of a whole disk. */
    disk: { overlayOf: string } | { copyOf: string };
    state: StateSource | Promise<StateSource>;
    layers: string[];
    /** The caller sets the clock (setClock) once its other restores are done: a fork's children. */
    clockLater?: boolean;
    /** The sandbox it is forked from (lineage, for the next server). */
    parentId?: string;
  }): Promise<VmSandbox> {
    if (this.inFlight.closed) throw new Error('the runtime is shut down');
    const t0 = performance.now();
    const steps: Record<string, number> = {};
    const step = (name: string) => { steps[name] = Math.round(performance.now() - t0); };
    const dir = path.join(this.vmDir, spec.id);
    const disk = path.join(dir, 'disk.qcow2');
    for (const l of from.layers) this.retainLayer(l);
    const uid = await this.ids.allocate().catch((err: Error) => {
      for (const l of from.layers) void this.releaseLayer(l);
      throw err;
    });
    const owner: Owner = { uid, gid: uid };
    // Its own ids, the VMs' group (the template's files) and its fork points' (their layers and RAM).
    const identity: VmIdentity = { uid, groups: [this.ids.group, ...from.layers.map((l) => this.layerRefs.get(l)!.gid)] };
    const removeFiles = async () => {
      await rm(dir, { recursive: true, force: true });
      await removeHeldVmFiles(this.opts.stateDir, spec.id);
      if ('file' in from.ram) await rm(from.ram.file, { force: true });
    };
    const held = heldVmPaths(this.opts.stateDir, spec.id);
    let vm: VmProcess | undefined;
    let sandbox: VmSandbox | undefined; // once made, it releases its uid, files and layers itself
    let consoleLog = path.join(dir, 'console.log');
    try {
      await rootDir(this.vmDir, 0o711, this.opts.stateDir);
      const made = await vmDir(dir, owner);
      consoleLog = made.consoleLog;
      if ('copyOf' in from.disk) await copyRegular(from.disk.copyOf, disk, owner);
      else {
        await copyFile(from.disk.overlayOf, disk, fsConstants.COPYFILE_EXCL);
        await handOver(disk, owner, 0o600);
      }
      if ('file' in from.ram) await (await privateFile(from.ram.file, owner, 0o600, this.memoryMb * MB)).close();
      step('disk_ms');
      const tpl = from.template;
      await prepareHeldVmDir(this.opts.stateDir);
      vm = await launchQemu(this.qemuHost, {
        identity, runDir: made.runDir, consoleLog, disk, ram: from.ram, shareRam: false, network: tpl.network, incoming: true, background: spec.background ?? false,
        held: { agentSocket: held.agentSocket, qmpSocket: held.qmpSocket, outliveServer: this.opts.outliveServer === true },
      }, this.opts.startTimeoutMs);
      // Only a shared RAM block is skipped: the template's and a fork point's state have no
      // pages of the RAM file, a frozen sandbox's has them all (its RAM file starts empty).
      await vm.qmp.command('migrate-set-capabilities', { capabilities: MIGRATION_CAPABILITIES });
      step('launch_ms');
      const state = await from.state;
      step('state_ready_ms');
      await incoming(vm.qmp, state, path.join(made.runDir, 'in.sock'), this.opts.startTimeoutMs, vm.stderr);
      step('loaded_ms');
      await vm.qmp.command('cont');
      await withTimeout(vm.channel.request({
        op: 'restore',
        time_ns: Date.now() * 1_000_000,
        entropy: randomBytes(64).toString('base64'),
        hostname: spec.hostname,
        sandbox_id: spec.id,
      }), this.opts.startTimeoutMs, 'the restored VM did not answer');
      step('answered_ms');
      if (!from.clockLater) this.setClock(spec.id, vm);
      this.opts.log.debug('vm restored', { id: spec.id, ...steps });
      if (spec.background && vm.qemu.pid) setPriorityAll(vm.qemu.pid, 0);
      // Its ids stay taken while its QEMU runs, whatever becomes of this server; its record lets
      // the next server adopt it.
      const record = await this.heldRecord(spec, vm, identity, tpl, from.layers, from.parentId ?? null);
      sandbox = new VmSandbox(spec.id, dir, tpl, 'shared' in from.ram ? from.ram.shared : null, disk, [...from.layers], vm, identity, (s) => this.vmGone(s, removeFiles));
      sandbox.parentId = from.parentId ?? null;
      sandbox.heldRecord = record;
      if ('file' in from.ram) sandbox.ownRamFile = from.ram.file;
      this.live.set(spec.id, sandbox);
      if (this.inFlight.closed) {
        await sandbox.destroy();
        throw new Error('the runtime is shut down');
      }
      return sandbox;
    } catch (err) {
      const tail = await consoleTail(consoleLog);
      if (vm) await stopVm(vm, 'start failed');
      if (!sandbox) {
        await this.ids.release(uid, removeFiles);
        for (const l of from.layers) void this.releaseLayer(l);
      }
      throw new Error(`the VM did not start: ${(err as Error).message}${tail ? ` (console: ${tail})` : ''}`);
    }
  }

  /** Makes a started VM's ids hold while its QEMU runs and writes its record (vm-held.ts). */
  private async heldRecord(spec: SandboxSpec, vm: VmProcess, identity: VmIdentity, tpl: Template, layers: string[], parentId: string | null): Promise<HeldVmRecord> {
    const pid = vm.qemu.pid;
    const start = pid === undefined ? null : processStart(pid);
    if (pid === undefined || start === null) throw new Error('its QEMU is gone');
    const me = { pid, start };
    const layerIds = layers.map((file) => ({ file, gid: this.layerRefs.get(file)!.gid }));
    await Promise.all([identity.uid, ...layerIds.map((l) => l.gid)].map((i) => this.ids.addHolders(i, [me])));
    const record: HeldVmRecord = {
      version: HELD_VM_RECORD_VERSION, agentProtocol: AGENT_PROTOCOL, spec, qemuPid: pid, qemuStart: start, uid: identity.uid, groups: identity.groups,
      templateDir: tpl.dir, network: tpl.network, image: tpl.image, memoryMb: this.memoryMb, layers: layerIds, slirpPid: vm.slirp?.pid ?? null, parentId,
    };
    await saveHeldVmRecord(this.opts.stateDir, record);
    return record;
  }

  /**
   * Gives a VM the host's time. After `restore`, whose time was the host's when it was sent: a
   * guest just resumed takes a while (100+ ms under TCG) to act on it. After a pause (a fork's
   * parent): its clock stood still meanwhile, so it would fall behind by every fork. Not waited
   * for: the agent takes requests in order, so the time is set before anything sent later.
   */
  private setClock(id: string, vm: VmProcess): void {
    void vm.channel.request({ op: 'set_time', time_ns: Date.now() * 1_000_000 }).catch((e: Error) => {
      // A sandbox closed meanwhile (a fork's children closed at once) is no news; a VM that died
      // is reported where its end is noticed.
      if (!(e instanceof ChannelClosedError) && vm.qemu.exitCode === null) this.opts.log.warn('a VM did not take the time', { sandbox: id, error: e.message });
    });
  }

  /**
   * fork(n): the parent is paused at a fork point: its RAM and device state as they are (see
   * forkMemory), and a copy of its disk overlay as a read-only fork layer. Each child is restored
   * like a template clone from that point, with its own overlay over the fork layer, its own serial
   * channel and network, and is told the time and fresh entropy. Everything in the guest is
   * inherited: every process, not only the interpreter. The parent continues once its memory is
   * taken, on its own overlay.
   *
   * The children's QEMUs start while the memory is still being taken: a QEMU waiting for its
   * incoming migration does not touch guest RAM (it skips loading ROMs into RAM while in-migrate;
   * its mapping of the RAM file has no resident page until then), and a child's guest runs only
   * once its migration has completed.
   */
  private async forkChildren(parent: VmSandbox, specs: SandboxSpec[]): Promise<VmSandbox[]> {
    if (!this.live.has(parent.id)) throw new SandboxError('conflict', 'the sandbox is not running');
    const t0 = performance.now();
    const phase = (name: string, extra: Record<string, unknown> = {}) => this.opts.log.debug(`vm fork: ${name}`, { parent: parent.id, ms: Math.round(performance.now() - t0), ...extra });
    const point = randomBytes(6).toString('hex');
    const layersDir = path.join(this.vmDir, 'layers');
    await rootDir(layersDir, 0o711, this.opts.stateDir); // QEMU connects to a fork point's stream socket here
    const layer = path.join(layersDir, `${point}.qcow2`);
    const overlay = path.join(layersDir, `${point}.top.qcow2`);
    const qmp = parent.vm.qmp;
    let memory: ForkMemory | null = null;
    let layerHeld = false;
    let resumed = false;
    let forked = false;
    let settled: Promise<unknown> = Promise.resolve();
    // The fork point's group: its layer is readable by its children alone.
    const pointGid = await this.ids.allocate();
    try {
      await qmp.command('stop');
      // `stop` flushed the disk (QEMU's qcow2 caches included) and nothing writes it until
      // `cont`: a copy of the overlay is the fork point's disk, taken while the memory is taken.
      // The children's empty overlay over it is made meanwhile (the copy need not exist yet).
      this.retainLayer(layer, pointGid);
      layerHeld = true;
      const [mem, disk] = await Promise.allSettled([
        this.forkMemory(parent, point, phase),
        Promise.all([
          // A reflink where the state directory's filesystem has them (btrfs, XFS): a parent that
          // wrote gigabytes forks as fast as one that wrote nothing. Elsewhere a copy.
          copyFile(parent.disk, layer, fsConstants.COPYFILE_FICLONE | fsConstants.COPYFILE_EXCL).then(() => handOver(layer, { uid: 0, gid: pointGid }, 0o440)),
          this.overlays.make(layer, overlay, parent.disk),
        ]),
      ]);
      if (mem.status === 'rejected') throw mem.reason;
      memory = mem.value;
      if (disk.status === 'rejected') throw disk.reason;
      phase('disk frozen');
      const layers = [...parent.layers, layer];
      const { ram, state } = mem.value;
      // Clocks are set once every child is up: a guest acting on it takes CPU the others need.
      const children = specs.map((spec) => this.restore(spec, { template: parent.template, ram: { shared: ram }, disk: { overlayOf: overlay }, state, layers, clockLater: true, parentId: parent.id }));
      settled = Promise.allSettled(children);
      let error: unknown = null;
      try {
        await state;
        await qmp.command('cont');
        resumed = true;
      } catch (err) {
        error = err;
      }
      const results = await Promise.allSettled(children);
      phase('children restored');
      if (resumed) this.setClock(parent.id, parent.vm);
      for (const r of results) if (r.status === 'fulfilled') this.setClock(r.value.id, r.value.vm);
      const failed = error ?? results.find((r): r is PromiseRejectedResult => r.status === 'rejected')?.reason;
      if (failed) {
        await Promise.all(results.map((r) => (r.status === 'fulfilled' ? r.value.destroy() : undefined)));
        throw failed;
      }
      forked = true;
      return results.map((r) => (r as PromiseFulfilledResult<VmSandbox>).value);
    } finally {
      if (!resumed) {
        await memory?.abandon();
        await qmp.command('cont').catch(() => undefined);
      }
      const cleanup = (async () => {
        // Children still starting map the shared RAM: it goes once they all have (or have failed).
        await settled;
        await memory?.release();
        await rm(overlay, { force: true });
        if (layerHeld) await this.releaseLayer(layer); // held by the children alone now, if any
        else await this.ids.release(pointGid, () => rm(layer, { force: true }));
      })();
      // A fork that failed has cleaned up when it says so; a fork that worked need not wait.
      if (forked) this.inFlight.background(cleanup);
      else await cleanup;
    }
  }

  /**
   * A stopped parent's memory for its children: the file their RAM maps and the state they load.
   * By copy when the parent's RAM maps its template's file and its own pages (those it wrote since)
   * are few: they are read from its QEMU's memory (private-pages.ts) and go into the state, with
   * its device state (fork-state.ts); every child maps the template's RAM file and has a copy of
   * them. Else by migration: the parent's stream is split into a fresh RAM file of the fork point,
   * which its children share (forkBySplit).
   */
  private async forkMemory(parent: VmSandbox, point: string, phase: (name: string, extra?: Record<string, unknown>) => void): Promise<ForkMemory> {
    const skeleton = parent.template.skeleton;
    if (!skeleton || !parent.ram || parent.ram !== parent.template.ram || parent.vm.qemu.pid === undefined) return this.forkBySplit(parent, point, phase);
    const devicesFile = path.join(this.vmDir, 'points', `${point}.dev`);
    const devices = this.saveDevices(parent.vm, parent.identity.uid, devicesFile);
    devices.catch(() => undefined);
    const own = this.forkWorker.privatePages({ pid: parent.vm.qemu.pid, ramFile: parent.ram.mapsName, ramSize: this.memoryMb * MB, limitBytes: this.forkCopyLimitMb * MB, skeleton, ramBlock: RAM_BLOCK });
    const counted = await own.counted.catch((err: Error) => {
      // Its page table could not be read: a fork by migration needs none of it.
      this.opts.log.warn('vm fork: the parent\'s pages could not be found, it forks by migration', { parent: parent.id, error: err.message });
      return null;
    });
    if (!counted?.copy) {
      await devices.catch(() => undefined);
      if (counted) phase('too many pages to copy', { pages: counted.count });
      return this.forkBySplit(parent, point, phase);
    }
    const { count } = counted;
    // The children start while the pages are read.
    const state = Promise.all([own.stateHead, devices]).then(([head, d]) => {
      phase('pages read', { pages: count });
      return { data: [head!, deviceSections(d)] } satisfies StateSource;
    });
    state.catch(() => undefined);
    return { ram: parent.ram, state, abandon: async () => undefined, release: async () => undefined };
  }

  /**
   * A stopped VM's device state, without RAM (QMP `xen-save-devices-state`, made for Xen, whose
   * RAM is saved apart: here it is the pages QEMU would otherwise scan for). QEMU writes the file
   * by name: it is made here first, in a directory of the server's own, so QEMU can neither
   * replace it nor point it elsewhere (this server, root, reads it back).
   */
  private async saveDevices(vm: VmProcess, uid: number, file: string): Promise<Buffer> {
    await rootDir(path.dirname(file), 0o711, this.opts.stateDir);
    try {
      await (await privateFile(file, { uid, gid: uid })).close();
      // live: false, or QEMU would hand the disk over as at the end of a migration.
      await vm.qmp.command('xen-save-devices-state', { filename: file, live: false });
      return await readRegular(file, MAX_DEVICE_STATE);
    } finally {
      await rm(file, { force: true });
    }
  }

  /**
   * The parent migrates to this server (a unix socket), which splits the stream in its fork
   * worker (migration-split.ts): the pages of its RAM go into fresh shared RAM of the fork point
   * (a memfd, shared-ram.ts; all-zero pages stay holes), the rest (device state, a few small ROM
   * blocks: ~70 KB) stays in memory as the fork point's state. Children map it copy-on-write
   * (siblings share its pages until they write them). It is sealed once the split is done, before
   * any child's guest runs (they run once the state is loaded), so no child can change what its
   * siblings map; the server lets go of it once every child has been restored or has failed: the
   * children's mappings (and fds) keep its pages alive, so it needs no reference counting and
   * nothing leaks (a crash takes it with the spawner). A fork of such a child works the same way
   * (its RAM is not its template's), and so does a fork of a resumed VM.
   */
  private async forkBySplit(parent: VmSandbox, point: string, phase: (name: string, extra?: Record<string, unknown>) => void): Promise<ForkMemory> {
    const qmp = parent.vm.qmp;
    const socketPath = path.join(this.vmDir, 'layers', `${point}.sock`);
    let ram: SharedRam | null = null;
    let split: ReturnType<ForkMemoryWorker['split']> | null = null;
    let migrated: Promise<void> | null = null;
    const release = async () => {
      await rm(socketPath, { force: true });
      await ram?.close();
    };
    try {
      ram = await SharedRam.create(this.opts.spawner, `${this.shmPrefix}${process.pid}-p${point}.ram`, this.memoryMb * MB);
      split = this.forkWorker.split({ socketPath, uid: parent.identity.uid, ramFile: ram.fillPath, ramName: ram.mapsName, ramBlock: RAM_BLOCK, ramSize: this.memoryMb * MB });
      await split.listening;
      await qmp.command('migrate-set-parameters', UNTHROTTLED);
      migrated = waitMigration(qmp, this.opts.startTimeoutMs, parent.vm.stderr);
      await qmp.command('migrate', { uri: `unix:${socketPath}` });
    } catch (err) {
      split?.cancel();
      if (migrated) await this.cancelMigration(qmp, migrated);
      await release();
      throw err;
    }
    const shared = ram!;
    const state = Promise.all([migrated, split.done]).then(async ([, s]) => {
      // Filled: from now on nobody (a child's QEMU above all) changes what the children map.
      await shared.seal();
      phase('memory saved', { pages: s.pages, state_bytes: s.state.length });
      return { data: s.state } satisfies StateSource;
    });
    state.catch(() => undefined);
    const abandon = async () => {
      split?.cancel();
      await this.cancelMigration(qmp, migrated!);
    };
    return { ram: shared, state, abandon, release };
  }

  private async cancelMigration(qmp: Qmp, migrated: Promise<void>): Promise<void> {
    await qmp.command('migrate_cancel').catch(() => undefined);
    await withTimeout(migrated, 10_000, 'the cancelled migration did not end').catch(() => undefined);
  }

  /**
   * Freeze to disk: the VM's RAM and device state migrate to `dir/state` (the whole RAM: a
   * clone's RAM is private), and its disk overlay is copied and rebased onto the image's ext4
   * root (`qemu-img rebase`, which folds in the template's and fork layers' data), so nothing in
   * it refers to this server's run-time files. Then the VM ends.
   *
   * `dir` is root's alone (0700), made fresh: whatever was at its name goes first. QEMU streams
   * its state to a socket of the server's, which writes the file; the overlay QEMU wrote is
   * rebased by qemu-img as the VM's own uid (its header names the backing file qemu-img opens),
   * in the VM's directory, and only then copied into `dir` (vm-files.ts).
   */
  async freeze(s: VmSandbox, dir: string): Promise<void> {
    const qmp = s.vm.qmp;
    await rootDir(path.dirname(dir), 0o700, this.opts.stateDir);
    await freshDir(dir, 0o700);
    const scratch = path.join(s.dir, 'frozen.qcow2');
    await qmp.command('stop');
    try {
      const maxBytes = this.memoryMb * MB + FROZEN_STATE_OVERHEAD;
      await migrateToFile(qmp, { file: path.join(dir, 'state'), socketPath: path.join(s.dir, 'out.sock'), uid: s.identity.uid, maxBytes }, this.opts.startTimeoutMs, s.vm.stderr);
      await rm(scratch, { force: true });
      await copyRegular(s.disk, scratch, { uid: s.identity.uid, gid: s.identity.uid });
      await runAsVm(this.opts.spawner, s.identity, ['qemu-img', 'rebase', '-f', 'qcow2', '-F', 'raw', '-b', s.template.image.rootfs, scratch]);
      await copyRegular(scratch, path.join(dir, 'disk.qcow2'));
      await writeNew(path.join(dir, 'vm.json'), JSON.stringify({ network: s.template.network, memoryMb: this.memoryMb, rootfs: s.template.image.rootfs, frozenAt: new Date().toISOString() }) + '\n');
    } catch (err) {
      await qmp.command('cont').catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
      throw err;
    } finally {
      await rm(scratch, { force: true });
    }
    await s.destroy();
  }

  async resume(spec: SandboxSpec, dir: string): Promise<VmSandbox> {
    return this.inFlight.track(async () => {
      // Read as untrusted: a frozen directory of an older server was its QEMU's.
      const meta = JSON.parse((await readRegular(path.join(dir, 'vm.json'), MAX_FROZEN_META)).toString('utf8')) as { network: boolean; memoryMb: number };
      if (meta.memoryMb !== this.memoryMb) throw new Error(`frozen with ${meta.memoryMb} MB of RAM, this server gives VMs ${this.memoryMb} MB`);
      const image = await this.opts.image();
      // Any RAM file does (the state holds the whole RAM); this one is the resumed VM's own.
      const rand = randomBytes(4).toString('hex');
      const state = path.join(dir, 'state');
      const own: Template = { dir, disk: path.join(dir, 'disk.qcow2'), stateData: { file: state }, cloneOverlay: '', ram: null, image, network: meta.network === true, skeleton: null };
      const ramFile = path.join('/dev/shm', `${this.shmPrefix}${process.pid}-r${rand}.ram`);
      return this.restore(spec, { template: own, ram: { file: ramFile }, disk: { copyOf: own.disk }, state: own.stateData, layers: [] });
    });
  }

  private retainLayer(layer: string, gid?: number): void {
    const held = this.layerRefs.get(layer);
    if (held) held.refs++;
    else if (gid !== undefined) this.layerRefs.set(layer, { refs: 1, gid });
    else throw new Error(`fork layer ${layer} has no group`);
  }

  /** One VM (or the fork itself) less on a layer: the last one removes it and frees its group. */
  private async releaseLayer(layer: string): Promise<void> {
    const held = this.layerRefs.get(layer);
    if (!held) return;
    if (held.refs > 1) return void held.refs--;
    this.layerRefs.delete(layer);
    await this.ids.release(held.gid, () => rm(layer, { force: true }));
  }
}

async function removeTemplate(t: Template): Promise<void> {
  await t.ram?.close();
  await rm(t.dir, { recursive: true, force: true });
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
    p.then((v) => { clearTimeout(timer); resolve(v); }, (e: unknown) => { clearTimeout(timer); reject(e as Error); });
  });
}
