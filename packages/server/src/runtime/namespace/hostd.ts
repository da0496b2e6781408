/**
 * Client of the host helper (packages/server/host/podflare_hostd.py): one long-lived,
 * single-threaded Python process per server doing what Node cannot (setns into a sandbox's mount
 * namespace to mount a fork child's root there, copying and diffing overlay layers with their xattrs). JSON lines on its stdin/stdout.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { HelperProcess } from '../../helper-process.js';
import type { DiffOptions, FileDiff } from '../runtime.js';

const HOSTD = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_hostd.py');

export class HostHelper {
  private readonly helper = new HelperProcess({ script: HOSTD, name: 'host helper' });

  /**
   * Overlays made from now on see these image layers through idmapped mounts shifting owners by
   * `base` (image root = the sandboxes' unprivileged root, host uid `base`).
   */
  idmap(base: number, count: number, layers: string[]): Promise<void> {
    return this.call({ op: 'idmap', base, count, layers }).then(() => undefined);
  }

  /**
   * Mounts an overlay at `target` in the mount namespace of `pid` (null: the host's own), with
   * host binds below it.
   */
  overlay(pid: number | null, o: { lowers: string[]; upper: string; work: string; target: string; binds?: Array<{ source: string; target: string }> }): Promise<void> {
    return this.call({ op: 'overlay', pid, ...o }).then(() => undefined);
  }

  /**
   * The mounts of `overlay`, made now but placed later by `attachOverlay` (or dropped by
   * `discardOverlay`): a fork child's root is made while the child is still being forked.
   */
  async prepareOverlay(o: { lowers: string[]; upper: string; work: string; binds?: Array<{ source: string; target: string }> }): Promise<number> {
    return (await this.call({ op: 'overlay_prepare', ...o })).handle as number;
  }

  attachOverlay(handle: number, pid: number, target: string): Promise<void> {
    return this.call({ op: 'overlay_attach', handle, pid, target }).then(() => undefined);
  }

  discardOverlay(handle: number): Promise<void> {
    return this.call({ op: 'overlay_discard', handle }).then(() => undefined);
  }

  /** A btrfs subvolume at `path` (on the disk volume) that may hold at most `limitBytes`. */
  subvolume(path: string, limitBytes: number): Promise<void> {
    return this.call({ op: 'subvolume', path, limit_bytes: limitBytes }).then(() => undefined);
  }

  diskLimit(path: string, limitBytes: number): Promise<void> {
    return this.call({ op: 'disk_limit', path, limit_bytes: limitBytes }).then(() => undefined);
  }

  /** One new layer equal to `sources` (topmost first) stacked, over the same lowers. */
  squashLayers(sources: string[], target: string): Promise<void> {
    return this.call({ op: 'squash_layers', sources, target }).then(() => undefined);
  }

  /** Lazily unmounts `target` in the host's mount namespace. */
  unmount(target: string): Promise<void> {
    return this.call({ op: 'unmount', target }).then(() => undefined);
  }

  /** A small private tmpfs at `target` in the mount namespace of `pid`, owned by uid/gid `owner`. */
  tmpfs(pid: number, target: string, owner: number): Promise<void> {
    return this.call({ op: 'tmpfs', pid, target, uid: owner, gid: owner }).then(() => undefined);
  }

  /**
   * Removes a tree a sandbox made or filled (its directory, a fork layer, a trash entry) without
   * following anything planted in it: fd-relative, as root (podflare_safefs.py). Missing is fine.
   */
  removeTree(path: string): Promise<void> {
    return this.call({ op: 'remove_tree', path }).then(() => undefined);
  }

  /** Two layer stacks compared; the reply is bounded (`truncated: true` past its bounds). */
  async diff(a: string[], b: string[], opts: DiffOptions): Promise<FileDiff> {
    const { id: _id, ok: _ok, ...diff } = await this.call({ op: 'diff', a, b, paths: opts.paths, content: opts.content });
    return diff as unknown as FileDiff;
  }

  close(): void {
    this.helper.close();
  }

  private call(req: Record<string, unknown>): Promise<Record<string, unknown>> {
    return this.helper.call(req);
  }
}
