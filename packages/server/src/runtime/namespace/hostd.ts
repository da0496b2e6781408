/**
 * Client of the host helper (packages/server/host/podflare_hostd.py): a few long-lived,
 * single-threaded Python processes per server (a HelperPool) doing what Node cannot (setns into a
 * sandbox's mount namespace to mount a fork child's root there, copying and diffing overlay layers
 * with their xattrs). JSON lines on their stdin/stdout.
 *
 * Several workers, so one tenant's slow call (a huge diff) cannot stall another's fork; a timeout
 * on every call, so a stuck one cannot stall its caller forever (the worker is killed and
 * replaced). `idmap` is set-up: state inside each worker, replayed on every replacement. An
 * overlay handle lives in the worker that prepared it, so its attach or discard goes there.
 *
 * Adding an op: its request and reply schemas in host-protocol.ts, one method calling
 * `this.run({ op, ... })`; it gets the slow class's timeout unless listed in FAST_OPS.
 * Requests are checked before they are sent, replies against their op's schema when they come: a
 * reply that does not match fails its call and is logged as a helper bug.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { HelperPool, HelperWorkerGoneError, type RestartReason, type WorkerRef } from '../../helper-pool.js';
import type { Logger } from '../../log.js';
import {
  describeIssue, HelperReplyError, HostdReplySchemas, HostdRequestSchemas, parseHelperReply,
  type HostdOp, type HostdReply, type HostdRequest,
} from '../../host-protocol.js';
import type { DiffOptions, FileDiff } from '../runtime.js';

const HOSTD = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_hostd.py');

/** Ops that touch no tree of unbounded size: a few mount syscalls each. */
const FAST_OPS = new Set<HostdOp>(['idmap', 'overlay', 'overlay_prepare', 'overlay_attach', 'overlay_discard', 'unmount', 'tmpfs']);

export interface HostHelperOptions {
  /** Worker processes. @default 3 */
  workers?: number;
  /** Timeout of a mount op (overlay, unmount, tmpfs, idmap). @default 10 s */
  fastTimeoutMs?: number;
  /** Timeout of everything else (diff, squash, subvolumes, removals). @default 120 s */
  slowTimeoutMs?: number;
  log: Logger;
}

export const HOST_HELPER_DEFAULTS = { workers: 3, fastTimeoutMs: 10_000, slowTimeoutMs: 120_000 } as const;

export class HostHelper {
  private readonly pool: HelperPool;
  /** Overlay handles given out → the worker holding the mounts and its own handle for them. */
  private readonly handles = new Map<number, { worker: WorkerRef; handle: number }>();
  private nextHandle = 1;
  private readonly log: Logger;

  constructor(o: HostHelperOptions) {
    this.log = o.log;
    const fast = o.fastTimeoutMs ?? HOST_HELPER_DEFAULTS.fastTimeoutMs;
    const slow = o.slowTimeoutMs ?? HOST_HELPER_DEFAULTS.slowTimeoutMs;
    this.pool = new HelperPool({
      script: HOSTD,
      name: 'host helper',
      size: o.workers ?? HOST_HELPER_DEFAULTS.workers,
      timeoutMs: (op) => (FAST_OPS.has(op as HostdOp) ? fast : slow),
      log: o.log,
    });
  }

  /** Workers replaced so far (died, timed out, faulted): the restarts metric. */
  restarts(): Array<{ reason: RestartReason; count: number }> {
    return this.pool.restarts();
  }

  /**
   * Overlays made from now on see these image layers through idmapped mounts shifting owners by
   * `base` (image root = the sandboxes' unprivileged root, host uid `base`). Replayed on every
   * worker that starts later.
   */
  idmap(base: number, count: number, layers: string[]): Promise<void> {
    return this.pool.setUp(this.request({ op: 'idmap', base, count, layers }));
  }

  /**
   * Mounts an overlay at `target` in the mount namespace of `pid` (null: the host's own), with
   * host binds below it.
   */
  overlay(pid: number | null, o: { lowers: string[]; upper: string; work: string; target: string; binds?: Array<{ source: string; target: string }> }): Promise<void> {
    return this.run({ op: 'overlay', pid, ...o }).then(() => undefined);
  }

  /**
   * The mounts of `overlay`, made now but placed later by `attachOverlay` (or dropped by
   * `discardOverlay`): a fork child's root is made while the child is still being forked.
   */
  async prepareOverlay(o: { lowers: string[]; upper: string; work: string; binds?: Array<{ source: string; target: string }> }): Promise<number> {
    const { reply, worker } = await this.pool.call(this.request({ op: 'overlay_prepare', ...o }));
    const prepared = this.reply('overlay_prepare', reply);
    const handle = this.nextHandle++;
    this.handles.set(handle, { worker, handle: prepared.handle });
    return handle;
  }

