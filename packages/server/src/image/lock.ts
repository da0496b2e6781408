/**
 * A cross-process lock on an images directory, so that two servers (or a server and a test run)
 * calling ensureImage() at once build the image only once.
 *
 * The lock is a directory (mkdir is atomic) holding owner.json (pid, host, a random token). The
 * holder touches owner.json every few seconds. A lock is stale when its holder is a dead process on
 * this host, or when owner.json has not been touched for `staleMs`. Stale locks are taken over by
 * renaming them aside first, so two waiters cannot both take one over.
 *
 * Correctness never depends on the lock: every build goes to a private temporary directory and is
 * renamed into place, and a rename onto an existing image fails rather than replacing it. A lock
 * that is (rarely) taken from a live holder costs a duplicate build, not a broken image.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { isAlive } from '../proc.js';

export interface LockOwner {
  pid: number;
  host: string;
  token: string;
  startedAt: string;
}

export interface HeldLock {
  readonly path: string;
  readonly owner: LockOwner;
  /** Removes the lock if it is still ours. Idempotent. */
  release(): Promise<void>;
}

export interface AcquireOptions {
  /** Called on each poll while another process holds the lock. */
  onWait?: (holder: LockOwner | undefined, waitedMs: number) => void;
  signal?: AbortSignal;
  /** @default 500 */
  pollMs?: number;
  /** A lock untouched this long is stale even if its pid seems alive (pid reuse, another host). @default 120000 */
  staleMs?: number;
  /** Tests: how the holder's heartbeat is paced. @default 5000 */
  heartbeatMs?: number;
}

/** Grace for a lock directory that does not have its owner.json yet (between mkdir and write). */
const UNOWNED_GRACE_MS = 10_000;


async function readOwner(lockDir: string): Promise<{ owner?: LockOwner; touchedMs?: number }> {
  const file = path.join(lockDir, 'owner.json');
  try {
    const [text, st] = await Promise.all([readFile(file, 'utf8'), stat(file)]);
    return { owner: JSON.parse(text) as LockOwner, touchedMs: st.mtimeMs };
  } catch {
    return {};
  }
}

async function isStale(lockDir: string, staleMs: number): Promise<{ stale: boolean; owner?: LockOwner }> {
  const { owner, touchedMs } = await readOwner(lockDir);
  if (!owner || touchedMs === undefined) {
    try {
      const st = await stat(lockDir);
      return { stale: Date.now() - st.mtimeMs > UNOWNED_GRACE_MS };
    } catch {
      return { stale: false }; // gone: the next mkdir will tell
    }
  }
  if (owner.host === os.hostname() && !isAlive(owner.pid)) return { stale: true, owner };
  return { stale: Date.now() - touchedMs > staleMs, owner };
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason ?? new Error('aborted'));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal?.reason ?? new Error('aborted'));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Waits until the lock at `lockDir` is ours. */
export async function acquireLock(lockDir: string, opts: AcquireOptions = {}): Promise<HeldLock> {
  const pollMs = opts.pollMs ?? 500;
  const staleMs = opts.staleMs ?? 120_000;
  const started = Date.now();
  await mkdir(path.dirname(lockDir), { recursive: true });
  for (;;) {
    opts.signal?.throwIfAborted();
    try {
      await mkdir(lockDir);
      return await takeOwnership(lockDir, opts.heartbeatMs ?? 5000);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const { stale, owner } = await isStale(lockDir, staleMs);
    if (stale) {
      await takeOverStale(lockDir, owner);
      continue;
    }
    opts.onWait?.(owner, Date.now() - started);
    await sleep(pollMs, opts.signal);
  }
}

async function takeOwnership(lockDir: string, heartbeatMs: number): Promise<HeldLock> {
  const owner: LockOwner = {
    pid: process.pid,
    host: os.hostname(),
    token: randomBytes(8).toString('hex'),
    startedAt: new Date().toISOString(),
  };
  const file = path.join(lockDir, 'owner.json');
  await writeFile(file, JSON.stringify(owner) + '\n');
  const heartbeat = setInterval(() => {
    const now = new Date();
    utimes(file, now, now).catch(() => undefined);
  }, heartbeatMs);
  heartbeat.unref();
  let released = false;
  return {
    path: lockDir,
    owner,
    async release() {
      if (released) return;
      released = true;
      clearInterval(heartbeat);
      const { owner: current } = await readOwner(lockDir);
      if (current?.token === owner.token) await rm(lockDir, { recursive: true, force: true });
    },
  };
}

/**
 * Moves a stale lock aside and deletes it. If what was moved turns out not to be the lock judged
 * stale (its holder changed in between), it is put back when possible.
 */
async function takeOverStale(lockDir: string, judged: LockOwner | undefined): Promise<void> {
  const aside = `${lockDir}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await rename(lockDir, aside);
  } catch {
    return; // someone else moved or released it: retry from the top
  }
  const { owner } = await readOwner(aside);
  if (owner && owner.token !== judged?.token) {
    try {
      await rename(aside, lockDir);
      return;
    } catch {
      /* a new lock exists already; the moved one's holder will build twice at worst */
    }
  }
  await rm(aside, { recursive: true, force: true });
}
