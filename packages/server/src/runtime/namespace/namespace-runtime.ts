/**
 * The namespace runtime: each sandbox is a bubblewrap sandbox whose root is an overlay of the
 * read-only image (agent layer over the Debian base) plus the sandbox's own upper layer.
 *
 * The overlay is mounted on the host only while a sandbox starts: bwrap binds it as the root, and
 * once the agent says hello the host mount is detached (a fork child's root is never on the host:
 * the host helper mounts it straight into the child's own mount namespace). From then on the mount
 * exists only inside the sandbox's namespaces and disappears with them, so a crash of the server
 * leaves no mounts behind.
 *
 * fork(n): the parent's interpreter forks once per child (agent side: agent/podflare_fork.py), each
 * child taking new namespaces; meanwhile the parent's upper layer is copied into a read-only fork
 * layer shared by the children (the parent keeps writing to its own upper). Each child then gets an
 * overlay of its own upper over that layer and the parent's lowers, mounted into its mount
 * namespace, and a signal to switch to it. Memory is shared copy-on-write by the kernel.
 *
 * A fork layer lives in the forking sandbox's own directory (`<id>/layers/fork-*`), which on the
 * disk volume is that sandbox's subvolume: the layer counts against the forking sandbox's disk
 * limit, like its upper. Why this bounds what one tenant can take: a fork layer is a reflink copy
 * of the upper (same subvolume, so the shared extents count once, and a fork costs the quota
 * nothing until the parent rewrites what was frozen), and whatever the parent then deletes or
 * rewrites stays charged to it for as long as the layer lives. However often it forks, a sandbox
 * holds at most its own disk limit: its upper plus every fork layer it made. A layer cannot
 * outlive its sandbox's directory: a sandbox with live children is only a husk, finalized (and
 * its directory removed) once its last child is gone, and only its descendants use its layers.
 * A fork that fails gives its layer back at once.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, open, readdir, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { AGENT_PROTOCOL, agentProtocolCompatible, isEgressPolicy } from '@podflare/protocol';
import { detectCgroups, type Cgroups, type SandboxCgroup } from '../shared/cgroups.js';
import type { EgressService } from '../../egress/index.js';
import type { Logger } from '../../log.js';
import { processTree, run } from '../../proc.js';
import { SandboxError, type CloseOptions, type DiffOptions, type FileDiff, type ForkOptions, type OnIncompatible, type ReconcileReport, type Runtime, type RuntimeName, type SandboxSpec, type TemplateLayerBounds } from '@podflare/runtime';
import { InFlight } from '../in-flight.js';
import { bwrapArgs, SANDBOX_PATH } from './bwrap-args.js';
import { HostHelper, type HostHelperOptions } from './hostd.js';
import type { Spawner } from '../shared/spawner.js';
import { DiskVolume } from './disk-volume.js';
import { SpareHolders, type ForkHolder } from './spare-holders.js';
import { assertMountablePath, sandboxDirs, sandboxesDir, trashDir, type SandboxDirs } from './layout.js';
import { Trash } from './trash.js';
import { saveTemplateLayer } from './template-layer.js';
import { proxyEnvironment } from './netns-addresses.js';
import { closeEgressListeners, openEgressListeners, type EgressListeners } from './netns-listeners.js';
import { adoptedSlirp, startSlirp, type Slirp } from '../shared/slirp.js';
import { removeLeftovers } from './reconcile.js';
import {
  connectHolder, HOLDER_RECORD_VERSION, holderLogTail, holderPaths, holdersDir, killIfStill, loadHolderRecords, prepareHoldersDir,
  removeHolderFiles, saveHolderRecord, startHolder, type HolderRecord,
} from './holder.js';
import { hasMount, interruptOrphanedExec, killStrayHolders, killUnrecordedHolders, removeStrayHolderFiles } from './adopt.js';
import { bootTicksNow, ForkedSandbox, hostPidsOfForkChildren, NsSandbox, RootSandbox, type SandboxHooks } from './ns-sandbox.js';
import { NsHeldCheckpoints } from './held-checkpoints.js';

export interface NamespaceRuntimeOptions {
  /** The name it is registered under (runtime/drivers.ts). */
  name: RuntimeName;
  stateDir: string;
  /** Lower layers, topmost first: the agent layer, then the Debian base. */
  lowerDirs: string[];
  /**
   * A template's lower layers, topmost first (image/templates.ts); without it every sandbox gets
   * `lowerDirs`. Called on each start: a template built after the server started is found.
   */
  layersFor?: (template: string) => Promise<string[]>;
  startTimeoutMs: number;
  interruptGraceMs: number;
  /** First host uid/gid of the range sandboxes run as (root inside = this uid; 65536 ids). */
  uidBase: number;
  /** Size of the disk volume holding the sandboxes' directories, reserved on the host (config.ts). */
  diskVolumeBytes: number;
  log: Logger;
  /** Serves sandboxes with an egress allowlist (without it, such sandboxes are refused). */
  egress?: EgressService;
  /** Starts the sandboxes' helper processes (slirp4netns); the server's, shared with other runtimes. */
  spawner: Spawner;
  /** The host helper's workers and timeouts (defaults in hostd.ts). */
  hostHelper?: Omit<HostHelperOptions, 'log'>;
  /**
   * Fork children's holders kept started ahead of need (spare-holders.ts): a fork of up to this
   * many children waits for no holder to start.
   * @default 6
   */
  spareHolders?: number;
  /**
   * Sandboxes an earlier server left whose agent speaks another major protocol version: 'clean'
   * (ended and cleaned, recorded lost) or 'refuse' (reconcile throws: the server does not start).
   * @default 'clean'
   */
  onIncompatible?: OnIncompatible;
  /**
   * The sandboxes this runtime starts end when the server process dies, even without a stop (a
   * kill -9, a crashed test): each holder watches the server (onStop 'destroy'). Without it they
   * live on for the next server to adopt.
   * @default false
   */
  watchServer?: boolean;
}

/** The server refuses to start: sandboxes of an incompatible earlier build are alive (onIncompatible 'refuse'). */
export class IncompatibleSandboxesError extends Error {
  override name = 'IncompatibleSandboxesError';
}

const SECCOMP_POLICY = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_seccomp.py');
/** How many ids the sandboxes' user namespaces map (0..65535 inside). */
const ID_COUNT = 65_536;

/** Niceness of sandboxes starting in the background (warm-pool refills). */
const BACKGROUND_NICE = 10;
const AGENT_COMMAND = ['/usr/bin/python3', '/opt/podflare/podflare_agent.py'];
/** A private tmpfs in a parent, made at its first fork: in each child's copy of the parent's mount
 * namespace, the child's root is mounted over it. */
