/**
 * Guest RAM that several VMs map: a frozen template's, a fork point's. It is a memfd the spawner
 * holds (no file names it), filled once (by the template's QEMU while it boots, or by the server
 * from a parent's migration stream), then sealed for good (F_SEAL_WRITE | F_SEAL_GROW |
 * F_SEAL_SHRINK | F_SEAL_SEAL) before any guest that maps it runs.
 *
 * Why: QEMU 7.2 opens a RAM file read-write even to map it privately (`share=off`), so as a file
 * every QEMU mapping it could also write it, and change the pages every other VM on it has not
 * written yet. A sealed memfd is handed to each QEMU as an inherited fd (`mem-path=/dev/fd/3`):
 * QEMU reopens it read-write and maps it MAP_PRIVATE (copy-on-write, as before: its pages shared
 * until written), while every way of changing it — write(), a shared writable mapping, truncate,
 * fallocate's hole punching — is refused by the seal, to every uid (root's too), whatever fd it was
 * opened through. So the bytes every VM on it maps never change while they map it, by
 * construction; and another VM's QEMU cannot even reach it (/proc/<pid>/fd of a process of
 * another uid is closed to it).
 */
import type { Spawner, SpawnerMemfd } from '../shared/spawner.js';

/** The fd a QEMU gets its shared RAM at, and the mem-path that names it. */
export const QEMU_RAM_FD = 3;
export const QEMU_RAM_PATH = `/dev/fd/${QEMU_RAM_FD}`;

export class SharedRam {
  private closed = false;

  private constructor(readonly name: string, private readonly memfd: SpawnerMemfd, private readonly spawner: Spawner) {}

  /** `size` bytes of zeros, writable until sealed; `name` (unique) is what /proc/<pid>/maps shows. */
  static async create(spawner: Spawner, name: string, size: number): Promise<SharedRam> {
    return new SharedRam(name, await spawner.createMemfd(name, size), spawner);
  }

  /** How a QEMU's mapping of it shows in /proc/<pid>/maps. */
  get mapsName(): string {
    return `/memfd:${this.name} (deleted)`;
  }

  /** Where the server (root) opens it to fill it, before it is sealed. */
  get fillPath(): string {
    return this.memfd.path;
  }

  /** For SpawnOptions.fds: the spawner's memfd at QEMU_RAM_FD in the child. */
  get passed(): [number, string] {
    return [QEMU_RAM_FD, this.memfd.name];
  }

  /** Nobody changes it any more (fails while it is mapped shared and writable: a QEMU still on it). */
  seal(): Promise<void> {
    return this.spawner.sealMemfd(this.memfd);
  }

  /** The server lets go of it: the QEMUs that map it keep it as long as they do. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.spawner.closeMemfd(this.memfd).catch(() => undefined); // the spawner is gone: so is the memfd
  }
}
