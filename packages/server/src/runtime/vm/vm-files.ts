/**
 * Every host-side file operation of the VM runtime on files a QEMU can reach: VM directories,
 * their disks, RAM files, fork layers, frozen VMs.
 *
 * Threat model. A guest is root in its own kernel and may escape into its QEMU: from then on it
 * runs as that VM's uid (vm-ids.ts: one per VM; its gid the same number, plus the VMs' group and
 * the groups of the fork points under it), with no capabilities, and may do anything that uid
 * can, for as long as it lives (processes of that uid are killed before the uid is given back).
 * It wants to (a) read or write another tenant's disks, RAM or frozen state, (b) make this server
 * (root) read, write, copy or chown a file of its choosing, or (c) make root run a tool (qemu-img)
 * over an image it crafted (a qcow2 header names its backing file: qemu-img as root would read any
 * file on the host into it).
 *
 * What holds:
 * - Every directory the server creates or writes in is root's: `vm/`, `vm/<id>/` (root:uid 0710),
 *   `vm/templates/<t>/` (root:VM group 0750), `vm/layers`, `vm/points`, `frozen/<id>` (0700).
 *   The only directory a QEMU owns is `vm/<id>/run/` (0700), where it makes its own sockets; the
 *   server only connects to them, before the guest has run (a QEMU that has not run its guest
 *   has not been escaped), and removes the directory after every process of the uid is dead.
 * - A file a QEMU writes (its disk, console log, a device state) is made by the server first
 *   (O_CREAT|O_EXCL|O_NOFOLLOW, then chowned through its fd) in a root directory: QEMU can change
 *   its bytes, never its name or where it points. The server opens such files with O_NOFOLLOW |
 *   O_NONBLOCK and checks they are regular (fstat) before reading, and bounds what it reads.
 * - Migration streams (a frozen VM, a template's state) go through a unix socket the server listens
 *   on, into a file it opened itself; QEMU is never given a path to write a stream to.
 * - Images a QEMU could have written are handled by qemu-img only as that VM's uid (runAsVm), which
 *   can open no file the VM could not; root only copies their bytes.
 * - Shared files: the image (kernel, initrd, root: no tenant data) is world-readable as it always
 *   was; a frozen template's disk is root:VM group 0440; a fork point's layer is root:<fork point's
 *   group> 0440, a group only that fork point's children have.
 * - Shared RAM (a template's, a fork point's) is no file: QEMU 7.2 opens a RAM file read-write even
 *   to map it privately, so as a file it would be writable by every VM mapping it. It is a sealed
 *   memfd (shared-ram.ts) the spawner holds and passes to each QEMU as fd 3: the seal refuses every
 *   write (write(), shared writable mappings, resizing, punched holes) to anyone, through any fd,
 *   and no other uid can reach a QEMU's fds (/proc/<pid>/fd needs ptrace access). Everything
 *   of one VM alone (overlay, a resumed VM's RAM file, console log, sockets) is 0600/0700 of its own uid;
 *   everything of the server alone (frozen VMs, states) 0600/0700 of root's.
 */
import { spawn } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { chmod, lchown, lstat, mkdir, open, rm, stat, type FileHandle } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Spawner } from '../shared/spawner.js';

const { O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_RDONLY, O_RDWR } = fsConstants;

/** A file that is not what the server made (a symlink, a device, too large). */
export class UntrustedFileError extends Error {}

/** Who a file or a process belongs to. */
export interface Owner {
  uid: number;
  gid: number;
}

/** An identity QEMU or a tool runs as: its uid (and the same gid) and its supplementary groups. */
export interface VmIdentity {
  uid: number;
  groups: number[];
}

/**
 * A directory of root's (made with its parents if missing), not writable by anyone else, at most
 * `mode`; every directory above it up to `top` gets search permission for others (QEMUs and
 * sandboxes walk through it, listing nothing).
 */
export async function rootDir(dir: string, mode: number, top: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode });
  const st = await lstat(dir);
  if (!st.isDirectory() || st.uid !== 0 || (st.mode & 0o022) !== 0) {
    throw new UntrustedFileError(`${dir} is not a directory of root's that only root writes`);
  }
  if ((st.mode & 0o7777) !== mode) await chmod(dir, mode);
  for (let up = path.dirname(dir); up.startsWith(top); up = path.dirname(up)) {
    const m = (await stat(up)).mode & 0o7777;
    if ((m & 0o001) === 0) await chmod(up, m | 0o001);
    if (up === top) break;
  }
}

