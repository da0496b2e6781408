/**
 * Checkpoints and rewind (issue 23): a sandbox's whole state (interpreter memory, files, cwd, env)
 * held frozen copy-on-write, restorable into the same sandbox id as often as wanted.
 *
 * Two mechanisms, chosen by the runtime:
 * - held checkpoints (`Runtime.heldCheckpoints`, the namespace runtime): the runtime keeps the
 *   frozen state inside the sandbox itself — a stopped fork of its interpreter in its own
 *   namespaces and memory group, its files frozen into a layer in its own directory — and
 *   restores in place (same runtime sandbox, namespaces, network). They count against the
 *   sandbox's own memory and disk limits exactly, and restores are unbounded
 *   (runtime/namespace/held-checkpoints.ts). An agent too old for them gets fork children.
 * - fork children (the VM runtime, and the fallback): a checkpoint is a fork child of the sandbox
 *   that is never handed out as a sandbox (no record, no API id, no network until promoted). A
 *   restore promotes it: its processes become the sandbox's live state under the same id (record,
 *   queue, limits, egress kept; the state they replace is destroyed). One used up by the restore
 *   (an atomic exec's, a rewound history step) costs nothing more; one that stays is first forked
 *   once more, and that copy is the checkpoint from then on. Each such restore adds one fork
 *   generation, and pid namespaces nest at most 32 deep: after ~28 restores a sandbox cannot
 *   checkpoint any more (a 409 that says so).
 *
 * Every operation runs in the sandbox's queue (behind a running exec: a restore during an exec
 * waits for it). Checkpoints die with their sandbox (`dropAll`).
 */
import { randomBytes } from 'node:crypto';
import {
  MAX_CHECKPOINTS, MAX_HISTORY, type AgentRequestBody, type CheckpointInfo, type VarInfo, type VarsDiff,
} from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import type { Logger } from '../log.js';
import type { HeldCheckpoint } from '@podflare/runtime';
import type { DiffOptions, FileDiff, RuntimeSandbox, SandboxLimits, SandboxSpec } from '../runtime/runtime.js';
import type { LiveSandbox } from './live-sandbox.js';

/**
 * One checkpoint: held inside its sandbox by the runtime (`held`), or a frozen fork child of it
 * (`rt`, where the runtime holds none).
 */
interface Checkpoint {
  id: string;
  sandboxId: string;
  name: string | null;
  kind: CheckpointInfo['kind'];
  createdAt: number;
  beforeCode: string | null;
  /** The frozen fork child; replaced by a copy when a restore promotes it and the checkpoint stays. */
  rt: RuntimeSandbox | null;
  held: HeldCheckpoint | null;
  /** The runtime sandbox holding `held` (a merge may since have given the sandbox another). */
  heldBy: RuntimeSandbox | null;
  /** Frees it (its processes and files); idempotent. */
  free(): Promise<void>;
}

/** A sandbox's checkpoints: named ones, its history (oldest first), and the one of an atomic exec. */
interface Book {
  manual: Map<string, Checkpoint>;
  history: Checkpoint[];
  /** How many history checkpoints to keep (0: no history). */
  keep: number;
}

/** What the checkpoints need of the sandbox manager. */
export interface CheckpointHost {
  log: Logger;
  /** A runtime id for a checkpoint or a restored state (names its directories and cgroups). */
  newRuntimeId(): string;
  /** The sandbox's limits (a checkpoint and a restored state get the same). */
  limitsOf(s: LiveSandbox): SandboxLimits;
  /** Whether `s` still drives its id (not ended, not merged away). */
  isLive(s: LiveSandbox): boolean;
  /** Makes `rt` the live state of `s` (same id, record, queue); the replaced state is destroyed. */
  replaceState(s: LiveSandbox, rt: RuntimeSandbox): Promise<void>;
}

/** What an exec's checkpoint step decided: `undo` restores on failure; `own` is freed after. */
export interface ExecUndo {
  checkpoint: Checkpoint;
  atomic: boolean;
  /** Made for this atomic exec only (not kept in the history): discarded once the exec is over. */
  own: boolean;
}

/** Checkpoint ids are `ckpt_` + 24 hex digits (CHECKPOINT_ID_PATTERN). */
function newCheckpointId(): string {
  return 'ckpt_' + randomBytes(12).toString('hex');
}

