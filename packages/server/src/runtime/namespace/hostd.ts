/**
 * Client of the host helper (packages/server/host/podflare_hostd.py): one long-lived,
 * single-threaded Python process per server doing what Node cannot (setns into a sandbox's mount
 * namespace to mount a fork child's root there, copying and diffing overlay layers with their xattrs). JSON lines on its stdin/stdout.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { DiffOptions, FileDiff } from '../runtime.js';

const HOSTD = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_hostd.py');

export class HostHelper {
  private child: ChildProcess | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve(v: Record<string, unknown>): void; reject(e: Error): void }>();
  private buffer = '';

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

  /** A small private tmpfs at `target` in the mount namespace of `pid`, owned by uid/gid `owner`. */
  tmpfs(pid: number, target: string, owner: number): Promise<void> {
    return this.call({ op: 'tmpfs', pid, target, uid: owner, gid: owner }).then(() => undefined);
  }

  async diff(a: string[], b: string[], opts: DiffOptions): Promise<FileDiff> {
    const { id: _id, ok: _ok, ...diff } = await this.call({ op: 'diff', a, b, paths: opts.paths, content: opts.content });
    return diff as unknown as FileDiff;
  }

  close(): void {
    this.child?.kill('SIGKILL');
    this.child = null;
  }

  private start(): ChildProcess {
    const child = spawn('/usr/bin/python3', ['-I', HOSTD], { stdio: ['pipe', 'pipe', 'inherit'] });
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      this.buffer += d;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) !== -1) {
        const line = this.buffer.slice(0, nl);
        this.buffer = this.buffer.slice(nl + 1);
        const msg = JSON.parse(line) as { id: number; ok: boolean; error?: string };
        const p = this.pending.get(msg.id);
        if (!p) continue;
        this.pending.delete(msg.id);
        if (msg.ok) p.resolve(msg as unknown as Record<string, unknown>);
        else p.reject(new Error(`host helper: ${msg.error}`));
      }
    });
    child.once('exit', () => {
      if (this.child === child) this.child = null;
      for (const p of this.pending.values()) p.reject(new Error('host helper exited'));
      this.pending.clear();
      this.buffer = '';
    });
    return child;
  }

  private call(req: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.child ??= this.start();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.child!.stdin!.write(JSON.stringify({ ...req, id }) + '\n');
    });
  }
}
