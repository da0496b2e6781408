/**
 * What lets a VM sandbox outlive the server, and the next server take it over: the VM's QEMU is
 * its own holder (like a namespace sandbox's holder, host/podflare_holder.py, or containerd's
 * shim): started in a session of its own with no parent-death signal, it is re-parented to init
 * when the server dies and runs on. Its agent's virtio-serial port and its QMP monitor are server
 * sockets QEMU keeps listening on: when one server's connection ends, QEMU accepts the next one's.
 *
 * Files, all in `<stateDir>/vm-held/` (root's, mode 0700: no sandbox uid, VM uid included, may
 * even look a name up in it; the sockets are bound there by root, mode 0600, and QEMU is handed
 * them already listening, so it never needs the directory):
 *   <id>.agent.sock  the agent's channel (the virtio-serial port's host end)
 *   <id>.qmp.sock    QEMU's monitor
 *   <id>.json        what the next server needs to take the VM over (HeldVmRecord), root's alone
 *
 * Only whole lines must reach either side. A server that dies may leave half a request in QEMU
 * (the guest agent then sees it glued to the next server's first line) and half an answer read
 * (the next server's stream may start mid-line): `resyncAgent` sends a newline (ending any half
 * request: the agent refuses it as malformed, answering nobody) and a ping of its own, and drops
 * everything the agent says before that ping's answer.
 */
import { randomInt } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import type { SandboxSpec } from '@podflare/runtime';
import { AgentChannel } from '../../agent-channel.js';
import type { VmImagePaths } from '../../image/vm-image.js';
import type { Spawner, SpawnedProcess } from '../shared/spawner.js';
import { connectUnix, Qmp } from './qmp.js';
import type { ProcessRef } from './vm-ids.js';

/** Version of HeldVmRecord's layout; a record of another version is not adopted. */
export const HELD_VM_RECORD_VERSION = 1;

/** What a server writes about a VM that may outlive it, for the next one to adopt it. */
export interface HeldVmRecord {
  version: number;
  /** The agent protocol version of the VM's agent (an upgrade checks it). */
  agentProtocol: string;
  spec: SandboxSpec;
  qemuPid: number;
  /** QEMU's start time (/proc/<pid>/stat, clock ticks since boot): its pid may be reused once it ends. */
  qemuStart: string;
  /** The VM's own uid; its groups (the VMs' group, and its fork layers' groups). */
  uid: number;
  groups: number[];
  /** Its template's directory (its disk's backing file is there) and what the template was made of. */
  templateDir: string;
  network: boolean;
  image: VmImagePaths;
  memoryMb: number;
  /** Fork layers under its disk, bottom first, each with its fork point's group. */
  layers: Array<{ file: string; gid: number }>;
  slirpPid: number | null;
  /** The sandbox it was forked from (lineage; the store has it too). */
  parentId: string | null;
}

export interface HeldVmPaths {
  agentSocket: string;
  qmpSocket: string;
  record: string;
}

export function heldVmDir(stateDir: string): string {
  return path.join(stateDir, 'vm-held');
}

export function heldVmPaths(stateDir: string, id: string): HeldVmPaths {
  const base = path.join(heldVmDir(stateDir), id);
  return { agentSocket: `${base}.agent.sock`, qmpSocket: `${base}.qmp.sock`, record: `${base}.json` };
}

/** The held VMs' directory: root's alone (0700), whatever the umask or an earlier mode. */
export async function prepareHeldVmDir(stateDir: string): Promise<void> {
  const dir = heldVmDir(stateDir);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
}

/** Writes a VM's record (atomically: a server killed mid-write leaves the old one or none). */
export async function saveHeldVmRecord(stateDir: string, record: HeldVmRecord): Promise<void> {
  const file = heldVmPaths(stateDir, record.spec.id).record;
  await writeFile(`${file}.tmp`, JSON.stringify(record), { mode: 0o600 });
  await rename(`${file}.tmp`, file);
}

/** Every VM record in the state directory (unreadable ones are skipped: their VMs are not adopted). */
export async function loadHeldVmRecords(stateDir: string): Promise<HeldVmRecord[]> {
  const dir = heldVmDir(stateDir);
  const out: HeldVmRecord[] = [];
  for (const name of (await readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.json'))) {
    try {
      const r = JSON.parse(await readFile(path.join(dir, name), 'utf8')) as HeldVmRecord;
      if (r.version === HELD_VM_RECORD_VERSION && `${r.spec.id}.json` === name) out.push(r);
    } catch { /* half written or foreign: not adopted */ }
  }
  return out;
}

/** Removes a VM's sockets and record (it has ended). */
export async function removeHeldVmFiles(stateDir: string, id: string): Promise<void> {
  const p = heldVmPaths(stateDir, id);
  await Promise.all([p.agentSocket, p.qmpSocket, p.record, `${p.record}.tmp`].map((f) => rm(f, { force: true }).catch(() => undefined)));
}

/** Removes every file of the held VMs' directory that is not of a VM in `keep`. */
export async function removeStrayHeldVmFiles(stateDir: string, keep: ReadonlySet<string>): Promise<void> {
  const dir = heldVmDir(stateDir);
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const id = name.replace(/\.(agent\.sock|qmp\.sock|json|json\.tmp)$/, '');
    if (!keep.has(id)) await rm(path.join(dir, name), { force: true }).catch(() => undefined);
  }
}

/** The start time of a live (not zombie) process, or null. */
export function processStart(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' ? null : (fields[19] ?? null);
  } catch {
    return null;
  }
}