const SPAWN_AREA = '/.pf/spawn';
/** Tells a fork child that its root is mounted (agent/podflare_fork.py waits for it). */
const ROOT_READY_SIGNAL = 'SIGUSR2';
/**
 * Pid namespaces nest at most 32 deep, and each fork generation adds one level (merges keep the
 * winner's level). Refuse clearly before the kernel does.
 */
const MAX_FORK_DEPTH = 30;
/** Fork layers a sandbox's root may stack before the next fork squashes them into one. */
const MAX_STACKED_FORK_LAYERS = 4;

export class NamespaceRuntime implements Runtime<NsSandbox> {
  readonly name: RuntimeName;
  readonly capabilities: Runtime['capabilities'];
  private readonly live = new Map<string, NsSandbox>();
  private readonly inFlight = new InFlight();
  private readonly layerRefs = new Map<string, number>();
  private readonly hostd: HostHelper;
  private readonly hooks: SandboxHooks;
  private prepared: Promise<void> | null = null;
  private startsPrepared: Promise<void> | null = null;
  /** Image layers the host helper has idmapped views of (templates add theirs on first use). */
  private readonly idmapped = new Set<string>();
  /** Where limits are enforced; null on hosts without a usable cgroup hierarchy (warned once). */
  private cgroups: Cgroups | null = null;
  /** The btrfs volume holding the sandboxes' directories (disk limits); null where unavailable. */
  private volume: DiskVolume | null = null;
  /** Set by a stop that keeps the sandboxes: the host helper is gone, nothing is removed any more. */
  private letGo = false;
  /** Ended sandboxes' directories, removed when nothing is being started. */
  private readonly trash: Trash;
  /** Fork children's holders started ahead of need (from the first fork on). */
  private readonly spares: SpareHolders;
  /** Spawn areas being made (see makeSpawnArea). */
  private readonly spawnAreas = new WeakMap<NsSandbox, Promise<void>>();
  /** Checkpoints held inside the sandboxes (held-checkpoints.ts). */
  readonly heldCheckpoints: NsHeldCheckpoints;
  /** The removal of what an earlier server left, going on behind the start (reconcile). */
  private leftovers: Promise<void> = Promise.resolve();

  constructor(private readonly opts: NamespaceRuntimeOptions) {
    this.name = opts.name;
    this.capabilities = { fork: true, freeze: false, egress: true, egressPolicy: opts.egress !== undefined, limits: true, zygote: true, templates: true, outlivesServer: true };
    this.hostd = new HostHelper({ ...opts.hostHelper, log: opts.log });
    this.trash = new Trash(trashDir(opts.stateDir), (tree) => this.hostd.removeTree(tree));
    this.spares = new SpareHolders({
      stateDir: opts.stateDir, uid: opts.uidBase, timeoutMs: opts.startTimeoutMs, count: opts.spareHolders ?? 6, spawner: opts.spawner,
      watchServer: opts.watchServer === true, log: opts.log,
    });
    for (const d of [opts.stateDir, ...opts.lowerDirs]) assertMountablePath(d);
    this.heldCheckpoints = new NsHeldCheckpoints({
      hostd: this.hostd, log: opts.log, uidBase: opts.uidBase, spawnArea: SPAWN_AREA,
      freezeUpper: (s) => this.freezeUpper(s), retainLayer: (l) => this.retainLayer(l), releaseLayer: (l) => this.releaseLayer(l),
      saveRecord: (s) => this.saveRecord(s), busy: (work) => this.busy(work),
    });
    this.hooks = {
      log: opts.log,
      setDiskLimit: async (dir, bytes) => {
        if (this.volume && !this.letGo) await this.hostd.diskLimit(dir, bytes);
      },
      // After a stop that kept the sandboxes (the host helper is closed), a sandbox ended late (a
      // pool start that finished during the stop) leaves its directory to the next server's reconcile.
      removeDir: async (dirs) => { if (!this.letGo) await this.trash.throwAway(dirs); },
      diagnostics: (s) => holderLogTail(opts.stateDir, s.id),
      onHusk: (s) => void this.saveRecord(s).catch(() => undefined),
      onFinalized: (s) => {
        this.live.delete(s.id);
        void removeHolderFiles(opts.stateDir, s.id);
        for (const layer of s.lowers) void this.releaseLayer(layer).catch(() => undefined);
      },
    };
  }

  /** The sandboxes' seccomp filter, compiled once per runtime (host/podflare_seccomp.py). */
  private get seccompFile(): string {
    return path.join(this.opts.stateDir, 'seccomp.bpf');
  }

  /**
   * Where earlier versions kept fork layers (now in their sandboxes' directories): removed at start
   * and stop, and kept (empty) for tools that look there.
   */
  private get layersDir(): string {
    return this.volume ? path.join(sandboxesDir(this.opts.stateDir), '.layers') : path.join(this.opts.stateDir, 'layers');
  }

  /** A fork layer of ours (not an image layer): `<sandboxes>/<id>/layers/fork-*`. */
  private isForkLayer(layer: string): boolean {
    const rel = path.relative(sandboxesDir(this.opts.stateDir), layer).split(path.sep);
    return rel.length === 3 && rel[1] === 'layers' && rel[2]!.startsWith('fork-');
  }

  /**
   * Once per runtime, what adopting sandboxes needs (at once: a restart waits for it): the disk
   * volume, a state directory that bwrap (running as the sandboxes' unprivileged uid) may walk
   * through to reach a sandbox's root — search permission only, no listing —, the holders'
   * directory, the cgroups. What starts need besides is prepareStarts().
   */
  private prepare(): Promise<void> {
    this.prepared ??= settleAll([
      this.prepareDirs(),
      prepareHoldersDir(this.opts.stateDir),
      this.detectCgroups().then((found) => { this.cgroups = found; }),
    ]);
    this.prepared.catch(() => { this.prepared = null; });
    return this.prepared;
  }

  /**
   * What only starts and forks need besides prepare(): the host helper's idmapped views of the
   * image layers and the seccomp filter (a process or two each). A restart's adoption does not
   * wait for them: reconcile() sets them off, and busy() waits for them.
   */
  private prepareStarts(): Promise<void> {
    this.startsPrepared ??= this.prepare().then(() => settleAll([
      this.hostd.idmap(this.opts.uidBase, ID_COUNT, this.opts.lowerDirs).then(() => { for (const d of this.opts.lowerDirs) this.idmapped.add(d); }),
      run('/usr/bin/python3', ['-I', SECCOMP_POLICY, this.seccompFile]),
    ]));
    this.startsPrepared.catch(() => { this.startsPrepared = null; });
    return this.startsPrepared;
  }

