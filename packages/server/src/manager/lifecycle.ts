/**
 * A sandbox's life from creation to end: reconcile with a previous server at start-up, create
 * (caps, pool, limits, record), adopt a runtime sandbox under a record, notice it crash, end it
 * (record first, teardown behind the answer).
 */
import { isEgressPolicy, type CreateSandboxBody, type EgressSetting } from '@podflare/protocol';
import { AUTO_RUNTIME, SandboxError } from '@podflare/runtime';
import { resolveLimits, sameLimits } from '../limits.js';
import type { Runtime, RuntimeSandbox } from '../runtime/runtime.js';
import type { SandboxRecord } from '../store/store.js';
import type { Capacity } from './capacity.js';
import type { ManagerContext } from './context.js';
import { DEFAULT_TEMPLATE, newLiveSandbox, type LiveSandbox } from './live-sandbox.js';
import type { CreateMissReason, PoolUse } from './pool-use.js';
import { checkTemplate } from './template-policy.js';

export interface CreateOptions extends CreateSandboxBody {
  owner: string;
}

export interface Created {
  record: SandboxRecord;
  /** Null when the warm pool served it. */
  poolMiss: CreateMissReason | null;
}

/** After its agent's channel closed, how long a sandbox's own exit may take to say why. */
const CHANNEL_EXIT_GRACE_MS = 1000;

export class Lifecycle {
  /** Teardowns still running after their DELETE answered; close() waits for them. */
  private readonly teardowns = new Set<Promise<void>>();

  constructor(
    private readonly ctx: ManagerContext,
    private readonly capacity: Capacity,
    private readonly pool: PoolUse,
    /** Runs before a sandbox's teardown (its checkpoints go first: they are its runtime's fork children). */
    private readonly beforeTeardown: (s: LiveSandbox) => Promise<void> = async () => undefined,
  ) {}

  /**
   * Start-up: reconcile with what an earlier server on this state directory left (it may have been
   * killed): sandboxes the runtime can take over live on under their records; every other record
   * still marked live becomes `lost`, its leftovers removed by the runtime.
   */
  async reconcile(): Promise<void> {
    const { store, runtimes, log } = this.ctx;
    // Frozen sandboxes live on disk, not in the dead server's processes: they outlive it.
    const previous = (await store.list({})).filter((r) => r.state !== 'frozen');
    // The runtimes at once: a restart listens only once every one has adopted its sandboxes.
    const adopted: RuntimeSandbox[] = (await Promise.all([...runtimes.values()].map(async (runtime) => {
      const mine = previous.filter((r) => r.runtime === runtime.name);
      return (await runtime.reconcile(mine.map((r) => r.id))).adopted;
    }))).flat();
    const byId = new Map(adopted.map((rt) => [rt.id, rt]));
    const now = Date.now();
    let lost = 0;
    for (const record of previous) {
      const rt = byId.get(record.id);
      const runtime = runtimes.get(record.runtime);
      if (rt && runtime) {
        this.adopt({ ...record, state: 'ready', lastActiveAt: now }, runtime, rt);
        byId.delete(record.id);
        continue;
      }
      lost++;
      await store.update(record.id, {
        state: 'lost', endedAt: now,
        endReason: 'the server was restarted while it ran and its agent no longer answered: its processes, mounts and files were removed',
      });
    }
    // Taken over but without a record (a warm-pool sandbox of the dead server): not ours to keep.
    // Torn down behind the start (close() waits), so that the adopted sandboxes answer sooner.
    for (const rt of byId.values()) this.behind(rt.id, rt.destroy());
    if (lost || adopted.length) log.info('reconciled with the previous server', { adopted: adopted.length - byId.size, lost });
  }