/** How often an adopted QEMU (not our child: no exit event) is checked for its end. */
const ADOPTED_POLL_MS = 500;

/**
 * A QEMU an earlier server started, now this server's: known by pid and start time (so a reused
 * pid is never taken for it, nor killed). Its end is noticed by polling (it is init's child, not
 * ours), and at once when `check()` is called (its QMP connection closed).
 */
export class AdoptedQemu extends EventEmitter {
  exitCode: number | null = null;
  signalCode: NodeJS.Signals | null = null;
  private readonly timer: NodeJS.Timeout;

  constructor(readonly pid: number, private readonly start: string) {
    super();
    this.timer = setInterval(() => this.check(), ADOPTED_POLL_MS);
    this.timer.unref();
  }

  get alive(): boolean {
    return this.exitCode === null && this.signalCode === null;
  }

  /** Notices its end (once). */
  check(): void {
    if (!this.alive || processStart(this.pid) === this.start) return;
    clearInterval(this.timer);
    this.signalCode = 'SIGKILL'; // how it ended is its parent's (init's) to know; gone is what matters
    this.emit('exit', null, this.signalCode);
  }

  kill(): boolean {
    if (!this.alive) return false;
    if (processStart(this.pid) === this.start) {
      try { process.kill(this.pid, 'SIGKILL'); } catch { /* ended meanwhile */ }
    }
    // Reaped by init within moments: look sooner than the poll would.
    const soon = setInterval(() => { this.check(); if (!this.alive) clearInterval(soon); }, 20);
    soon.unref();
    return true;
  }

  /** Stops watching (the server lets go of it). */
  stopWatching(): void {
    clearInterval(this.timer);
  }
}

/** Longest stale output dropped before the resync ping's answer (a dead server's exec output). */
const RESYNC_MAX_BYTES = 64 * 1024 * 1024;

/**
 * Makes a freshly connected agent socket of an adopted VM start at a line boundary (see the top):
 * resolves once the agent has answered our ping, with everything it said before dropped and what
 * it said after pushed back for the agent channel to read: the socket is left paused, for its
 * next reader to resume.
 */
export function resyncAgent(socket: net.Socket, timeoutMs: number): Promise<void> {
  const id = randomInt(2 ** 40, 2 ** 47);
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    let seen = 0;
    const done = (err?: Error, rest?: Buffer) => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.pause();
      // What followed the answer is the agent channel's (read once it resumes the socket).
      if (rest?.length) socket.unshift(rest);
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => done(new Error('its agent does not answer')), timeoutMs);
    const onClose = () => done(new Error('its agent channel closed'));
    const onData = (chunk: Buffer) => {
      seen += chunk.length;
      buf = Buffer.concat([buf, chunk]);
      for (let nl = buf.indexOf(0x0a); nl >= 0; nl = buf.indexOf(0x0a)) {
        const line = buf.subarray(0, nl).toString('utf8');
        buf = buf.subarray(nl + 1);
        let msg: unknown = null;
        try { msg = JSON.parse(line); } catch { /* half a line of the dead server's */ }
        if (msg !== null && typeof msg === 'object' && (msg as { id?: unknown }).id === id) return done(undefined, buf);
      }
      if (seen > RESYNC_MAX_BYTES) done(new Error('its agent sent too much before answering'));
    };
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.write(`\n${JSON.stringify({ id, op: 'ping' })}\n`);
  });
}

/**
 * Reconnects to a VM an earlier server left running (its QEMU `qemu`, its sockets at `paths`):
 * QMP (a VM left paused by a fork the dead server never finished is continued) and the agent,
 * resynchronized. On failure its QEMU is killed and the error thrown.
 */
export async function reconnectVm(paths: HeldVmPaths, qemu: ProcessRef, timeoutMs: number): Promise<{ qemu: AdoptedQemu; qmp: Qmp; channel: AgentChannel }> {
  const proc = new AdoptedQemu(qemu.pid, qemu.start);
  let qmp: Qmp | null = null;
  let socket: net.Socket | null = null;
  try {
    qmp = await Qmp.connect(paths.qmpSocket, timeoutMs);
    const { status } = await qmp.command<{ status: string }>('query-status');
    if (status !== 'running') await qmp.command('cont');
    socket = await connectUnix(paths.agentSocket, timeoutMs);
    await resyncAgent(socket, timeoutMs);
  } catch (err) {
    qmp?.close();
    socket?.destroy();
    proc.kill();
    proc.stopWatching();
    throw err;
  }
  const channel = new AgentChannel(socket);
  socket.resume();
  qmp.once('closed', () => proc.check()); // QEMU closed its monitor: it is ending
  return { qemu: proc, qmp, channel };
}

/**
 * What kills an adopted VM's QEMU when this server dies without a stop (`--on-stop destroy`): a
 * tiny process of the spawner's blocked on its exit pipe (the spawner holds the write end, and
 * dies with the server), which then kills QEMU, if it is still the same process. Killed itself
 * when the VM ends otherwise.
 */
export function watchQemu(spawner: Spawner, qemu: ProcessRef): Promise<SpawnedProcess> {
  const script = [
    'import os, sys',
    'pid, start = int(sys.argv[1]), sys.argv[2]',
    'while os.read(3, 1): pass',
    'try:',
    '    stat = open(f"/proc/{pid}/stat").read()',
    '    if stat[stat.rindex(")") + 2:].split(" ")[19] == start: os.kill(pid, 9)',
    'except (OSError, IndexError): pass',
  ].join('\n');
  return spawner.spawn(['python3', '-I', '-S', '-c', script, String(qemu.pid), qemu.start], { exitFd: 3 });
}