  /** The disk volume, and the sandboxes' directories in it (see prepare). */
  private async prepareDirs(): Promise<void> {
    const sandboxes = sandboxesDir(this.opts.stateDir);
    this.volume = await DiskVolume.open({ stateDir: this.opts.stateDir, mountPoint: sandboxes, sizeBytes: this.opts.diskVolumeBytes, log: this.opts.log });
    await mkdir(sandboxes, { recursive: true }); // without the volume, a plain directory
    await Promise.all([mkdir(trashDir(this.opts.stateDir), { recursive: true }), mkdir(this.layersDir, { recursive: true })]);
    for (const dir of [this.opts.stateDir, sandboxes]) {
      const mode = (await stat(dir)).mode & 0o7777;
      if ((mode & 0o001) === 0) await chmod(dir, mode | 0o001);
    }
  }

  private async detectCgroups(): Promise<Cgroups | null> {
    const scope = createHash('sha256').update(path.resolve(this.opts.stateDir)).digest('hex').slice(0, 12);
    const found = await detectCgroups(scope);
    if (!found) this.opts.log.warn('no usable cgroup hierarchy: memory, CPU and process limits are not enforced');
    return found;
  }

  /**
   * After a crash of an earlier server on this state directory: nothing can be re-adopted (see
   * reconcile.ts), so everything its sandboxes left is removed: the processes in their cgroups and
   * elsewhere, host mounts, their directories and fork layers.
   */
  async reconcile(knownIds: string[]): Promise<ReconcileReport<NsSandbox>> {
    const t0 = performance.now();
    await this.prepare();
    this.inFlight.background(this.prepareStarts());
    const t1 = performance.now();
    const adopted = await this.adoptHeld();
    const t2 = performance.now();
    const keep = new Set(this.live.keys());
    // Holders of sandboxes not adopted (dead, or of another protocol) that have a record: killed
    // now (bwrap dies with its holder), so none of them runs once the server listens.
    const { stray, unrecorded } = await killStrayHolders(this.opts.stateDir, keep);
    const unknown = knownIds.filter((id) => !keep.has(id));
    // The rest (passes over the process table, cgroups, mounts, directories) is done behind the
    // start: the adopted sandboxes answer meanwhile, and starts and forks wait for it (busy()).
    this.leftovers = this.removeWhatIsLeft(unknown, keep, stray.length > 0, unrecorded);
    this.inFlight.background(this.leftovers);
    if (adopted.length) {
      this.opts.log.info('adopted the previous server\'s sandboxes', {
        sandboxes: adopted.length, prepareMs: Math.round(t1 - t0), adoptMs: Math.round(t2 - t1), strayMs: Math.round(performance.now() - t2),
      });
    }
    return { adopted, cleaned: unknown };
  }

  /**
   * Removes what the sandboxes of an earlier server that were not adopted (`keep`) left: holders
   * without a record (their server died while starting them), holder files, cgroups, processes,
   * host mounts, directories and fork layers. Never throws: what fails is logged, and the next
   * start tries again.
   */
  private async removeWhatIsLeft(unknown: string[], keep: ReadonlySet<string>, strayFound: boolean, unrecorded: ReadonlySet<string>): Promise<void> {
    const t0 = performance.now();
    // Adopted sandboxes ending meanwhile empty the trash too: a tree gone under us is not a failure.
    const removeTree = (tree: string) => this.hostd.removeTree(tree).catch(async (err: unknown) => {
      if (await stat(tree).then(() => true, () => false)) throw err;
    });
    try {
      await killUnrecordedHolders(this.opts.stateDir, unrecorded);
      await removeStrayHolderFiles(this.opts.stateDir, keep);
      // Groups of sandboxes a crashed server left: their processes are killed with them.
      await this.cgroups?.cleanupOrphans((id) => keep.has(id) || this.live.has(id));
      const t1 = performance.now();
      // The pass over the process table is for sandboxes that were not adopted: skipped when every
      // one was (the usual restart).
      const others = (await readdir(sandboxesDir(this.opts.stateDir)).catch(() => [] as string[])).filter((n) => !n.startsWith('.') && !keep.has(n));
      const clean = unknown.length === 0 && others.length === 0 && !strayFound && unrecorded.size === 0;
      const left = clean
        ? { sandboxes: [], killed: [], unmounted: [], removed: await this.emptyTrash(removeTree) }
        : await removeLeftovers(this.opts.stateDir, this.layersDir, unknown, removeTree, keep);
      const oldLayers = path.join(this.opts.stateDir, 'layers'); // from a run without the volume
      if (oldLayers !== this.layersDir) await removeTree(oldLayers);
      if (left.killed.length || left.unmounted.length || left.removed.length) {
        this.opts.log.info('removed what the previous server left', {
          sandboxes: left.sandboxes.length, killed: left.killed.length, unmounted: left.unmounted.length, removed: left.removed.length,
          cgroupsMs: Math.round(t1 - t0), leftoversMs: Math.round(performance.now() - t1),
        });
      }
    } catch (err) {
      this.opts.log.warn('could not remove all that the previous server left (the next start tries again)', { error: (err as Error).message });
    }
  }

  start(spec: SandboxSpec): Promise<NsSandbox> {
    return this.busy(() => this.startRoot(spec));
  }

  fork(parent: NsSandbox, specs: SandboxSpec[], opts: ForkOptions = {}): Promise<NsSandbox[]> {
    return this.busy(() => this.forkChildren(parent, specs, opts));
  }

  /** A start or fork: tracked (close waits for it), and the trash is not emptied around it. */
  private busy<T>(work: () => Promise<T>): Promise<T> {
    this.trash.touch();
    // Not before what the previous server left is removed: that removal spares only the sandboxes
    // it adopted, not one made meanwhile.
    return this.inFlight.track(async () => {
      await this.leftovers;
      await this.prepareStarts();
      return work();
    }).finally(() => this.trash.touch());
  }

  /** Host helper workers replaced so far, by reason (the podflare_host_helper_restarts_total metric). */
  hostHelperRestarts(): ReturnType<HostHelper['restarts']> {
    return this.hostd.restarts();
  }

  async attachNetwork(s: NsSandbox): Promise<void> {
    if (!s.initPid || s.ended) throw new SandboxError('sandbox_gone', `sandbox ${s.id} is gone`);
    if (s.slirp) return;
    const slirp = await startSlirp(this.opts.spawner, s.initPid, this.opts.startTimeoutMs);
    if (s.ended) slirp.stop();
    else s.slirp = slirp;
  }

  /** A template's layer from a live sandbox's files (template-layer.ts). */
  saveTemplateLayer(s: NsSandbox, target: string, bounds: TemplateLayerBounds): Promise<{ layers: string[]; bytes: number }> {
    const deps = { hostd: this.hostd, uidBase: this.opts.uidBase, idCount: ID_COUNT, agentLayer: this.opts.lowerDirs[0]!, isForkLayer: (l: string) => this.isForkLayer(l) };
    return saveTemplateLayer(deps, s, target, bounds);
  }