  /** Places prepared mounts; fails clearly if the worker holding them has exited since. */
  async attachOverlay(handle: number, pid: number, target: string): Promise<void> {
    const held = this.takeHandle(handle);
    this.reply('overlay_attach', await this.pool.callOn(held.worker, this.request({ op: 'overlay_attach', handle: held.handle, pid, target })));
  }

  async discardOverlay(handle: number): Promise<void> {
    const held = this.takeHandle(handle);
    try {
      this.reply('overlay_discard', await this.pool.callOn(held.worker, this.request({ op: 'overlay_discard', handle: held.handle })));
    } catch (err) {
      // A worker that has exited took the mounts with it: nothing left to drop.
      if (!(err instanceof HelperWorkerGoneError)) throw err;
    }
  }

  /** A btrfs subvolume at `path` (on the disk volume) that may hold at most `limitBytes`. */
  subvolume(path: string, limitBytes: number): Promise<void> {
    return this.run({ op: 'subvolume', path, limit_bytes: limitBytes }).then(() => undefined);
  }

  diskLimit(path: string, limitBytes: number): Promise<void> {
    return this.run({ op: 'disk_limit', path, limit_bytes: limitBytes }).then(() => undefined);
  }

  /** One new layer equal to `sources` (topmost first) stacked, over the same lowers. */
  squashLayers(sources: string[], target: string): Promise<void> {
    return this.run({ op: 'squash_layers', sources, target }).then(() => undefined);
  }

  /**
   * A template's layer at `target` (new) copied from a sandbox's tree `source`, owners shifted
   * from the sandbox range to image ids, bounded (podflare_template_layer.py). Resolves with the bytes copied.
   */
  async templateLayer(o: { source: string; target: string; base: number; count: number; maxBytes: number; maxEntries: number; maxDepth: number }): Promise<number> {
    const reply = await this.run<'template_layer'>({
      op: 'template_layer', source: o.source, target: o.target, base: o.base, count: o.count,
      max_bytes: o.maxBytes, max_entries: o.maxEntries, max_depth: o.maxDepth,
    });
    return reply.bytes;
  }

  /** Lazily unmounts `target` in the host's mount namespace. */
  unmount(target: string): Promise<void> {
    return this.run({ op: 'unmount', target }).then(() => undefined);
  }

  /** A small private tmpfs at `target` in the mount namespace of `pid`, owned by uid/gid `owner`. */
  tmpfs(pid: number, target: string, owner: number): Promise<void> {
    return this.run({ op: 'tmpfs', pid, target, uid: owner, gid: owner }).then(() => undefined);
  }

  /**
   * Removes a tree a sandbox made or filled (its directory, a fork layer, a trash entry) without
   * following anything planted in it: fd-relative, as root (podflare_safefs.py). Missing is fine.
   */
  removeTree(path: string): Promise<void> {
    return this.run({ op: 'remove_tree', path }).then(() => undefined);
  }

  /** Two layer stacks compared; the reply is bounded (`truncated: true` past its bounds). */
  async diff(a: string[], b: string[], opts: DiffOptions): Promise<FileDiff> {
    return this.run<'diff'>({ op: 'diff', a, b, paths: opts.paths, content: opts.content });
  }

  close(): void {
    this.pool.close();
  }

  /** One call on whichever worker is free; its reply checked against its op's schema. */
  private async run<O extends HostdOp>(req: HostdRequest<O>): Promise<HostdReply<O>> {
    return this.reply(req.op as O, (await this.pool.call(this.request(req))).reply);
  }

  /** `req` checked against its op's schema (a failure is a bug of the server's, not the helper's). */
  private request<O extends HostdOp>(req: HostdRequest<O>): Record<string, unknown> {
    const checked = HostdRequestSchemas[req.op as O].safeParse(req);
    if (!checked.success) throw new Error(`host helper: bad ${req.op} request: ${describeIssue(checked.error)}`);
    return checked.data as Record<string, unknown>;
  }

  /** The reply's result, checked against its op's schema; a mismatch is logged as a helper bug. */
  private reply<O extends HostdOp>(op: O, reply: Record<string, unknown>): HostdReply<O> {
    try {
      return parseHelperReply('host helper', op, HostdReplySchemas[op], reply) as HostdReply<O>;
    } catch (err) {
      if (err instanceof HelperReplyError) this.log.error('host helper bug: a reply does not match its schema', { op, error: err.problem });
      throw err;
    }
  }

  private takeHandle(handle: number): { worker: WorkerRef; handle: number } {
    const held = this.handles.get(handle);
    if (!held) throw new Error(`host helper: no prepared overlay ${handle}`);
    this.handles.delete(handle);
    return held;
  }
}
