/**
 * The server's side of a sandbox holder (host/podflare_holder.py): the small per-sandbox process,
 * like containerd's shim, that keeps a namespace sandbox and its agent channel while servers come
 * and go. A holder runs in a session of its own (`detached`), so neither the server's death nor a
 * signal to the server's process group reaches it; bwrap is its child (`--die-with-parent`: a
 * sandbox never outlives its holder), and the agent's channel is relayed to whichever server is
 * connected to the holder's control socket.
 *
 * Files, all in `<stateDir>/holders/` (root's, mode 0700: no sandbox uid may even look up a name
 * in it, and each holder also checks its peer is uid 0 with SO_PEERCRED):
 *   <id>.sock   the holder's control socket: a server connects here to drive the agent
 *   <id>.json   what a new server needs to take the sandbox over (HolderRecord), written by the server
 *   <id>.log    the holder's and bwrap's diagnostics
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { SandboxSpec } from '../runtime.js';
import { CMDLINE_READ_CAP, readProcHeadSync } from './proc-read.js';

const HOLDER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_holder.py');
/** Version of HolderRecord's layout; a record of another version is not adopted. */
export const HOLDER_RECORD_VERSION = 1;

/** What a server writes about a held sandbox so that the next one can adopt it. */
export interface HolderRecord {
  version: number;
  /** The agent protocol version of the sandbox's agent (an upgrade checks it). */
  agentProtocol: string;
  kind: 'root' | 'fork';
  spec: SandboxSpec;
  holderPid: number;
  /** Host pid of the sandbox's PID 1 (its agent). */
  initPid: number;
  /** Lower layers, topmost first. */
  lowers: string[];
  parentId: string | null;
  depth: number;
  slirpPid: number | null;
  cgroup: boolean;
  /** Deleted while children of it live (a husk: its agent only reaps, nothing drives it). */
  husk?: boolean;
  /**
   * The holder watches the server that adopts it when sent SIGUSR1 (host/podflare_holder.py): a
   * server that destroys its sandboxes at a stop asks it to. Holders of earlier builds lack it.
   */
  watchable?: boolean;
}

export interface HolderPaths {
  socket: string;
  record: string;
  log: string;
}

export function holdersDir(stateDir: string): string {
  return path.join(stateDir, 'holders');
}

export function holderPaths(stateDir: string, id: string): HolderPaths {
  const base = path.join(holdersDir(stateDir), id);
  return { socket: `${base}.sock`, record: `${base}.json`, log: `${base}.log` };
}

/** The holders' directory: root's alone (0700), whatever the umask or an earlier mode. */
export async function prepareHoldersDir(stateDir: string): Promise<void> {
  const dir = holdersDir(stateDir);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const probe = holderPaths(stateDir, `sbx_${'0'.repeat(32)}`).socket;
  if (Buffer.byteLength(probe) > 107) throw new Error(`state directory path too long for the holders' unix sockets: ${probe} (choose a shorter one)`);
}

export interface HolderStart {
  stateDir: string;
  id: string;
  /** Host uid (and gid) the sandbox runs as: bwrap's, and the only peer a fork child's socket accepts. */
  uid: number;
  /** Spawn mode: the sandbox's command line (bwrap's). */
  command?: string[];
  /** Accept mode: where the fork child's agent connects. */
  accept?: string;
  /** Spare mode (spare-holders.ts): a fork child's holder started ahead of need under `id`, a placeholder. */
  spare?: boolean;
  /** The holder's stdio from fd 4 on (spawn mode: bwrap's info, userns block and seccomp fds). */
  extraStdio?: Array<'pipe' | 'ignore' | number>;
  timeoutMs: number;
  /** The holder ends its sandbox when this server process dies (onStop 'destroy'); otherwise it outlives it. */
  watchServer?: boolean;
}

export interface StartedHolder {
  child: ChildProcess;
  pid: number;
  /** The connection to its control socket: the agent's channel. */
  socket: net.Socket;
}

/**
 * A holder's command line (its control socket and log named after `id`). Spare mode: with
 * `readyFd`, it also says it is listening by writing to that fd.
 */
export function holderCommand(o: Pick<HolderStart, 'stateDir' | 'id' | 'uid' | 'command' | 'accept' | 'spare' | 'watchServer'> & { readyFd?: number }): string[] {
  const paths = holderPaths(o.stateDir, o.id);
  // A spare serves this server only: it exits if we die before connecting to it (--spare-of).
  const spare = ['--spare', '--spare-of', String(process.pid), ...(o.readyFd === undefined ? [] : ['--ready-fd', String(o.readyFd)])];
  // A spare is not our child (the spawner starts it): it is told to watch us when it is given a child.
  const watch = o.watchServer && !o.spare ? ['--watch-server', String(process.pid)] : [];
  const mode = [...watch, ...(o.spare ? spare : o.accept ? ['--accept', o.accept] : ['--', ...o.command!])];
  // -I: no user site or environment; -S: no site module (~10 ms less to start).
  return ['/usr/bin/python3', '-I', '-S', HOLDER, '--socket', paths.socket, '--log', paths.log, '--uid', String(o.uid), '--gid', String(o.uid), ...mode];
}