  async diff(a: NsSandbox, b: NsSandbox, opts: DiffOptions): Promise<FileDiff> {
    return this.hostd.diff(a.stack, b.stack, opts);
  }

  async close(opts: CloseOptions = {}): Promise<void> {
    // Starts in flight finish (or fail) first, so none of them leaves a mount behind.
    await this.inFlight.close();
    await this.spares.close(); // they hold nothing
    // Nothing to keep: a full stop (the disk volume unmounted, nothing left behind).
    if (opts.keepSandboxes && this.live.size > 0) return this.letGoOfSandboxes();
    // Children first: a parent with live children would only become a husk.
    const byDepth = [...this.live.values()].sort((x, y) => y.depth - x.depth);
    for (const s of byDepth) await s.destroy();
    // Every sandbox is gone: no fork layer is in use any more (their refcounted removals may
    // still be in flight).
    await this.hostd.removeTree(this.layersDir);
    await this.trash.close();
    await this.hostd.removeTree(trashDir(this.opts.stateDir));
    await this.cgroups?.close();
    this.hostd.close();
    await this.volume?.close();
  }

  /** Removes what ended sandboxes of an earlier server left in the trash; what was removed. */
  private async emptyTrash(removeTree: (tree: string) => Promise<void>): Promise<string[]> {
    const dir = trashDir(this.opts.stateDir);
    const names = await readdir(dir).catch(() => [] as string[]);
    for (const name of names) await removeTree(path.join(dir, name));
    return names.map((n) => path.join(dir, n));
  }

  /**
   * A stop that keeps the sandboxes: each lives on under its holder (records written), only our
   * connections close. The disk volume, the cgroups, fork layers and directories stay as they are.
   */
  private async letGoOfSandboxes(): Promise<void> {
    this.letGo = true;
    const all = [...this.live.values()];
    await Promise.all(all.map((s) => s.ready?.catch(() => undefined)));
    for (const s of all) s.detach();
    this.live.clear();
    this.hostd.close();
    this.opts.log.info('sandboxes left running for the next server', { sandboxes: all.length });
  }

  /**
   * Takes over the sandboxes an earlier server left alive under their holders (holder.ts): parents
   * before children, each reconnected to its holder, its cgroups, slirp4netns and egress proxy
   * found again, and an exec it was running when that server died interrupted (nobody waits for
   * it any more). A sandbox whose agent speaks another protocol version is not adopted.
   */
  private async adoptHeld(): Promise<NsSandbox[]> {
    const adopted: NsSandbox[] = [];
    const records = (await loadHolderRecords(this.opts.stateDir)).sort((a, b) => a.depth - b.depth);
    const incompatible = records.filter((r) => !agentProtocolCompatible(r.agentProtocol));
    if (incompatible.length && this.opts.onIncompatible === 'refuse') {
      const list = incompatible.map((r) => `${r.spec.id} (agent protocol ${r.agentProtocol})`).join(', ');
      throw new IncompatibleSandboxesError(`${incompatible.length} live sandbox(es) of an earlier server speak an agent protocol this ` +
        `server (${AGENT_PROTOCOL}) cannot drive: ${list}. Start the earlier version again to let them finish, or start this one ` +
        'with --on-incompatible clean (PODFLARE_ON_INCOMPATIBLE=clean) to end them (they are recorded lost)');
    }
    const why = (id: string, reason: string) => this.opts.log.warn('a sandbox of the previous server cannot be adopted', { sandbox: id, reason });
    const takeOver = async (r: HolderRecord): Promise<NsSandbox | null> => {
      const id = r.spec.id;
      if (!agentProtocolCompatible(r.agentProtocol)) {
        why(id, `its agent speaks protocol ${r.agentProtocol}, incompatible with this server's ${AGENT_PROTOCOL} (another major version): it is ended and recorded lost`);
        return null;
      }
      const parent = r.parentId ? this.live.get(r.parentId) : null;
      if (r.parentId && !parent) return null; // its pid namespace was inside its parent's: gone with it
      const paths = holderPaths(this.opts.stateDir, id);
      const socket = await connectHolder(paths.socket, this.opts.startTimeoutMs).catch(() => null);
      if (!socket) return null; // the holder is gone, and so is its sandbox
      let spawnAreaReady: boolean;
      try {
        spawnAreaReady = await hasMount(r.initPid, SPAWN_AREA);
      } catch (err) {
        socket.destroy(); // not adopted: its holder is killed with the other strays
        why(id, `${(err as Error).message}: it is ended and recorded lost`);
        return null;
      }
      const dirs = sandboxDirs(this.opts.stateDir, id);
      const holder = { pid: r.holderPid, socket: paths.socket, watchable: r.watchable === true };
      // This server destroys its sandboxes at a stop: so must its death (the holder watches it from now on).
      if (this.opts.watchServer && holder.watchable) killIfStill(holder.pid, holder.socket, 'SIGUSR1');
      const s = parent ? new ForkedSandbox(r.spec, dirs, r.lowers, parent, socket, this.hooks) : new RootSandbox(r.spec, dirs, r.lowers, socket, holder, this.hooks);
      s.holder = holder;
      s.initPid = r.initPid;
      s.cgroup = r.cgroup && this.cgroups ? this.cgroups.existing(id) : null;
      if (r.slirpPid) s.slirp = adoptedSlirp(r.slirpPid, r.initPid, killIfStill);
      s.spawnAreaReady = spawnAreaReady;
      this.live.set(id, s);
      for (const l of r.lowers) this.retainLayer(l);
      // A husk (a zygote, or a deleted parent, with live children) stays for its children only.
      if (r.husk) {
        s.adoptAsHusk();
        return null;
      }
      return s;
    };
    // Generation by generation (a child needs its parent's sandbox), each one at once.
    const taken: NsSandbox[] = [];
    for (const depth of [...new Set(records.map((r) => r.depth))]) {
      const level = await Promise.all(records.filter((r) => r.depth === depth).map(takeOver));
      taken.push(...level.filter((s): s is NsSandbox => s !== null));
    }
    // Then all are settled at once: proxies reopened, orphaned execs interrupted.
    await Promise.all(taken.map(async (s) => {
      try {
        if (isEgressPolicy(s.spec.egress)) await this.attachEgressPolicy(s, s.initPid!);
        const orphan = await interruptOrphanedExec(s, this.opts.startTimeoutMs + this.opts.interruptGraceMs);
        // The exec interrupted ends behind the listener: this sandbox's execs and forks wait for it
        // (ready), the others answer meanwhile. One that does not end is destroyed (recorded lost).
        if (orphan) {
          s.ready = orphan.over.catch((err: Error) => {
            why(s.id, `${err.message}: it is ended`);
            setImmediate(() => void s.destroy().catch(() => undefined)); // destroy() waits for ready
          });
        }
        void this.heldCheckpoints.forgetAll(s); // the previous server's checkpoints are nobody's now (not waited for)
        adopted.push(s);
      } catch (err) {
        why(s.id, (err as Error).message);
        await s.destroy();
      }
    }));
    return adopted;
  }