/** Interpreter variables of `b` relative to `a` (fingerprints compared). */
export function diffVars(a: Record<string, VarInfo>, b: Record<string, VarInfo>): VarsDiff {
  const view = (name: string, v: VarInfo) => ({ name, type: v.type, repr: v.repr });
  return {
    added: Object.keys(b).filter((k) => !(k in a)).sort().map((k) => view(k, b[k]!)),
    removed: Object.keys(a).filter((k) => !(k in b)).sort().map((k) => view(k, a[k]!)),
    changed: Object.keys(b).filter((k) => k in a && (a[k]!.fp !== b[k]!.fp || a[k]!.type !== b[k]!.type)).sort()
      .map((k) => ({ name: k, type: b[k]!.type, before: a[k]!.repr, after: b[k]!.repr })),
  };
}

export class Checkpoints {
  private readonly books = new Map<string, Book>();
  /** Checkpoints' runtime sandboxes that have ended (never promoted). */
  private readonly dead = new WeakSet<RuntimeSandbox>();
  /** Sandboxes whose agent cannot hold checkpoints (older than the op): fork children for them. */
  private readonly cannotHold = new WeakSet<RuntimeSandbox>();

  constructor(private readonly host: CheckpointHost) {}

  /** Refuses checkpoints on a runtime that cannot fork, saying what it can. */
  assertSupported(s: Pick<LiveSandbox, 'runtime'>): void {
    const c = s.runtime.capabilities;
    if (c.fork) return;
    const can = [c.freeze ? 'freeze/resume to disk' : null].filter(Boolean).join(', ') || 'no state snapshots';
    throw new SandboxError('not_supported', `the ${s.runtime.name} runtime cannot checkpoint a live sandbox (it cannot fork; it offers: ${can})`);
  }

  /** create's `history: n`: checkpoint before each exec, keep the last n. */
  setHistory(s: LiveSandbox, keep: number): void {
    if (keep > 0) this.assertSupported(s);
    if (keep > MAX_HISTORY) throw new SandboxError('bad_request', `history: at most ${MAX_HISTORY}`, { field: 'history' });
    this.book(s.record.id).keep = keep;
  }

  private book(sandboxId: string): Book {
    let b = this.books.get(sandboxId);
    if (!b) this.books.set(sandboxId, (b = { manual: new Map(), history: [], keep: 0 }));
    return b;
  }

  /** A named (or unnamed) checkpoint of `s` as of now; waits for a running exec. */
  async create(s: LiveSandbox, name?: string): Promise<CheckpointInfo> {
    this.assertSupported(s);
    return s.queue.run(async () => {
      if ((this.books.get(s.record.id)?.manual.size ?? 0) >= MAX_CHECKPOINTS) {
        throw new SandboxError('conflict', `sandbox ${s.record.id} holds ${MAX_CHECKPOINTS} checkpoints, the most it may: delete some first`);
      }
      const cp = await this.take(s, 'manual', name ?? null, null);
      this.book(s.record.id).manual.set(cp.id, cp);
      return this.info(cp);
    });
  }

  list(s: LiveSandbox): CheckpointInfo[] {
    const book = this.books.get(s.record.id);
    if (!book) return [];
    return [...book.history, ...book.manual.values()].sort((a, b) => a.createdAt - b.createdAt).map((c) => this.info(c));
  }

  /** Deletes one checkpoint of `s` (404 for one it does not have). */
  async delete(s: LiveSandbox, id: string): Promise<void> {
    this.find(s, id);
    // In the queue: a restore's copy of the checkpoint may still be in the making.
    await s.queue.run(async () => {
      const cp = this.find(s, id);
      this.forget(cp);
      await cp.free();
    });
  }

  /** `s` goes back to checkpoint `id` (which stays). Waits for a running exec. */
  async restore(s: LiveSandbox, id: string): Promise<CheckpointInfo> {
    this.find(s, id); // 404 at once, not after the queue
    return s.queue.run(async () => {
      const cp = this.find(s, id);
      await this.restoreNow(s, cp, true);
      return this.info(cp);
    });
  }

