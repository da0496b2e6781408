/**
 * Migrations of a VM, in and out: QEMU's MIGRATION events say when one is done (or why it failed),
 * a restoring VM's state comes from memory or from a file through a unix socket, and a frozen VM's
 * goes to a file through a unix socket of the server's. The stream of a fork point goes to the
 * split worker instead (migration-split.ts).
 */
import { constants as fsConstants } from 'node:fs';
import { once } from 'node:events';
import type { FileHandle } from 'node:fs/promises';
import type net from 'node:net';
import { connectUnix, type Qmp } from './qmp.js';
import { openRegular, receiveInto } from './vm-files.js';

/**
 * Set on every VM: x-ignore-shared leaves a share=on RAM block (a template's) out of the stream;
 * `events` makes QEMU announce migration states, so nothing polls.
 */
export const MIGRATION_CAPABILITIES = [{ capability: 'x-ignore-shared', state: true }, { capability: 'events', state: true }];

/**
 * Where a restoring VM reads its migration state from: memory (small; in parts, sent one after
 * another) or a file (a frozen VM's whole RAM).
 */
export type StateSource = { data: Buffer | readonly Buffer[] } | { file: string };

/** QEMU throttles migrations to 128 MiB/s by default (meant for live migration over a network). */
export const UNTHROTTLED = { 'max-bandwidth': 64 * 1024 ** 3 };

/**
 * Resolves when the migration (either direction) completes, from QEMU's MIGRATION events (the
 * `events` capability): call it before starting the migration, so no event is missed. Rejects
 * when it fails, is cancelled or QEMU goes away.
 */
export function waitMigration(qmp: Qmp, timeoutMs: number, stderr?: () => string): Promise<void> {
  const done = new Promise<void>((resolve, reject) => {
    let over = false;
    const finish = (err?: Error) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      qmp.off('event', onEvent);
      qmp.off('closed', onClosed);
      if (err) reject(err);
      else resolve();
    };
    const onEvent = (name: string, data: { status?: string } | undefined) => {
      if (name !== 'MIGRATION') return;
      if (data?.status === 'completed') finish();
      else if (data?.status === 'failed' || data?.status === 'cancelled') {
        // Why: query-migrate's error, and QEMU's last words (let its stderr arrive).
        void qmp.command<{ 'error-desc'?: string }>('query-migrate').catch(() => ({} as { 'error-desc'?: string })).then(async (r) => {
          await new Promise((res) => setTimeout(res, 20));
          finish(new Error(`migration ${data.status}${r['error-desc'] ? `: ${r['error-desc']}` : ''}${stderr?.() ? ` (${stderr()})` : ''}`));
        });
      }
    };
    const onClosed = (reason: string) => {
      setTimeout(() => finish(new Error(`QEMU went away during the migration (${reason})${stderr?.() ? `: ${stderr()}` : ''}`)), 20);
    };
    const timer = setTimeout(() => finish(new Error('migration did not complete in time')), timeoutMs);
    qmp.on('event', onEvent);
    qmp.on('closed', onClosed);
  });
  done.catch(() => undefined);
  return done;
}

/**
 * Loads a restoring VM's state through a unix socket QEMU listens on (no process spawned): from
 * memory, or from a file the server opens itself (O_NOFOLLOW, regular: vm-files.ts) and streams.
 */
export async function incoming(qmp: Qmp, state: StateSource, socketPath: string, timeoutMs: number, stderr?: () => string): Promise<void> {
  const migrated = waitMigration(qmp, timeoutMs, stderr);
  if (Buffer.byteLength(socketPath) > 107) throw new Error(`socket path too long for a unix socket: ${socketPath}`);
  const file = 'file' in state ? await openRegular(state.file, fsConstants.O_RDONLY) : null;
  try {
    await qmp.command('migrate-incoming', { uri: `unix:${socketPath}` });
    // QEMU listens once migrate-incoming has returned.
    const sock = await connectUnix(socketPath, timeoutMs);
    sock.on('error', () => undefined); // a failure shows in the migration's state
    try {
      if (file) {
        await streamFile(file, sock).catch(() => undefined); // a failure shows in the migration's state
      } else if ('data' in state) {
        for (const part of Buffer.isBuffer(state.data) ? [state.data] : state.data) sock.write(part);
        sock.end();
      }
      await migrated;
    } finally {
      sock.destroy();
    }
  } finally {
    await file?.close();
  }
}

/**
 * Migrates a stopped VM's state into the new file `file` (root's): QEMU (uid `uid`) streams it to
 * a unix socket of the server's at `socketPath`, never to a path of its choosing; at most
 * `maxBytes` are taken.
 */
export async function migrateToFile(qmp: Qmp, to: { file: string; socketPath: string; uid: number; maxBytes: number }, timeoutMs: number, stderr?: () => string): Promise<void> {
  const receiver = receiveInto(to.socketPath, to.uid, to.file, to.maxBytes);
  try {
    await receiver.listening;
    await qmp.command('migrate-set-parameters', UNTHROTTLED);
    const migrated = waitMigration(qmp, timeoutMs, stderr);
    await qmp.command('migrate', { uri: `unix:${to.socketPath}` });
    await Promise.all([migrated, receiver.done]);
  } catch (err) {
    receiver.close();
    await qmp.command('migrate_cancel').catch(() => undefined);
    throw err;
  }
}

/** Writes a whole open file into a socket, a chunk at a time (each its own buffer, as the socket keeps it until sent). */
async function streamFile(file: FileHandle, sock: net.Socket): Promise<void> {
  for (let pos = 0; ;) {
    const { buffer, bytesRead } = await file.read(Buffer.allocUnsafe(STREAM_CHUNK), 0, STREAM_CHUNK, pos);
    if (bytesRead === 0) break;
    pos += bytesRead;
    if (!sock.write(buffer.subarray(0, bytesRead))) await once(sock, 'drain');
  }
  sock.end();
}

const STREAM_CHUNK = 1 << 20;