  private agentEnv(spec: SandboxSpec): Record<string, string> {
    return {
      PATH: SANDBOX_PATH,
      HOME: '/root',
      LANG: 'C.UTF-8',
      PODFLARE_SANDBOX_ID: spec.id,
      PODFLARE_INTERRUPT_GRACE_MS: String(this.opts.interruptGraceMs),
      // Large allocations on transparent huge pages: a fork copies far fewer page-table entries.
      GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1',
      // A forked interpreter keeps only the forking thread: keep BLAS single-threaded.
      OPENBLAS_NUM_THREADS: '1',
      // With an allowlist the proxy is the only way out: point programs at it.
      ...(isEgressPolicy(spec.egress) ? proxyEnvironment() : {}),
      ...spec.env,
    };
  }

  /** A sandbox's directory: on the disk volume, a subvolume holding at most its disk limit. */
  private async makeSandboxDir(dirs: SandboxDirs, spec: SandboxSpec): Promise<void> {
    if (!this.volume) return void (await mkdir(dirs.dir, { recursive: true }));
    await this.hostd.subvolume(dirs.dir, spec.limits.diskBytes).catch((err: Error) => {
      if (!isOutOfSpace(err)) throw err;
      throw new SandboxError('insufficient_storage', 'the server\'s disk volume is full: no room for a new sandbox (its other sandboxes must free space first)');
    });
  }

  /**
   * A sandbox's own layer: its top directory is the root directory inside, owned by sandbox root.
   * Beside it, where its fork layers will go (made now: a fork does not wait for it).
   */
  private async makeUpper(dirs: SandboxDirs): Promise<void> {
    const layers = path.join(dirs.dir, 'layers');
    await Promise.all([mkdir(dirs.upper, { recursive: true }), mkdir(dirs.work, { recursive: true }), mkdir(layers, { recursive: true })]);
    await chown(dirs.upper, this.opts.uidBase, this.opts.uidBase);
  }

  private async mountOverlay(dirs: SandboxDirs, lowers: string[]): Promise<void> {
    await Promise.all([this.makeUpper(dirs), mkdir(dirs.root, { recursive: true })]);
    await this.hostd.overlay(null, { lowers, upper: dirs.upper, work: dirs.work, target: dirs.root });
  }

  private async unmount(dirs: SandboxDirs): Promise<void> {
    await this.hostd.unmount(dirs.root).catch((e: Error) => this.opts.log.warn('unmount failed', { path: dirs.root, error: e.message }));
  }

  private async startRoot(spec: SandboxSpec): Promise<NsSandbox> {
    await this.prepareStarts();
    const dirs = sandboxDirs(this.opts.stateDir, spec.id);
    const lowers = await this.templateLowers(spec.template);
    await this.makeSandboxDir(dirs, spec);
    await this.mountOverlay(dirs, lowers);
    if (this.inFlight.closed) {
      await this.unmount(dirs);
      await this.trash.throwAway(dirs);
      throw new Error('the runtime is shut down');
    }
    const args = bwrapArgs({ root: dirs.root, hostname: spec.hostname, env: this.agentEnv(spec), infoFd: 4, userNsBlockFd: 5, seccompFd: 6, command: AGENT_COMMAND });
    const seccomp = await open(this.seccompFile, 'r');
    // `nice` execs bwrap in place (same pid), so everything the sandbox starts inherits the priority.
    const command = spec.background ? ['nice', '-n', String(BACKGROUND_NICE), 'bwrap', ...args] : ['bwrap', ...args];
    // bwrap runs under the sandbox's holder (holder.ts), which outlives this server. 4 bwrap's
    // info, 5 the go-ahead once the user namespace's id maps are written, 6 the seccomp filter;
    // the holder gives bwrap the agent's channel at fd 3. bwrap itself, and everything in the
    // sandbox, run as the unprivileged range (the holder drops to it), never as host root.
    let started: Awaited<ReturnType<typeof startHolder>>;
    try {
      started = await startHolder({
        stateDir: this.opts.stateDir, id: spec.id, uid: this.opts.uidBase, command, timeoutMs: this.opts.startTimeoutMs, watchServer: this.opts.watchServer,
        extraStdio: ['pipe', 'pipe', seccomp.fd],
      });
    } catch (err) {
      await this.unmount(dirs);
      await this.trash.throwAway(dirs);
      await removeHolderFiles(this.opts.stateDir, spec.id);
      throw err;
    } finally {
      await seccomp.close(); // bwrap has its own copy
    }
    const holder = started.child;
    const sandbox = new RootSandbox(spec, dirs, lowers, started.socket, { pid: started.pid, socket: holderPaths(this.opts.stateDir, spec.id).socket }, this.hooks);
    this.live.set(spec.id, sandbox);
    try {
      const info = await readInfo(holder.stdio[4] as Readable, this.opts.startTimeoutMs);
      sandbox.initPid = info.childPid;
      // Into its groups before it runs anything: all it starts inherits them.
      if (this.cgroups) {
        sandbox.cgroup = await this.cgroups.create(spec.id, spec.limits);
        await sandbox.cgroup.add(info.childPid);
      }
      await this.mapIds(info.childPid, (holder.stdio as unknown as Writable[])[5]!);
      // Attach the network only once the agent runs: bwrap configures the namespace's loopback
      // before it execs the agent, and slirp4netns racing with that makes bwrap fail.
      await sandbox.channel.waitHello(this.opts.startTimeoutMs);
      if (spec.egress === true) sandbox.slirp = await startSlirp(this.opts.spawner, info.childPid, this.opts.startTimeoutMs, { outliveServer: true });
      else if (isEgressPolicy(spec.egress)) await this.attachEgressPolicy(sandbox, info.childPid);
      await this.unmount(dirs); // bwrap holds the root now
      if (spec.background) await sandbox.setPriority(0);
      await this.saveRecord(sandbox);
      return sandbox;
    } catch (err) {
      await this.unmount(dirs);
      await sandbox.destroy();
      throw err;
    }
  }

  /** The agent layer over the template's layers, each idmapped for the sandboxes once. */
  private async templateLowers(template: string): Promise<string[]> {
    if (!this.opts.layersFor) return this.opts.lowerDirs;
    return this.withAgentLayer(await this.opts.layersFor(template));
  }