  /**
   * Undoes the last `steps` execs of a sandbox with history: back to the checkpoint taken before
   * the `steps`-th last exec; that checkpoint and the later ones are dropped (the next rewind goes
   * further back).
   */
  async rewind(s: LiveSandbox, steps: number): Promise<{ checkpoint: CheckpointInfo; steps: number; left: number }> {
    return s.queue.run(async () => {
      const book = this.books.get(s.record.id);
      if (!book || book.keep === 0) {
        throw new SandboxError('conflict', `sandbox ${s.record.id} keeps no history: create it with "history": n to rewind (or use checkpoints)`);
      }
      if (steps > book.history.length) {
        throw new SandboxError('conflict', `sandbox ${s.record.id} can rewind ${book.history.length} step(s) now, not ${steps} (it keeps the last ${book.keep})`, { field: 'steps' });
      }
      const dropped = book.history.slice(book.history.length - steps);
      const target = dropped[0]!;
      await this.restoreNow(s, target, false);
      for (const cp of dropped) {
        this.forget(cp);
        if (cp !== target) void cp.free();
      }
      return { checkpoint: this.info(target), steps, left: book.history.length };
    });
  }

  /** Files (`b` = now, relative to the checkpoint) and, on request, variables changed since. */
  async diff(s: LiveSandbox, id: string, opts: DiffOptions & { vars?: boolean }): Promise<FileDiff & { vars?: VarsDiff }> {
    this.find(s, id);
    return s.queue.run(async () => {
      const cp = this.find(s, id);
      const fileOpts = { paths: opts.paths, content: opts.content };
      const held = cp.held ? s.runtime.heldCheckpoints : undefined;
      if (held && cp.heldBy !== s.rt) throw new SandboxError('conflict', `checkpoint ${cp.id} is gone: the sandbox's state was replaced (a merge) since it was taken`);
      const files = held ? await held.diff(cp.held!, s.rt, fileOpts) : await s.runtime.diff(cp.rt!, s.rt, fileOpts);
      if (!opts.vars) return files;
      const [before, now] = await Promise.all([
        held ? held.vars(s.rt, cp.held!) : cp.rt!.channel.request({ op: 'vars' }).then((r) => r.vars),
        s.rt.channel.request({ op: 'vars' }).then((r) => r.vars),
      ]);
      return { ...files, vars: diffVars(before, now) };
    });
  }

  /**
   * Before an exec (inside the sandbox's queue): the history checkpoint, or an atomic exec's own.
   * Null when neither is wanted.
   */
  async beforeExec(s: LiveSandbox, body: AgentRequestBody<'exec'>, atomic: boolean): Promise<ExecUndo | null> {
    const book = this.books.get(s.record.id);
    const history = book !== undefined && book.keep > 0;
    if (!history && !atomic) return null;
    this.assertSupported(s);
    if (history) {
      let cp: Checkpoint;
      try {
        cp = await this.take(s, 'history', null, body.code.slice(0, 200));
      } catch (err) {
        // A history step that cannot be taken (the fork-depth bound, a full disk) must not stop the
        // exec: that step just cannot be rewound. An atomic exec cannot run without its checkpoint.
        if (atomic || !this.host.isLive(s)) throw err;
        this.host.log.warn('no history checkpoint before this exec', { sandbox: s.record.id, error: (err as Error).message });
        return null;
      }
      book.history.push(cp);
      // Oldest first out.
      while (book.history.length > book.keep) void book.history.shift()!.free();
      return { checkpoint: cp, atomic, own: false };
    }
    const cp = await this.take(s, 'manual', null, null);
    return { checkpoint: cp, atomic, own: true };
  }

  /**
   * After an exec (inside the queue): a failed atomic exec is undone (`rolled_back` on its exit);
   * an atomic exec's own checkpoint is freed. A failure to undo is the exec's error.
   */
  async afterExec<E extends { code: number; rolled_back?: boolean }>(s: LiveSandbox, undo: ExecUndo | null, exit: E): Promise<E> {
    if (!undo) return exit;
    try {
      if (undo.atomic && exit.code !== 0 && this.host.isLive(s)) {
        // Used up: the history step of an undone exec is no step (a rewind goes past it).
        const own = undo.own;
        undo.own = false; // its processes are the live state now (or gone)
        try {
          await this.restoreNow(s, undo.checkpoint, false);
          exit.rolled_back = true;
        } catch (err) {
          // The call's failure stands, not undone: `rolled_back: false` says so; the sandbox lives on.
          exit.rolled_back = false;
          if (own) void undo.checkpoint.free();
          this.host.log.warn('an atomic exec could not be undone', { sandbox: s.record.id, error: (err as Error).message });
        }
      }
    } finally {
      this.discard(undo);
    }
    return exit;
  }

