/**
 * Disk limits: the sandboxes' directory is a btrfs filesystem in a sparse file of the state
 * directory (`<stateDir>/disk.img`, mounted at `<stateDir>/sandboxes`), each sandbox's directory
 * a subvolume with a qgroup limit. A sandbox writing past its limit gets EDQUOT ("Disk quota
 * exceeded"); the host's disk and other sandboxes are untouched.
 *
 * Why btrfs: overlayfs needs a real filesystem for the upper layer, per-directory limits need
 * quotas, and on the kernels we target ext4 quotas may be compiled out (no QFMT_V2) while btrfs
 * qgroups are part of btrfs itself. The volume is created once (milliseconds: sparse file,
 * mkfs.btrfs) and reused; it stays mounted over a crash and is found again at the next start.
 */
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile, statfs } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../../log.js';
import { run } from '../../proc.js';

const MIN_SIZE = 8 * 1024 ** 3;
const MAX_SIZE = 1024 ** 4;

export class DiskVolume {
  private constructor(readonly mountPoint: string) {}

  /**
   * Mounts (creating it if needed) the volume for `mountPoint`; null where the host cannot (no
   * btrfs), in which case disk limits are not enforced and the caller says so.
   */
  static async open(stateDir: string, mountPoint: string, log: Logger): Promise<DiskVolume | null> {
    if (process.env.PODFLARE_DISK_LIMITS === '0') return null; // operators may opt out (no btrfs volume)
    try {
      await mkdir(mountPoint, { recursive: true });
      if ((await fsTypeAt(mountPoint)) === 'btrfs') return new DiskVolume(mountPoint);
      const image = path.join(stateDir, 'disk.img');
      if (!existsSync(image)) {
        const free = await statfs(stateDir).then((s) => s.bavail * s.bsize);
        const size = Math.max(MIN_SIZE, Math.min(MAX_SIZE, Math.floor(free / 4096) * 4096));
        await run('truncate', ['-s', String(size), image]);
        await run('mkfs.btrfs', ['-q', '-f', image]);
      }
      await chmod(image, 0o600); // every sandbox's files, raw: root's alone
      await run('mount', ['-o', 'loop', image, mountPoint]);
      await run('btrfs', ['quota', 'enable', mountPoint]);
      return new DiskVolume(mountPoint);
    } catch (err) {
      log.warn('no disk volume: sandboxes disk limits are not enforced', { error: (err as Error).message });
      return null;
    }
  }

  /** Unmounts it (the loop device goes with it); the image stays for the next start. */
  async close(): Promise<void> {
    await run('umount', [this.mountPoint]).catch(() => run('umount', ['-l', this.mountPoint]).catch(() => undefined));
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