  /** The agent layer over the given image layers, each idmapped for the sandboxes once. */
  private async withAgentLayer(layers: string[]): Promise<string[]> {
    const lowers = [this.opts.lowerDirs[0]!, ...layers];
    const fresh = lowers.filter((d) => !this.idmapped.has(d));
    if (fresh.length) {
      for (const d of fresh) assertMountablePath(d);
      await this.hostd.idmap(this.opts.uidBase, ID_COUNT, fresh);
      for (const d of fresh) this.idmapped.add(d);
    }
    return lowers;
  }

  /** What the next server needs to adopt `s` (holder.ts), written once it is fully started. */
  private async saveRecord(s: NsSandbox): Promise<void> {
    if (!s.holder || !s.initPid) return;
    await saveHolderRecord(this.opts.stateDir, {
      version: HOLDER_RECORD_VERSION, agentProtocol: AGENT_PROTOCOL, kind: s.parent ? 'fork' : 'root',
      spec: s.spec, holderPid: s.holder.pid, initPid: s.initPid, lowers: s.lowers, parentId: s.parent?.id ?? null,
      depth: s.depth, slirpPid: s.slirp?.pid ?? null, cgroup: s.cgroup !== null, husk: s.isHusk, watchable: s.holder.watchable !== false,
    });
  }

