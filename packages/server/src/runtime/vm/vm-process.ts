/**
 * The processes of one VM: QEMU started unprivileged (as the VM's own uid, no capabilities), its
 * QMP connection, the agent channel on its virtio-serial port, and slirp4netns for a VM with
 * egress; and how they end. A template's QEMU dies with the server; a sandbox's is `held`: it
 * outlives the server (a session of its own, no parent-death signal) with its agent and QMP
 * sockets where only root can reach them, so the next server reconnects (vm-held.ts).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { readdir, readFile, readlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { AgentChannel } from '../../agent-channel.js';
import type { VmImagePaths } from '../../image/vm-image.js';
import { SpawnedChild, type Spawner } from '../shared/spawner.js';
import { startSlirp, type Slirp } from '../shared/slirp.js';
import { qemuArgs, type Acceleration } from './qemu-args.js';
import { readRegular, type VmIdentity } from './vm-files.js';
import { QEMU_RAM_PATH, type SharedRam } from './shared-ram.js';
import { connectUnix, Qmp } from './qmp.js';

const QEMU = 'qemu-system-x86_64';
/** A console log is read whole for its last lines: a guest writing gigabytes gets no answer. */
const CONSOLE_LOG_READ_MAX = 16 * 1024 * 1024;
/** Pool fills: their VMs start at this nice, to leave the CPU to sandboxes in use. */
const BACKGROUND_NICE = 10;

/**
 * A VM's QEMU process: one this server's spawner started (SpawnedChild), or one an earlier server
 * left running that this one adopted (vm-held.ts's AdoptedQemu). `exit` is emitted once, when it ends.
 */
export interface QemuProcess {
  readonly pid: number | undefined;
  readonly exitCode: number | null;
  readonly signalCode: NodeJS.Signals | null;
  once(event: 'exit', listener: (code: number | null, signal: NodeJS.Signals | null) => void): this;
  on(event: 'stderr', listener: (text: string) => void): this;
  /** SIGKILL, unless it has ended. */
  kill(signal?: 'SIGKILL'): boolean;
}

/** Processes of one VM: its QEMU, its QMP connection and the agent channel. */
export interface VmProcess {
  qemu: QemuProcess;
  /** QEMU's last words on stderr (migration errors land here). */
  stderr(): string;
  /** Outbound network of the QEMU's own network namespace (egress only). */
  slirp: Slirp | null;
  qmp: Qmp;
  channel: AgentChannel;
  consoleLog: string;
}

/** What every VM of a runtime shares. */
export interface QemuHost {
  accel: Acceleration;
  memoryMb: number;
  /** /dev/kvm's group, given to QEMU when it uses KVM (null under TCG). */
  kvmGid: number | null;
  image(): Promise<VmImagePaths>;
  /** Starts QEMU and its slirp4netns (the server's spawner). */
  spawner: Spawner;
}

export interface LaunchOptions {
  /** Who QEMU runs as: the VM's own uid and gid, and the groups of the shared files it maps. */
  identity: VmIdentity;
  /** The VM's own directory (run/ of vm-files' vmDir), where QEMU makes its sockets. */
  runDir: string;
  /** Made by the server (vm-files' vmDir), written by QEMU. */
  consoleLog: string;
  disk: string;
  /** Its RAM: a file of its own, or shared RAM (a memfd, passed as an fd; sealed when shareRam is false). */
  ram: { file: string } | { shared: SharedRam };
  shareRam: boolean;
  network: boolean;
  /** A clone: waits for its state (migrate-incoming) instead of booting. */
  incoming: boolean;
  /** At BACKGROUND_NICE (the caller renices it once it is wanted). */
  background: boolean;
  /**
   * A sandbox's VM, which a later server can reconnect to: its agent and QMP sockets listening at
   * these paths (in a root-only directory, made by the spawner and passed to QEMU). With
   * `outliveServer` (`--on-stop keep`) QEMU is in a session of its own without a parent-death
   * signal, its slirp4netns detached too: it runs on when the server dies. Unset: a template's
   * QEMU, its sockets in its run directory.
   */
  held?: { agentSocket: string; qmpSocket: string; outliveServer: boolean };
}