  /** Frees an atomic exec's own checkpoint (idempotent; for execs that threw, too). */
  discard(undo: ExecUndo | null): void {
    if (undo?.own) {
      undo.own = false;
      void undo.checkpoint.free();
    }
  }

  /**
   * Proportional set size of a sandbox's checkpoints' processes, in bytes (capacity, benchmarks),
   * beyond the sandbox's own: a held checkpoint's process is one of the sandbox's (its PSS is in
   * the sandbox's), so only fork-child checkpoints add here.
   */
  async memoryPss(sandboxId: string): Promise<number> {
    const book = this.books.get(sandboxId);
    if (!book) return 0;
    const sizes = await Promise.all([...book.history, ...book.manual.values()].map((cp) => cp.rt?.memoryPss().catch(() => 0) ?? 0));
    return sizes.reduce((a, b) => a + b, 0);
  }

  /** The sandbox ended (or was merged away): its checkpoints go with it. */
  async dropAll(sandboxId: string): Promise<void> {
    const book = this.books.get(sandboxId);
    if (!book) return;
    this.books.delete(sandboxId);
    const all = [...book.history, ...book.manual.values()];
    book.history = [];
    book.manual.clear();
    await Promise.all(all.map((cp) => cp.free().catch((e: Error) => this.host.log.warn('checkpoint teardown failed', { sandbox: sandboxId, error: e.message }))));
  }

  /** `s`'s current state, kept frozen: held by the runtime, or else a fork child. Inside the queue. */
  private async take(s: LiveSandbox, kind: Checkpoint['kind'], name: string | null, beforeCode: string | null): Promise<Checkpoint> {
    if (!this.host.isLive(s)) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
    const holder = s.runtime.heldCheckpoints;
    if (holder && !this.cannotHold.has(s.rt)) {
      const rt = s.rt;
      let held: HeldCheckpoint | null = null;
      try {
        held = await holder.take(rt);
      } catch (err) {
        // An agent too old to hold checkpoints (adopted after an upgrade): fork children for it.
        if (!(err instanceof SandboxError && err.code === 'not_supported')) throw err;
        this.cannotHold.add(rt);
      }
      if (held) {
        let freed: Promise<void> | null = null;
        const free = () => (freed ??= holder.drop(rt, held!));
        if (!this.host.isLive(s)) {
          void free();
          throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} was deleted while it was checkpointed`);
        }
        return { id: newCheckpointId(), sandboxId: s.record.id, name, kind, createdAt: Date.now(), beforeCode, rt: null, held, heldBy: rt, free };
      }
    }
    const [rt] = await s.runtime.fork(s.rt, [this.spec(s)]);
    // Deleted while it forked (a DELETE does not queue): its checkpoints were dropped already.
    if (!this.host.isLive(s)) {
      void rt!.destroy();
      throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} was deleted while it was checkpointed`);
    }
    const cp: Checkpoint = {
      id: newCheckpointId(), sandboxId: s.record.id, name, kind, createdAt: Date.now(), beforeCode, rt: rt!, held: null, heldBy: null,
      free: () => cp.rt!.destroy(),
    };
    this.watch(cp, rt!);
    return cp;
  }

  /**
   * A checkpoint whose processes die is gone: killed from outside, the host short of memory, or by
   * the sandbox's own code (a checkpoint's pid namespace is nested in its sandbox's, so the
   * sandbox can see and signal it: a checkpoint undoes mistakes, it does not guard a sandbox
   * against its own hostile code — whose state it is anyway).
   */
  private watch(cp: Checkpoint, rt: RuntimeSandbox): void {
    void rt.exited.then(() => {
      this.dead.add(rt);
      if (cp.rt === rt) this.forget(cp);
    });
  }