  private async forkChildren(parent: NsSandbox, specs: SandboxSpec[], opts: ForkOptions): Promise<NsSandbox[]> {
    if (!parent.initPid) throw new SandboxError('conflict', 'the sandbox is not running');
    if (parent.depth >= MAX_FORK_DEPTH) {
      throw new SandboxError('conflict', `fork chains are limited to ${MAX_FORK_DEPTH} generations (pid namespaces nest at most 32 deep)`);
    }
    const t0 = performance.now();
    const phase = (name: string) => this.opts.log.debug(`fork: ${name}`, { parent: parent.id, ms: Math.round((performance.now() - t0) * 10) / 10 });
    // The children's cgroups are made while the layer freezes (a v1 memory group takes a while),
    // and their moves into them made cheap (cgroups.ts, warmMoves).
    void parent.cgroup?.warmMoves(parent.initPid).catch(() => undefined);
    const cgroups = this.cgroups;
    const groups = cgroups ? Promise.all(specs.map((spec) => cgroups.create(spec.id, spec.limits).catch((e: Error) => e))) : null;
    const prepared: Array<{ spec: SandboxSpec; dirs: SandboxDirs; holder: ForkHolder; runDir: string; overlay?: number }> = [];
    const created: ForkedSandbox[] = [];
    let lowers: string[] = [];
    let forkedPids: number[] = [];
    let forking: Promise<{ pids: number[]; error?: string | null }> | undefined;
    let provenPids: (pids: number[]) => Promise<Map<number, number | null>> = async () => new Map();
    let making: Array<Promise<void>> = [];
    /** Settles once the fork layer is made (and retained) or has failed: what `finally` gives back. */
    let settledLayer: Promise<void> = Promise.resolve();
    /** Every child directory made, whatever step failed after it. */
    const madeDirs: SandboxDirs[] = [];
    let policies: Promise<Array<PromiseSettledResult<EgressListeners | null>>> | null = null;
    /** slirp4netns of a fork's only child, started before the child is a sandbox (stopped if it never becomes one). */
    let earlySlirp: Promise<Slirp> | null = null;
    const served = new Set<EgressListeners>();
    try {
      if (!parent.spawnAreaReady) await this.makeSpawnArea(parent);
      // The interpreter forks first: its children take their namespaces while the layer freezes
      // and their directories and roots are made; each then waits for its root (placed straight
      // into its own mount namespace below) and a signal before switching to it.
      // What proves the pids the agent will name: new since now, and no sandbox's already.
      const proof = { notBefore: bootTicksNow() - 1, known: new Set([...this.live.values()].map((s) => s.initPid).filter((p): p is number => p !== null)) };
      provenPids = (pids) => hostPidsOfForkChildren(parent.initPid!, pids, proof);
      forking = parent.channel.request({
        op: 'fork',
        children: specs.map((spec) => ({ id: spec.id, root: SPAWN_AREA, hostname: spec.hostname })),
      });
      forking.catch(() => undefined);
      void forking.then(() => phase('fork answered by the interpreter'), () => undefined);
      // Fresh files: the image's layers as they are (no fork layer to make, none to retain).
      const layers = opts.templateLayers ? this.withAgentLayer(opts.templateLayers)
        : opts.freshFiles ? Promise.resolve(parent.lowers.filter((l) => !this.isForkLayer(l))) : this.freezeUpper(parent);
      const layered = layers.then((l) => {
        lowers = l;
        for (const layer of l) this.retainLayer(layer);
        phase('layer frozen');
      });
      layered.catch(() => undefined);
      settledLayer = layered.catch(() => undefined);
      making = specs.map(async (spec) => {
        const dirs = sandboxDirs(this.opts.stateDir, spec.id);
        // The child's way back to us: a socket in a host directory bound at /.pf/run in its root.
        // The directory stays root's (search only for others): nothing in a sandbox can put
        // anything there, so removing it is two fixed names, never a walk.
        const runDir = path.join(dirs.dir, 'run');
        await this.makeSandboxDir(dirs, spec);
        madeDirs.push(dirs);
        phase('child directory made');
        await mkdir(runDir, { mode: RUN_DIR_MODE });
        await chmod(runDir, RUN_DIR_MODE); // whatever the umask
        // The child's holder (holder.ts) listens there for it, the socket owned by sandbox root
        // (the only peer uid it accepts), and relays its channel to us: the child outlives us.
        const accept = path.join(runDir, 'agent.sock');
        // A unix socket path holds at most 107 bytes: say so plainly, not as the holder's traceback.
        if (Buffer.byteLength(accept) > 107) {
          throw new SandboxError('conflict', `socket path too long for a unix socket: ${accept} (choose a shorter state directory)`);
        }
        const holder = (await this.spares.take(spec.id, accept)) ?? (await this.startForkHolder(spec.id, accept));
        const entry: (typeof prepared)[number] = { spec, dirs, holder, runDir };
        prepared.push(entry);
        phase('child holder started');
        await this.makeUpper(dirs);
        await layered;
        entry.overlay = await this.hostd.prepareOverlay({
          lowers, upper: dirs.upper, work: dirs.work, binds: [{ source: runDir, target: '/.pf/run' }],
        });
        phase('child root made');
      });
      await Promise.all(making);
      prepared.sort((a, b) => specs.indexOf(a.spec) - specs.indexOf(b.spec));
      phase('roots made');
      const answer = await forking;
      phase('interpreter forked');
      const hostPids = await provenPids(answer.pids);
      forkedPids = provenOnly(hostPids);
      if (answer.pids.length !== prepared.length) throw new Error(answer.error ?? 'the interpreter could not fork');
      const childPids = answer.pids.map((pid) => {
        const host = hostPids.get(pid);
        if (host) return host;
        if (host === undefined) throw new Error('a fork child ended before it could be set up (it died right after the fork)');
        // Not a child of this fork (a sibling sandbox's PID 1, any other process): nothing is ever
        // attached to, or killed on the word of, the agent alone.
        throw parent.channel.protocolViolation(`fork reply: pid ${pid} is not a child of this fork`);
      });
      // Each child joins its own groups before it is told its root is there: until that signal
      // it runs nothing and starts no process (agent/podflare_fork.py waits for it), so every
      // process it will ever have inherits its groups, and its limits hold from its first
      // instruction of user code. (cgroup v1 moves one process per write: a process started
      // before the move would stay in the parent's, or the zygote's, groups.)
      const joined = prepared.map(async (_p, i) => {
        const g = (await groups)?.[i];
        if (g instanceof Error) throw g;
        await g?.add(childPids[i]!);
        phase('child joined its cgroups');
        return g ?? null;
      });
      for (const j of joined) j.catch(() => undefined);
      // Each root goes straight into its child's own mount namespace (neither the host's nor the
      // parent's mount table ever shows it); the signal tells the child it is there.
      const grafted = Promise.all(prepared.map(async (p, i) => {
        const handle = p.overlay!;
        p.overlay = undefined;
        await Promise.all([
          this.hostd.attachOverlay(handle, childPids[i]!, SPAWN_AREA).then(() => phase('child root attached'), (e: Error) => { throw refusedBySandbox(e); }),
          joined[i],
        ]);
        process.kill(childPids[i]!, ROOT_READY_SIGNAL);
      }));
      grafted.catch(() => undefined);
      // The only child of a fork (a pool miss, a fork(1)) gets its network now, while its root
      // is placed: its first request waits for it. Its namespace (loopback up) exists since it
      // answered. With siblings, slirp4netns starts once they have answered (see below).
      if (prepared.length === 1 && prepared[0]!.spec.egress === true) {
        earlySlirp = startSlirp(this.opts.spawner, childPids[0]!, this.opts.startTimeoutMs, { outliveServer: true });
        earlySlirp.catch(() => undefined);
      }
      // A child with an allowlist gets a proxy of its own (same policy, its own events).
      policies = Promise.allSettled(prepared.map((p, i) => (isEgressPolicy(p.spec.egress) ? openEgressListeners(childPids[i]!, this.opts.startTimeoutMs) : null)));
      await grafted;
      phase('roots grafted');
      const ownGroups = await Promise.all(joined);
      for (const [i, p] of prepared.entries()) {
        const child = new ForkedSandbox(p.spec, p.dirs, lowers, parent, p.holder.socket, this.hooks);
        p.holder.socket.resume(); // a spare's was paused after its assignment (spare-holders.ts)
        child.holder = { pid: p.holder.pid, socket: holderPaths(this.opts.stateDir, p.spec.id).socket };
        child.cgroup = ownGroups[i]!;
        for (const l of lowers) this.retainLayer(l);
        this.live.set(p.spec.id, child);
        created.push(child);
        child.initPid = childPids[i]!;
      }
      phase('children connected');
      const listened = await policies;
      created.forEach((c, i) => {
        const r = listened[i]!;
        if (r.status === 'fulfilled' && r.value) {
          this.serveEgressPolicy(c, r.value);
          served.add(r.value);
        }
      });
      const failed = listened.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason; // the children (and the proxies attached) are destroyed below
      await Promise.all(created.map((c) => c.channel.waitHello(this.opts.startTimeoutMs)));
      phase('children answered');
      // Finishing after the fork has answered, each child's first request waits for its network
      // (`ready`): slirp4netns takes milliseconds to configure the child's tap device. It starts
      // only now: its start-up would take CPU from the children still forking.
      for (const [i, c] of created.entries()) {
        const slirping = earlySlirp ?? (c.spec.egress === true ? startSlirp(this.opts.spawner, childPids[i]!, this.opts.startTimeoutMs, { outliveServer: true }) : null);
        earlySlirp = null; // the child's now: stopped with it
        const network = (slirping ?? Promise.resolve(null)).then((slirp) => {
          if (slirp && c.ended) slirp.stop();
          else c.slirp = slirp;
        }, (e: Error) => {
          if (c.ended) return;
          this.opts.log.warn('a fork child could not get its network; it is closed', { sandbox: c.id, error: e.message });
          void c.destroy();
        });
        // A process the child started before it joined (only code of the parent's, which ran in
        // the interpreter it was forked from, could make it) joins too.
        const grouping = c.cgroup ? joinStragglers(c.cgroup, c.initPid!).catch((e: Error) => {
          if (c.ended) return;
          this.opts.log.warn('a fork child\'s processes could not all join its cgroups; it is closed', { sandbox: c.id, error: e.message });
          void c.destroy();
        }) : Promise.resolve();
        c.ready = Promise.all([network, grouping]).then(() => this.saveRecord(c)).catch((e: Error) => {
          this.opts.log.warn('a fork child\'s holder record could not be written: it will not survive a restart', { sandbox: c.id, error: e.message });
        });
      }
      return created;
    } catch (err) {
      // Listening sockets nobody serves would keep the children's network namespaces alive.
      for (const r of policies ? await policies : []) if (r.status === 'fulfilled' && r.value && !served.has(r.value)) closeEgressListeners(r.value);
      (await earlySlirp?.catch(() => null))?.stop();
      await Promise.all(created.map((c) => c.destroy()));
      // Children that never became sandboxes: they wait for a root that will not come.
      if (!forkedPids.length && parent.initPid) {
        const late = await forking?.catch(() => null);
        if (late?.pids.length) forkedPids = provenOnly(await provenPids(late.pids).catch(() => new Map()));
      }
      for (const pid of forkedPids) if (!created.some((c) => c.initPid === pid)) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      await Promise.allSettled(making); // every child's directories and root, made or failed
      for (const p of prepared) if (p.overlay !== undefined) await this.hostd.discardOverlay(p.overlay).catch(() => undefined);
      for (const p of prepared) {
        if (created.some((c) => c.id === p.spec.id)) continue;
        p.holder.socket.destroy();
        p.holder.kill();
        await removeHolderFiles(this.opts.stateDir, p.spec.id);
      }
      for (const dirs of madeDirs) await this.trash.throwAway(dirs);
      for (const g of (await groups) ?? []) if (!(g instanceof Error)) await g.remove().catch(() => undefined);
      // Deleted while it forked: its files went away under the copy, which is no server fault.
      if (parent.ended && !(err instanceof SandboxError)) throw new SandboxError('sandbox_gone', `sandbox ${parent.id} was deleted while it forked`);
      throw err;
    } finally {
      // A fork failing early (a child's directory refused, the interpreter gone) may not have
      // waited for its layer yet: wait, so the layer is given back rather than left behind.
      await settledLayer;
      for (const l of lowers) void this.releaseLayer(l);
      for (const p of prepared) {
        // Not waited for: the children have connected (or are gone), nothing uses it any more.
        void removeRunDir(p.runDir);
      }
    }
  }