/** Where a held QEMU gets its listening agent and QMP sockets (fd 3 may be its RAM). */
const HELD_AGENT_FD = 4;
const HELD_QMP_FD = 5;

/** The group of /dev/kvm, given to QEMU when it uses KVM (null under TCG). */
export function kvmGroup(accel: Acceleration): number | null {
  if (accel.kind !== 'kvm') return null;
  try {
    return statSync('/dev/kvm').gid;
  } catch {
    return null;
  }
}

/** Starts QEMU and connects to its QMP socket and to the agent's port (before the guest runs). */
export async function launchQemu(host: QemuHost, o: LaunchOptions, timeoutMs: number): Promise<VmProcess> {
  const agentSocket = o.held?.agentSocket ?? path.join(o.runDir, 'agent.sock');
  const qmpSocket = o.held?.qmpSocket ?? path.join(o.runDir, 'qmp.sock');
  const consoleLog = o.consoleLog;
  for (const p of [agentSocket, qmpSocket]) {
    if (Buffer.byteLength(p) > 107) throw new Error(`socket path too long for a unix socket: ${p} (choose a shorter state directory)`);
  }
  const image = await host.image();
  const args = qemuArgs({
    accel: host.accel, memoryMb: host.memoryMb, vmlinux: image.vmlinux, initrd: image.initrd,
    disk: o.disk, ramFile: 'file' in o.ram ? o.ram.file : QEMU_RAM_PATH, shareRam: o.shareRam, consoleLog, network: o.network, incoming: o.incoming,
    agentSocket: o.held ? { fd: HELD_AGENT_FD } : agentSocket, qmpSocket: o.held ? { fd: HELD_QMP_FD } : qmpSocket,
  });
  const groups = [...o.identity.groups, ...(host.kvmGid !== null ? [host.kvmGid] : [])];
  // setpriv --pdeathsig (unless it outlives the server): it dies with the server, whatever way the server ends.
  // unshare --net: QEMU's user-mode network opens its sockets in a network namespace of its
  // own, which reaches out only through slirp4netns with --disable-host-loopback: the guest
  // cannot reach the host's loopback (the API included) through 10.0.2.2. Without egress the
  // VM has no network device at all.
  const prefix = [
    ...(o.background ? ['nice', '-n', String(BACKGROUND_NICE)] : []),
    ...(o.network ? ['unshare', '--net', '--'] : []),
    // The VM's own uid with no capabilities at all, and none to regain; the groups of what it
    // shares (templates, fork layers), and /dev/kvm's where KVM is used.
    'setpriv', ...(o.held?.outliveServer ? [] : ['--pdeathsig', 'KILL']), '--no-new-privs', '--inh-caps=-all', '--bounding-set=-all',
    `--reuid=${o.identity.uid}`, `--regid=${o.identity.uid}`,
    ...(groups.length ? [`--groups=${groups.join(',')}`] : ['--clear-groups']), '--',
  ];
  // Started by the spawner: a fork of the server would block its event loop for milliseconds
  // per VM, five times over in a fork(5). SCHED_BATCH: a VM is CPU-bound (under TCG wholly so);
  // as a batch task its wake-ups do not preempt the server or other VMs, so several VMs on few
  // cores (a fork's children) take turns in longer slices, each running on a warmer cache
  // (measured: fork(5) ~4% faster on 2 cores), and the API stays responsive while they run.
  const fds: Array<[number, string]> = 'shared' in o.ram ? [o.ram.shared.passed] : [];
  const listening: string[] = [];
  let qemu: SpawnedChild;
  try {
    if (o.held) {
      // Bound by the spawner (root) in the root-only directory: QEMU gets them listening.
      const tag = `vm-${randomBytes(6).toString('hex')}`;
      const made = await Promise.allSettled([host.spawner.listenUnix(`${tag}.agent`, agentSocket), host.spawner.listenUnix(`${tag}.qmp`, qmpSocket)]);
      for (const m of made) if (m.status === 'fulfilled') listening.push(m.value.name);
      for (const m of made) if (m.status === 'rejected') throw m.reason;
      fds.push([HELD_AGENT_FD, `${tag}.agent`], [HELD_QMP_FD, `${tag}.qmp`]);
    }
    qemu = await SpawnedChild.start(host.spawner, [...prefix, QEMU, ...args], { batch: true, fds, detach: o.held?.outliveServer === true }).catch((e: Error) => {
      throw new Error(`cannot start QEMU: ${e.message}`);
    });
  } finally {
    // QEMU holds its own copies now (or failed to start): the spawner lets go of its.
    for (const name of listening) await host.spawner.closeMemfd({ name, path: '' }).catch(() => undefined);
  }
  let stderr = '';
  qemu.on('stderr', (text: string) => { stderr = (stderr + text).slice(-2000); });
  const exited = new Promise<never>((_, reject) => {
    qemu.once('exit', () => reject(new Error(`QEMU exited: ${stderr.trim().split('\n').slice(-3).join(' | ') || 'no message'}`)));
  });
  exited.catch(() => undefined);
  const alive = () => qemu.exitCode === null && qemu.signalCode === null;
  let network: Promise<Slirp | null> = Promise.resolve(null);
  try {
    const qmp = await Promise.race([Qmp.connect(qmpSocket, timeoutMs), exited]);
    // The template never needs the network: only clones get one. QMP answering means QEMU runs,
    // so `unshare --net` has happened: slirp4netns must attach to QEMU's namespace, never ours.
    if (o.network && o.incoming && qemu.pid) {
      const [theirs, ours] = await Promise.all([readlink(`/proc/${qemu.pid}/ns/net`), readlink('/proc/self/ns/net')]);
      if (theirs === ours) throw new Error('QEMU is not in a network namespace of its own');
      network = startSlirp(host.spawner, qemu.pid, timeoutMs, { ownUserNamespace: false, outliveServer: o.held?.outliveServer === true });
      network.catch(() => undefined);
    }
    // QMP answers once every device exists: connecting to the agent's port now makes the
    // guest see its host end open (connecting earlier can be missed by virtio-serial).
    const socket = await Promise.race([connectUnix(agentSocket, timeoutMs, alive), exited]);
    return { qemu, stderr: () => stderr.trim().split('\n').slice(-3).join(' | '), slirp: await network, qmp, channel: new AgentChannel(socket), consoleLog };
  } catch (err) {
    void network.then((s) => s?.stop(), () => undefined);
    await killAndWait(qemu);
    throw err;
  }
}

