/**
 * Disk limits: the sandboxes' directory is a btrfs filesystem in a file of the state directory
 * (`<stateDir>/disk.img`, mounted at `<stateDir>/sandboxes`), each sandbox's directory a
 * subvolume with a qgroup limit. A sandbox writing past its limit gets EDQUOT ("Disk quota
 * exceeded"); the host's disk and other sandboxes are untouched.
 *
 * Why btrfs: overlayfs needs a real filesystem for the upper layer, per-directory limits need
 * quotas, and on the kernels we target ext4 quotas may be compiled out (no QFMT_V2) while btrfs
 * qgroups are part of btrfs itself. The volume is created once and reused; it stays mounted over
 * a crash and is found again at the next start.
 *
 * The image is reserved, not sparse: its size is the operator's (`diskVolumeBytes`), allocated
 * on the host up front (fallocate) and never given back while it exists (mounted `nodiscard`,
 * made with `mkfs.btrfs -K`: a discard would punch holes in the file and hand the space back to
 * the host). A sparse image would let sandboxes, each within its own quota, together fill the
 * host's disk under the volume; the loop device's writes would then fail and btrfs would force
 * the whole volume read-only, for every tenant. Reserved, the volume can only fill up itself:
 * its writers get ENOSPC (a 507 through the API) and can free space again. A host without the
 * space promised refuses to start (InsufficientHostSpaceError) instead of failing later.
 */
import { existsSync } from 'node:fs';
import { chmod, mkdir, open, readFile, rm, stat, statfs } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../../log.js';
import { run } from '../../proc.js';

const MB = 1024 ** 2;

/** The host cannot hold the disk volume the configuration promises the sandboxes. */
export class InsufficientHostSpaceError extends Error {
  override name = 'InsufficientHostSpaceError';
}

export interface DiskVolumeOptions {
  stateDir: string;
  mountPoint: string;
  /** The volume's size, reserved on the host's disk. */
  sizeBytes: number;
  log: Logger;
}

export class DiskVolume {
  private constructor(readonly mountPoint: string) {}

  /**
   * Mounts (creating and reserving it if needed) the volume for `mountPoint`; null where the host
   * cannot (no btrfs), in which case disk limits are not enforced and the caller says so.
   * @throws InsufficientHostSpaceError when the state directory's filesystem has less free space
   *   than the volume's size.
   */
  static async open(o: DiskVolumeOptions): Promise<DiskVolume | null> {
    if (process.env.PODFLARE_DISK_LIMITS === '0') return null; // operators may opt out (no btrfs volume)
    await mkdir(o.mountPoint, { recursive: true });
    if ((await fsTypeAt(o.mountPoint)) === 'btrfs') return new DiskVolume(o.mountPoint); // left mounted by a crash
    const image = diskImagePath(o.stateDir);
    const size = Math.floor(o.sizeBytes / 4096) * 4096;
    if (!(await isReserved(image, size))) {
      // Without btrfs-progs there will be no volume: nothing to reserve (and no reason to refuse).
      const tools = await run('mkfs.btrfs', ['--version']).then(() => null, (err: Error) => err);
      if (tools) {
        o.log.warn('no disk volume: sandboxes disk limits are not enforced', { error: tools.message });
        return null;
      }
      await rm(image, { force: true }); // nothing in it survives a restart anyway (see reconcile.ts)
      await reserve(o.stateDir, image, size);
    }
    try {
      await chmod(image, 0o600); // every sandbox's files, raw: root's alone
      if (!(await hasBtrfs(image))) await run('mkfs.btrfs', ['-q', '-f', '-K', image]);
      await run('mount', ['-o', 'loop,nodiscard', image, o.mountPoint]);
      await run('btrfs', ['quota', 'enable', o.mountPoint]);
      return new DiskVolume(o.mountPoint);
    } catch (err) {
      o.log.warn('no disk volume: sandboxes disk limits are not enforced', { error: (err as Error).message });
      await rm(image, { force: true }); // the reservation is useless without the volume
      return null;
    }
  }

  /** Unmounts it (the loop device goes with it); the image (the host's reservation) stays for the next start. */
  async close(): Promise<void> {
    await run('umount', [this.mountPoint]).catch(() => run('umount', ['-l', this.mountPoint]).catch(() => undefined));
  }
}

export function diskImagePath(stateDir: string): string {
  return path.join(stateDir, 'disk.img');
}

/**
 * Whether the filesystem holding `dir` can take a volume of `sizeBytes` (free space as an
 * unprivileged user would see it: the root reserve is not ours to take). Null when it can;
 * otherwise why not, for people.
 */
export async function volumeSpaceProblem(dir: string, sizeBytes: number): Promise<string | null> {
  const s = await statfs(dir);
  const free = s.bavail * s.bsize;
  if (free >= sizeBytes) return null;
  return `the sandboxes' disk volume needs ${Math.ceil(sizeBytes / MB)} MB reserved in ${dir}, but its filesystem has ` +
    `${Math.floor(free / MB)} MB free: free space there or lower PODFLARE_DISK_VOLUME_MB (--disk-volume-mb)`;
}

/** The image exists, has this size and all of its blocks allocated on the host. */
export async function isReserved(image: string, size: number): Promise<boolean> {
  if (!existsSync(image)) return false;
  const st = await stat(image);
  return st.size === size && st.blocks * 512 >= size;
}

async function reserve(stateDir: string, image: string, size: number): Promise<void> {
  const problem = await volumeSpaceProblem(stateDir, size);
  if (problem) throw new InsufficientHostSpaceError(problem);
  try {
    await run('fallocate', ['-l', String(size), image]);
  } catch (err) {
    await rm(image, { force: true });
    throw new InsufficientHostSpaceError(`cannot reserve ${Math.ceil(size / MB)} MB for the sandboxes' disk volume in ${stateDir}: ${(err as Error).message}`);
  }
}

/** The image already holds a btrfs filesystem (a reserved image from an earlier start). */
async function hasBtrfs(image: string): Promise<boolean> {
  const file = await open(image, 'r');
  try {
    const magic = Buffer.alloc(8);
    await file.read(magic, 0, 8, 0x10040); // the superblock's magic, at 64 KiB + 0x40
    return magic.toString('latin1') === '_BHRfS_M';
  } finally {
    await file.close();
  }
}

/** The filesystem type of the mount exactly at `dir`, or null if nothing is mounted there. */
async function fsTypeAt(dir: string): Promise<string | null> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  let type: string | null = null;
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (fields[4] === dir && dash > 0) type = fields[dash + 1] ?? null; // the last mount there wins
  }
  return type;
}