  /**
   * Promotes `cp` to the live state of `s` (inside its queue). With `keep`, a copy of it (a fork
   * of the promoted state, made before the sandbox's next call runs) stays the checkpoint; without,
   * the checkpoint is used up (forgotten: its processes live on as `s`).
   *
   * What can wait is finished in the sandbox's queue after the answer: the network (slirp) and
   * the copy. Nothing runs in the sandbox before them (every call goes through the queue).
   */
  private async restoreNow(s: LiveSandbox, cp: Checkpoint, keep: boolean): Promise<void> {
    if (!this.host.isLive(s)) throw new SandboxError('sandbox_gone', `sandbox ${s.record.id} is gone`);
    if (!keep) this.forget(cp);
    if (cp.held) return this.restoreHeld(s, cp, keep);
    const promoted = cp.rt!;
    if (this.dead.has(promoted)) throw new SandboxError('conflict', `checkpoint ${cp.id} is gone: its processes ended (killed from inside the sandbox, or by the host)`);
    await promoted.ready;
    const network = this.networkLater(s) ? s.runtime.attachNetwork!(promoted) : Promise.resolve();
    network.catch(() => undefined);
    await this.host.replaceState(s, promoted);
    const finishing = async () => {
      await network.catch((e: Error) => this.host.log.warn('a restored sandbox could not get its network', { sandbox: s.record.id, error: e.message }));
      if (!keep) return;
      try {
        if (!this.host.isLive(s) || s.rt !== promoted) throw new Error('the restored state is gone');
        const [copy] = await s.runtime.fork(promoted, [this.spec(s)]);
        if (!this.host.isLive(s)) {
          void copy!.destroy(); // deleted meanwhile: its checkpoints were dropped already
          return;
        }
        cp.rt = copy!;
        this.watch(cp, copy!);
      } catch (err) {
        // The checkpoint's frozen state is the live one now: without a copy it is no checkpoint.
        this.forget(cp);
        this.host.log.warn('a restored checkpoint could not be kept', { sandbox: s.record.id, checkpoint: cp.id, error: (err as Error).message });
      }
    };
    void s.queue.run(finishing);
  }

  /**
   * A held checkpoint: the runtime restores it in place (same runtime sandbox: nothing of the
   * manager's changes but the activity time).
   */
  private async restoreHeld(s: LiveSandbox, cp: Checkpoint, keep: boolean): Promise<void> {
    if (cp.heldBy !== s.rt) {
      this.forget(cp);
      void cp.free();
      throw new SandboxError('conflict', `checkpoint ${cp.id} is gone: the sandbox's state was replaced (a merge) since it was taken`);
    }
    try {
      const { kept } = await s.runtime.heldCheckpoints!.restore(s.rt, cp.held!, keep);
      if (keep && !kept) this.forget(cp);
    } catch (err) {
      // Its process ended (killed from inside the sandbox): no checkpoint any more.
      if (!keep || (err instanceof SandboxError && /is gone|could not be taken/.test(err.message))) {
        this.forget(cp);
        void cp.free();
      }
      throw err;
    }
    s.record.lastActiveAt = Date.now();
  }

  /** Checkpoints get no network until promoted, where the runtime can attach it then. */
  private networkLater(s: LiveSandbox): boolean {
    return s.record.egress === true && s.runtime.attachNetwork !== undefined;
  }

  private spec(s: LiveSandbox): SandboxSpec {
    const r = s.record;
    return {
      id: this.host.newRuntimeId(), template: r.template, egress: this.networkLater(s) ? false : r.egress,
      // The same hostname as the sandbox's: a restored state looks like the sandbox it restores.
      hostname: `sbx-${r.id.slice(4, 16)}`,
      limits: this.host.limitsOf(s),
    };
  }

  private find(s: LiveSandbox, id: string): Checkpoint {
    const book = this.books.get(s.record.id);
    const cp = book?.manual.get(id) ?? book?.history.find((c) => c.id === id);
    if (!cp) throw new SandboxError('checkpoint_not_found', `sandbox ${s.record.id} has no checkpoint ${id} (never made, deleted, dropped from its history, or another sandbox's)`);
    return cp;
  }

  private forget(cp: Checkpoint): void {
    const book = this.books.get(cp.sandboxId);
    if (!book) return;
    if (book.manual.get(cp.id) === cp) book.manual.delete(cp.id);
    const i = book.history.indexOf(cp);
    if (i >= 0) book.history.splice(i, 1);
  }

  private info(cp: Checkpoint): CheckpointInfo {
    return {
      id: cp.id, sandbox: cp.sandboxId, name: cp.name, kind: cp.kind,
      created_at: new Date(cp.createdAt).toISOString(), before_code: cp.beforeCode,
    };
  }
}