/** Resolves once `p` has exited; SIGKILLs it if it has not after `timeoutMs`. */
export function waitExit(p: QemuProcess, timeoutMs: number): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => { p.kill('SIGKILL'); }, timeoutMs);
    p.once('exit', () => { clearTimeout(timer); resolve(); });
  });
}

/** Ends a VM: its channels closed, its network and its QEMU gone. */
export async function stopVm(vm: VmProcess, reason: string): Promise<void> {
  vm.channel.close(reason);
  vm.qmp.close();
  vm.slirp?.stop();
  await killAndWait(vm.qemu);
}

async function killAndWait(p: QemuProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = waitExit(p, 60_000);
  p.kill('SIGKILL');
  await gone;
}

/** setpriority() is per thread on Linux: renice every thread of the process (vCPU threads too). */
export function setPriorityAll(pid: number, nice: number): void {
  void readdir(`/proc/${pid}/task`).then((tids) => {
    for (const tid of tids) {
      try { os.setPriority(Number(tid), nice); } catch { /* ended */ }
    }
  }, () => undefined);
}

/** The last lines the guest printed on its console (why it died, typically). */
export async function consoleTail(file: string): Promise<string> {
  try {
    // Written by QEMU: read as untrusted (no symlink, regular, bounded), only its end kept.
    const text = (await readRegular(file, CONSOLE_LOG_READ_MAX)).toString('utf8');
    return text.trim().split('\n').slice(-4).map((l) => l.trim()).join(' | ').slice(-600);
  } catch {
    return '';
  }
}

/** QEMU processes whose command line names a path under `dir` (left by a crashed server). */
export async function qemuPidsUnder(dir: string): Promise<number[]> {
  const pids: number[] = [];
  if (!existsSync(dir)) return pids;
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8');
      if (cmdline.startsWith(QEMU) || cmdline.includes(`/${QEMU}\0`)) {
        if (cmdline.includes(`${dir}/`)) pids.push(Number(name));
      }
    } catch { /* ended */ }
  }
  return pids;
}