  /**
   * A parent's spawn area, made once even for forks at once (a zygote's misses beside its
   * refills). Remembered only while it is being made: a restore loses it (spawnAreaReady).
   */
  private makeSpawnArea(parent: NsSandbox): Promise<void> {
    let made = this.spawnAreas.get(parent);
    if (!made) {
      made = this.hostd.tmpfs(parent.initPid!, SPAWN_AREA, this.opts.uidBase)
        .then(() => { parent.spawnAreaReady = true; }, (e: Error) => { throw refusedBySandbox(e); })
        .finally(() => this.spawnAreas.delete(parent));
      this.spawnAreas.set(parent, made);
    }
    return made;
  }

  /** A fork child's holder started for it (no spare was ready). */
  private async startForkHolder(id: string, accept: string): Promise<ForkHolder> {
    const h = await startHolder({
      stateDir: this.opts.stateDir, id, uid: this.opts.uidBase, accept, timeoutMs: this.opts.startTimeoutMs, watchServer: this.opts.watchServer,
    });
    return { pid: h.pid, socket: h.socket, kill: () => h.child.kill('SIGKILL') };
  }

  /** Egress through the policy proxy: listeners in the sandbox's network namespace, served here. */
  private async attachEgressPolicy(sandbox: NsSandbox, pid: number): Promise<void> {
    if (!this.opts.egress) throw new SandboxError('bad_request', 'this server does not enforce egress allowlists', { field: 'egress' });
    this.serveEgressPolicy(sandbox, await openEgressListeners(pid, this.opts.startTimeoutMs));
  }

  private serveEgressPolicy(sandbox: NsSandbox, listeners: EgressListeners): void {
    if (!isEgressPolicy(sandbox.spec.egress) || !this.opts.egress) throw new Error('no egress policy to serve');
    const proxy = this.opts.egress.attach(sandbox.id, sandbox.spec.egress, listeners);
    void sandbox.exited.then(() => proxy.close());
  }

  /**
   * Writes the id maps of a new sandbox's user namespace (root inside = uidBase on the host, 65536
   * ids), then lets bwrap go on. bwrap, unprivileged, could only map its own single uid.
   */
  private async mapIds(pid: number, goAhead: Writable): Promise<void> {
    const map = `0 ${this.opts.uidBase} ${ID_COUNT}\n`;
    await writeFile(`/proc/${pid}/uid_map`, map);
    await writeFile(`/proc/${pid}/gid_map`, map);
    await new Promise<void>((resolve, reject) => goAhead.end('1', () => resolve()).once('error', reject));
  }

  /**
   * The children's lower layers: the parent's upper copied into a new read-only fork layer (the
   * parent keeps writing to its own), over the parent's lowers. Past MAX_STACKED_FORK_LAYERS fork
   * layers the chain is squashed into that one new layer, so a deep chain costs one lookup.
   */
  private async freezeUpper(parent: NsSandbox): Promise<string[]> {
    // In the parent's own directory (its subvolume on the disk volume): the layer counts against
    // the parent's disk limit (see the top of this file).
    const layers = path.join(parent.dirs.dir, 'layers');
    const layer = path.join(layers, `fork-${randomBytes(8).toString('hex')}`);
    const forkLayers = parent.lowers.filter((l) => this.isForkLayer(l));
    const squashed = forkLayers.length < MAX_STACKED_FORK_LAYERS ? [] : forkLayers;
    try {
      await this.hostd.squashLayers([parent.dirs.upper, ...squashed], layer);
    } catch (err) {
      await this.hostd.removeTree(layer).catch(() => undefined); // what was copied before the failure
      if (isOutOfSpace(err as Error)) {
        throw new SandboxError('insufficient_storage', `sandbox ${parent.id} has no disk space left for its fork layer (a copy of its files, counted against its disk limit): free space in it first`);
      }
      throw err;
    }
    return [layer, ...parent.lowers.filter((l) => !squashed.includes(l))];
  }

  private retainLayer(layer: string): void {
    if (!this.isForkLayer(layer)) return; // image layers are not ours to remove
    this.layerRefs.set(layer, (this.layerRefs.get(layer) ?? 0) + 1);
  }

  private async releaseLayer(layer: string): Promise<void> {
    const n = this.layerRefs.get(layer);
    if (n === undefined) return;
    if (n > 1) return void this.layerRefs.set(layer, n - 1);
    this.layerRefs.delete(layer);
    if (this.letGo) return;
    await this.hostd.removeTree(layer);
  }
}

/** A host helper's OSError for a full quota (EDQUOT, errno 122) or a full volume (ENOSPC, 28). */
function isOutOfSpace(err: Error): boolean {
  return /\[Errno (122|28)\]/.test(err.message);
}

/** The host helper refused because of what the sandbox did (a planted /.pf): a 409 that says so. */
function refusedBySandbox(err: Error): Error {
  const said = /SandboxRefused: (.*)$/s.exec(err.message);
  return said ? new SandboxError('conflict', said[1]!) : err;
}

/** A fork's run directory: root's, search-only for others (the sandbox connects to its socket). */
const RUN_DIR_MODE = 0o711;

/** Removes a fork's run directory: only the server ever writes there (see RUN_DIR_MODE). */
async function removeRunDir(runDir: string): Promise<void> {
  await rm(path.join(runDir, 'agent.sock'), { force: true }).catch(() => undefined);
  await rmdir(runDir).catch(() => undefined);
}

/**
 * Moves the processes of a fork child's tree that are not in its groups into them, again until
 * none is left (one may start another while it is moved). Its PID 1 joined before it ran
 * anything, so normally there is none.
 */
async function joinStragglers(group: SandboxCgroup, init: number): Promise<void> {
  for (let round = 0; round < 10; round++) {
    const members = new Set(await group.processes());
    const strays = (await processTree(init)).filter((pid) => !members.has(pid));
    if (strays.length === 0) return;
    await Promise.all(strays.map((pid) => group.add(pid).catch(() => undefined))); // ended meanwhile: gone from the tree
  }
  throw new Error('processes kept appearing outside the sandbox\'s cgroups');
}

/** The host pids proven to be a fork's children (see hostPidsOfForkChildren). */
function provenOnly(pids: Map<number, number | null>): number[] {
  return [...pids.values()].filter((p): p is number => p !== null);
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

/** Runs independent steps at once; rejects with the first failure once all have settled (none is left running). */
async function settleAll(steps: Array<Promise<unknown>>): Promise<void> {
  const failed = (await Promise.allSettled(steps)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}