  async create(opts: CreateOptions): Promise<Created> {
    if (this.ctx.status.closing) throw new SandboxError('unavailable', 'the server is shutting down');
    const template = opts.template ?? DEFAULT_TEMPLATE;
    const runtime = this.pickRuntime(opts.runtime);
    await checkTemplate(template, runtime, this.ctx.templates, opts.owner);
    const release = this.capacity.reserve(opts.owner, 1);
    try {
      return await this.createReserved(opts, runtime, template, release);
    } finally {
      release();
    }
  }

  /** `release` is called as soon as the sandbox counts as live (exactly once, with create's finally). */
  private async createReserved(opts: CreateOptions, runtime: Runtime, template: string, release: () => void): Promise<Created> {
    const { config } = this.ctx;
    const limits = resolveLimits(opts.limits, config.defaultLimits, config.maxLimits);
    const egress: EgressSetting = isEgressPolicy(opts.egress) ? { allow: [...opts.egress.allow] } : (opts.egress ?? true);
    const timed = this.ctx.metrics.createSeconds.time();
    const { rt, poolMiss } = await this.pool.acquire(runtime, template, egress);
    // Pooled sandboxes start with the default limits; a creator asking for others gets them now.
    if (!sameLimits(limits, config.defaultLimits) && rt.setLimits) {
      try {
        await rt.setLimits(limits);
      } catch (err) {
        void rt.destroy();
        throw new SandboxError('unavailable', `could not apply the sandbox's limits: ${(err as Error).message}`, { retryAfterSeconds: 1 });
      }
    }
    const now = Date.now();
    const record: SandboxRecord = {
      id: rt.id, state: 'ready', template, runtime: runtime.name, egress,
      persistent: opts.persistent ?? false, parentId: null, createdAt: now, lastActiveAt: now,
      endedAt: null, endReason: null,
      idleTimeoutSeconds: opts.idle_timeout_seconds ?? config.idleTimeoutSeconds,
      maxLifetimeSeconds: Math.min(opts.max_lifetime_seconds ?? config.maxLifetimeSeconds, config.maxLifetimeSeconds),
      metadata: opts.metadata ?? {}, owner: opts.owner, limits,
    };
    try {
      await this.ctx.store.insert(record);
    } catch (err) {
      // No record, no sandbox (a cluster node whose database is mid-failover): nothing may run unrecorded.
      void rt.destroy();
      throw new SandboxError('unavailable', `could not record the sandbox: ${(err as Error).message}`, { retryAfterSeconds: 2 });
    }
    this.adopt(record, runtime, rt);
    release();
    this.ctx.counters.created++;
    if (poolMiss === 'egress_policy') this.pool.notePolicyCreate();
    timed();
    this.ctx.changes.emit('change', record.id);
    return { record, poolMiss: poolMiss ?? null };
  }

  /** A registered runtime this server offers; omitted or `auto` is the server's default. */
  private pickRuntime(name: CreateOptions['runtime']): Runtime {
    if (name === undefined || name === AUTO_RUNTIME) return this.ctx.defaultRuntime;
    if (!this.ctx.knownRuntimes.includes(name)) {
      const choices = [...this.ctx.knownRuntimes, AUTO_RUNTIME].map((n) => JSON.stringify(n)).join('|');
      throw new SandboxError('bad_request', `runtime: Invalid option: expected one of ${choices}`, { field: 'runtime' });
    }
    const r = this.ctx.runtimes.get(name);
    if (!r) {
      throw new SandboxError('bad_request', `the ${name} runtime is not available on this server (see \`podflare doctor\`)`, { field: 'runtime' });
    }
    return r;
  }

  /** Makes `rt` the live sandbox of `record`: reachable through the API from now on. */
  adopt(record: SandboxRecord, runtime: Runtime, rt: RuntimeSandbox): LiveSandbox {
    const s = newLiveSandbox(record, runtime, rt);
    rt.channel.on('violation', (what) => this.ctx.log.warn('sandbox agent protocol violation', { sandbox: record.id, violation: what }));
    this.ctx.live.set(record.id, s);
    // Execs and forks queue behind a runtime sandbox that is not fully set up yet.
    if (rt.ready) void s.queue.run(() => rt.ready!);
    this.watch(s, rt);
    return s;
  }