/**
 * A new, empty directory at `dir` (in a directory of root's) owned by root and `gid`: whatever was
 * at that name before is removed first, without following it.
 */
export async function freshDir(dir: string, mode: number, gid = 0): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { mode }); // EEXIST if something came back meanwhile: never reused
  const fd = await open(dir, O_RDONLY | O_NOFOLLOW | fsConstants.O_DIRECTORY);
  try {
    await fd.chown(0, gid);
    await fd.chmod(mode);
  } finally {
    await fd.close();
  }
}

/** What vmDir made: QEMU's own directory for its sockets, and its console log. */
export interface VmDirPaths {
  runDir: string;
  consoleLog: string;
}

/**
 * The directory of one VM: root-owned (root:uid 0710), with a pre-made console log of the VM's
 * and `run/`, the VM's own (0700), where QEMU makes its sockets.
 */
export async function vmDir(dir: string, owner: Owner, dirGid = owner.gid, dirMode = 0o710): Promise<VmDirPaths> {
  await freshDir(dir, dirMode, dirGid);
  const runDir = path.join(dir, 'run');
  await mkdir(runDir, { mode: 0o700 });
  const fd = await open(runDir, O_RDONLY | O_NOFOLLOW | fsConstants.O_DIRECTORY);
  try {
    await fd.chmod(0o700);
    await fd.chown(owner.uid, owner.gid);
  } finally {
    await fd.close();
  }
  const consoleLog = path.join(dir, 'console.log');
  await (await privateFile(consoleLog, owner)).close();
  return { runDir, consoleLog };
}

/**
 * Makes a new file (never an existing one, never through a symlink), `mode` and owned by `owner`,
 * `size` bytes long (sparse) if given; returns it open read-write.
 */
export async function privateFile(file: string, owner: Owner, mode = 0o600, size?: number): Promise<FileHandle> {
  const fd = await open(file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
  try {
    if (size !== undefined) await fd.truncate(size);
    await fd.chown(owner.uid, owner.gid);
    await fd.chmod(mode);
    return fd;
  } catch (err) {
    await fd.close();
    await rm(file, { force: true });
    throw err;
  }
}

/** Gives an existing regular file (named in a directory of root's) to `owner` with `mode`. */
export async function handOver(file: string, owner: Owner, mode: number): Promise<void> {
  const fd = await openRegular(file, O_RDONLY);
  try {
    await fd.chown(owner.uid, owner.gid);
    await fd.chmod(mode);
  } finally {
    await fd.close();
  }
}

/**
 * Opens a file that must be a regular file: never through a symlink (O_NOFOLLOW), never blocking
 * on a FIFO (O_NONBLOCK), checked with fstat. At most `maxBytes` long, when given.
 */
export async function openRegular(file: string, flags: number, maxBytes?: number): Promise<FileHandle> {
  let fd: FileHandle;
  try {
    fd = await open(file, flags | O_NOFOLLOW | O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new UntrustedFileError(`${file} is a symbolic link, not the file the server made`);
    throw err;
  }
  try {
    const st = await fd.stat();
    if (!st.isFile()) throw new UntrustedFileError(`${file} is not a regular file`);
    if (maxBytes !== undefined && st.size > maxBytes) {
      throw new UntrustedFileError(`${file} is ${st.size} bytes, more than the ${maxBytes} it may hold`);
    }
    return fd;
  } catch (err) {
    await fd.close();
    throw err;
  }
}

/** Reads a whole regular file, refusing a symlink, a non-regular file or one over `maxBytes`. */
export async function readRegular(file: string, maxBytes: number): Promise<Buffer> {
  const fd = await openRegular(file, O_RDONLY, maxBytes);
  try {
    const data = await fd.readFile();
    if (data.length > maxBytes) throw new UntrustedFileError(`${file} grew past ${maxBytes} bytes`);
    return data;
  } finally {
    await fd.close();
  }
}

/** Writes a new file of root's (0600) with `data`, never through a symlink or over a file. */
export async function writeNew(file: string, data: string | Buffer): Promise<void> {
  const fd = await privateFile(file, { uid: 0, gid: 0 });
  try {
    await fd.writeFile(data);
  } finally {
    await fd.close();
  }
}

/**
 * Copies a regular file into a new file `to` (sparse, a reflink where the filesystem has them):
 * the source is opened here (O_NOFOLLOW, regular) and `cp` reads that open file (/dev/stdin), so
 * no path is followed however the source's directory changes.
 */
export async function copyRegular(from: string, to: string, owner: Owner = { uid: 0, gid: 0 }): Promise<void> {
  const src = await openRegular(from, O_RDONLY);
  try {
    await (await privateFile(to, owner)).close();
    await new Promise<void>((resolve, reject) => {
      const cp = spawn('cp', ['--sparse=always', '--reflink=auto', '/dev/stdin', to], { stdio: [src.fd, 'ignore', 'pipe'] });
      let stderr = '';
      cp.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
      cp.once('error', reject);
      cp.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`copying ${from}: ${stderr.trim() || `cp exited ${code}`}`))));
    });
  } catch (err) {
    await rm(to, { force: true });
    throw err;
  } finally {
    await src.close();
  }
}