/** Starts a holder and connects to it; the child process is the caller's to kill on failure. */
export async function startHolder(o: HolderStart): Promise<StartedHolder> {
  const paths = holderPaths(o.stateDir, o.id);
  const [command, ...args] = holderCommand(o);
  const child = spawn(command!, args, {
    detached: true, // a session of its own: it outlives the server and misses its group's signals
    stdio: ['ignore', 'pipe', 'pipe', 'ignore', ...(o.extraStdio ?? [])],
  });
  child.unref();
  const pid = await new Promise<number>((resolve, reject) => {
    let out = '';
    let err = '';
    const timer = setTimeout(() => reject(new Error('the sandbox holder did not start in time')), o.timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /^ready (\d+)/.exec(out);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    });
    child.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-2000); });
    child.once('error', (e) => { clearTimeout(timer); reject(e); });
    child.once('exit', (code, signal) => { clearTimeout(timer); reject(new Error(`the sandbox holder exited (${code ?? signal}): ${err.trim()}`)); });
  });
  (child.stdout as net.Socket).unref?.();
  (child.stderr as net.Socket).unref?.();
  return { child, pid, socket: await connectHolder(paths.socket, o.timeoutMs) };
}

/** Connects to a holder's control socket (a new server taking a sandbox over, or the one that started it). */
export function connectHolder(socketPath: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => { socket.destroy(); reject(new Error(`holder ${socketPath} did not answer`)); }, timeoutMs);
    socket.once('connect', () => { clearTimeout(timer); socket.removeAllListeners('error'); resolve(socket); });
    socket.once('error', (e) => { clearTimeout(timer); reject(e); });
  });
}

/** Writes a sandbox's HolderRecord (atomically: a server killed mid-write leaves the old one or none). */
export async function saveHolderRecord(stateDir: string, record: HolderRecord): Promise<void> {
  const file = holderPaths(stateDir, record.spec.id).record;
  await writeFile(`${file}.tmp`, JSON.stringify(record), { mode: 0o600 });
  await rename(`${file}.tmp`, file);
}

/** Every holder record in the state directory (unreadable ones are skipped: their sandboxes are not adopted). */
export async function loadHolderRecords(stateDir: string): Promise<HolderRecord[]> {
  const names = await readdir(holdersDir(stateDir)).catch(() => [] as string[]);
  const out: HolderRecord[] = [];
  for (const name of names.filter((n) => n.endsWith('.json'))) {
    try {
      const r = JSON.parse(await readFile(path.join(holdersDir(stateDir), name), 'utf8')) as HolderRecord;
      if (r.version === HOLDER_RECORD_VERSION && `${r.spec.id}.json` === name) out.push(r);
    } catch { /* half written or foreign: not adopted */ }
  }
  return out;
}

/** Removes a sandbox's holder files (it has ended). */
export async function removeHolderFiles(stateDir: string, id: string): Promise<void> {
  const p = holderPaths(stateDir, id);
  await Promise.all([p.socket, p.record, `${p.record}.tmp`, p.log].map((f) => rm(f, { force: true }).catch(() => undefined)));
}

/** The last lines of a holder's log (why a sandbox ended), '' if none. */
export function holderLogTail(stateDir: string, id: string): string {
  try {
    const text = readFileSync(holderPaths(stateDir, id).log, 'utf8').slice(-4000);
    return text.trim().split('\n').slice(-5).join(' | ');
  } catch {
    return '';
  }
}

/**
 * SIGKILLs (or sends `signal` to) `pid` only if its command line still names `mark` (a holder's socket, a slirp4netns's
 * target): after a server restart these are not our children, and their pids may have been reused.
 */
export function killIfStill(pid: number, mark: string, signal: NodeJS.Signals = 'SIGKILL'): boolean {
  try {
    // Capped: a longer command line is no holder's nor slirp4netns's (a sandbox's process may have reused the pid).
    const { text, truncated } = readProcHeadSync(`/proc/${pid}/cmdline`, CMDLINE_READ_CAP);
    if (truncated || !text.split('\0').includes(mark)) return false;
    process.kill(pid, signal);
    return true;
  } catch {
    return false;
  }
}

/** Resolves once `pid` is gone (or a zombie: someone else reaps it), or after `timeoutMs`. */
export async function waitProcessGone(pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      return;
    }
    if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z') return;
    await new Promise((r) => setTimeout(r, 10));
  }
}