  /**
   * A runtime sandbox dying on its own ends whichever API sandbox drives it at that moment; so does
   * its agent's channel breaking (the sandbox cannot be driven any more: it is not `ready`).
   */
  watch(s: LiveSandbox, rt: RuntimeSandbox): void {
    const crashed = (reason: string) => {
      if (s.rt !== rt || this.ctx.live.get(s.record.id) !== s) return;
      // Stopping: close() ends every sandbox itself, or (onStop 'keep') lets go of their channels
      // on purpose, leaving the sandboxes and their records for the next server.
      if (this.ctx.status.closing) return;
      this.ctx.counters.crashed++;
      void this.end(s, 'error', reason);
    };
    void rt.exited.then(({ reason }) => crashed(reason));
    // A dying sandbox closes its channel first: its own exit reason, when it comes soon, says more.
    const onClose = (reason: string) => void Promise.race([rt.exited, new Promise((r) => setTimeout(r, CHANNEL_EXIT_GRACE_MS))])
      .then(() => crashed(`the sandbox's agent channel broke: ${reason}`));
    if (rt.channel.closed) onClose(rt.channel.closeReason ?? 'closed');
    else rt.channel.once('close', onClose);
  }

  /** Ends a live sandbox: its record says why at once; the runtime tears down behind the answer. */
  async end(s: LiveSandbox, state: 'stopped' | 'error', reason: string): Promise<void> {
    const { live, counters, log, store, changes, eventLog } = this.ctx;
    if (live.get(s.record.id) !== s) return;
    live.delete(s.record.id);
    counters.destroyed++;
    s.record.state = state;
    s.record.endedAt = Date.now();
    s.record.endReason = reason;
    log.debug('sandbox ended', { sandbox: s.record.id, state, reason });
    await store.update(s.record.id, { state, endedAt: s.record.endedAt, endReason: reason, lastActiveAt: s.record.lastActiveAt });
    changes.emit('change', s.record.id);
    // The sandbox is already unreachable through the API: kill and clean up behind the answer.
    const rt = s.rt;
    const teardown = this.beforeTeardown(s).then(() => rt.destroy())
      .catch((err: Error) => log.error('teardown failed', { sandbox: s.record.id, error: err.message }));
    this.teardowns.add(teardown);
    void teardown.finally(() => {
      this.teardowns.delete(teardown);
      eventLog.drop(rt.id);
    });
  }

  /**
   * A restore (manager/checkpoints.ts): `rt` becomes the live state of `s` under its id (record,
   * queue, limits kept); the state it replaces is torn down behind the answer. Inside `s`'s queue.
   */
  replaceState(s: LiveSandbox, rt: RuntimeSandbox): void {
    const { log, changes, eventLog } = this.ctx;
    const old = s.rt;
    s.rt = rt;
    this.watch(s, rt);
    s.record.lastActiveAt = Date.now();
    changes.emit('change', s.record.id);
    const teardown = old.destroy().catch((err: Error) => log.error('teardown failed', { sandbox: s.record.id, error: err.message }));
    this.teardowns.add(teardown);
    void teardown.finally(() => {
      this.teardowns.delete(teardown);
      eventLog.drop(old.id);
    });
  }

  /** A teardown going on behind an answer: logged if it fails, waited for by close(). */
  private behind(id: string, work: Promise<void>): void {
    const teardown = work.catch((err: Error) => this.ctx.log.error('teardown failed', { sandbox: id, error: err.message }));
    this.teardowns.add(teardown);
    void teardown.finally(() => this.teardowns.delete(teardown));
  }

  /** Resolves once every teardown begun so far has finished. */
  async teardownsDone(): Promise<void> {
    await Promise.all([...this.teardowns]);
  }
}