/**
 * Runs a tool (qemu-img on an image a VM could have written) as that VM's identity: no
 * capabilities, no new privileges, dying with the server. Rejects with its stderr when it fails.
 */
export async function runAsVm(spawner: Spawner, id: VmIdentity, argv: string[], timeoutMs = 600_000): Promise<void> {
  const p = await spawner.spawn([
    'setpriv', '--pdeathsig', 'KILL', '--no-new-privs', '--inh-caps=-all', '--bounding-set=-all',
    `--reuid=${id.uid}`, `--regid=${id.uid}`, id.groups.length ? `--groups=${id.groups.join(',')}` : '--clear-groups',
    '--', ...argv,
  ]);
  const timer = setTimeout(() => p.kill(), timeoutMs);
  const exit = await p.exited.finally(() => clearTimeout(timer));
  if (exit.code !== 0) {
    const why = exit.stderr.trim().split('\n').slice(-3).join(' | ') || `exit ${exit.code ?? exit.signal}`;
    throw new Error(`${argv[0]} (as uid ${id.uid}) failed: ${why}`);
  }
}

/** A stream on its way into a file (receiveInto). */
export interface StreamReceiver {
  listening: Promise<void>;
  /** The bytes written, once the stream has ended. */
  done: Promise<number>;
  close(): void;
}

/**
 * Receives one stream (a QEMU's outgoing migration) on a unix socket the server listens on at
 * `socketPath` (in a directory of root's; the socket is given to `uid`, so that QEMU may connect),
 * into the new file `file` (root's, 0600), at most `maxBytes`. `listening` resolves once QEMU may
 * connect, `done` once the stream has ended and is written; `close` gives up.
 */
export function receiveInto(socketPath: string, uid: number, file: string, maxBytes: number): StreamReceiver {
  const server = net.createServer({ pauseOnConnect: true });
  let conn: net.Socket | null = null;
  // Listened for from the start: QEMU may connect as soon as the socket exists.
  const accepted = new Promise<net.Socket>((resolve, reject) => {
    server.once('connection', (c: net.Socket) => {
      conn = c;
      server.close(); // one connection only
      resolve(c);
    });
    server.once('close', () => reject(new Error('closed before QEMU connected')));
  });
  accepted.catch(() => undefined);
  let out: FileHandle | null = null;
  const listening = (async () => {
    out = await privateFile(file, { uid: 0, gid: 0 });
    await rm(socketPath, { force: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    await handOverSocket(socketPath, uid);
  })();
  const done = (async () => {
    try {
      await listening;
      const source = await accepted;
      let bytes = 0;
      for await (const chunk of source as AsyncIterable<Buffer>) {
        bytes += chunk.length;
        if (bytes > maxBytes) throw new UntrustedFileError(`the stream is longer than the ${maxBytes} bytes it may be`);
        await out!.write(chunk);
      }
      return bytes;
    } finally {
      await (out as FileHandle | null)?.close();
      server.close();
      await rm(socketPath, { force: true });
    }
  })();
  listening.catch(() => undefined);
  done.catch(() => undefined);
  return {
    listening,
    done,
    close: () => {
      server.close();
      (conn as net.Socket | null)?.destroy();
    },
  };
}

/** Lets `uid` connect to a socket the server made (its directory is root's: the name is the server's). */
async function handOverSocket(socketPath: string, uid: number): Promise<void> {
  const st = await lstat(socketPath);
  if (!st.isSocket() || st.uid !== 0) throw new UntrustedFileError(`${socketPath} is not the server's socket`);
  await lchown(socketPath, uid, uid);
}
