/**
 * Owns the live sandboxes: creation (from the warm pool or on demand), the one-exec-at-a-time
 * queue, idle timeouts and lifetimes, crash detection, and the records in the store. The HTTP layer
 * calls this; it never touches a runtime directly.
 */
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import type { AgentRequestBody, CreateSandboxBody, ExecStreamMessage, SandboxInfo } from '@podflare/protocol';
import type { ServerConfig } from './config.js';
import { ApiError } from './errors.js';
import type { Logger } from './log.js';
import { WarmPool, type PoolKey } from './pool.js';
import type { Runtime, RuntimeSandbox } from './runtime/runtime.js';
import { SerialQueue } from './serial-queue.js';
import type { SandboxRecord, SandboxStore } from './store/store.js';

export const DEFAULT_TEMPLATE = 'default';

export function newSandboxId(): string {
  return 'sbx_' + randomBytes(16).toString('hex');
}

interface LiveSandbox {
  record: SandboxRecord;
  /** The runtime that runs it (children of a fork share their parent's). */
  runtime: Runtime;
  rt: RuntimeSandbox;
  queue: SerialQueue;
  /** Set while an exec runs: lets interrupt and the idle sweep know. */
  running: number;
}

export interface CreateOptions extends CreateSandboxBody {
  owner: string;
}

export type RuntimeKind = Runtime['name'];

/**
 * VM clones cost far more than namespace sandboxes (a QEMU each, ~100 MB): keep at most this many
 * warm per key.
 */
const VM_POOL_MAX = 2;

export class SandboxManager {
  private readonly live = new Map<string, LiveSandbox>();
  /** Teardowns still running after their DELETE answered; close() waits for them. */
  private readonly teardowns = new Set<Promise<void>>();
  private readonly pool: WarmPool;
  private readonly sweeper: NodeJS.Timeout;
  private closing = false;
  readonly defaultRuntime: Runtime;
  readonly counters = { created: 0, destroyed: 0, crashed: 0, expired: 0, forked: 0, merged: 0, frozen: 0, resumed: 0 };

  private readonly runtimes = new Map<RuntimeKind, Runtime>();

  constructor(
    /** Every runtime this server offers; the first is the default (`runtime` omitted or `auto`). */
    runtimes: Runtime[],
    private readonly store: SandboxStore,
    private readonly config: ServerConfig,
    private readonly log: Logger,
  ) {
    for (const r of runtimes) this.runtimes.set(r.name, r);
    this.defaultRuntime = runtimes[0]!;
    this.pool = new WarmPool((key) => this.startRuntimeSandbox(key, true), {
      target: config.poolSize,
      maxParallelStarts: 2,
      log,
    });
    this.sweeper = setInterval(() => void this.sweep(), 1000);
    this.sweeper.unref();
  }

  /** Start-up: forget sandboxes of a previous server (their processes died with it) and warm the pool. */
  async start(): Promise<void> {
    const ended = await this.store.endAllLive('server restarted', Date.now());
    if (ended) this.log.info('marked sandboxes of the previous server as ended', { count: ended });
    for (const r of this.runtimes.values()) await r.cleanupOrphans();
    const key: PoolKey = { runtime: this.defaultRuntime.name, template: DEFAULT_TEMPLATE, egress: true };
    this.pool.warm(key, this.poolTarget(key.runtime));
  }

  get poolStats() {
    return this.pool.stats();
  }

  waitPoolFull(timeoutMs?: number): Promise<void> {
    return this.pool.waitFull(timeoutMs);
  }

  get liveCount(): number {
    return this.live.size;
  }

  async create(opts: CreateOptions): Promise<SandboxRecord> {
    if (this.closing) throw new ApiError('unavailable', 'the server is shutting down');
    const template = opts.template ?? DEFAULT_TEMPLATE;
    if (template !== DEFAULT_TEMPLATE) throw new ApiError('bad_request', `unknown template "${template}" (available: ${DEFAULT_TEMPLATE})`, 'template');
    const runtime = this.pickRuntime(opts.runtime);
    if (this.live.size >= this.config.maxSandboxes) {
      throw new ApiError('rate_limited', `the server already runs ${this.live.size} sandboxes (max ${this.config.maxSandboxes})`, undefined, { 'Retry-After': '5' });
    }
    const key: PoolKey = { runtime: runtime.name, template, egress: opts.egress ?? true };
    const rt = this.pool.take(key, Math.min(this.poolTarget(runtime.name), Math.max(1, Math.floor(this.config.poolSize / 4)))) ?? (await this.startOnDemand(key));
    const now = Date.now();
    const record: SandboxRecord = {
      id: rt.id, state: 'ready', template, runtime: runtime.name, egress: key.egress,
      persistent: opts.persistent ?? false, parentId: null, createdAt: now, lastActiveAt: now,
      endedAt: null, endReason: null,
      idleTimeoutSeconds: opts.idle_timeout_seconds ?? this.config.idleTimeoutSeconds,
      maxLifetimeSeconds: Math.min(opts.max_lifetime_seconds ?? this.config.maxLifetimeSeconds, this.config.maxLifetimeSeconds),
      metadata: opts.metadata ?? {}, owner: opts.owner,
    };
    await this.store.insert(record);
    this.adopt(record, runtime, rt);
    this.counters.created++;
    return record;
  }

  /** `vm`/`ns` must be offered by this server; omitted or `auto` is the server's default. */
  private pickRuntime(name: CreateOptions['runtime']): Runtime {
    if (name === undefined || name === 'auto') return this.defaultRuntime;
    const r = this.runtimes.get(name);
    if (!r) throw new ApiError('bad_request', `the ${name} runtime is not available on this server (see \`podflare doctor\`)`, 'runtime');
    return r;
  }

  private poolTarget(runtime: RuntimeKind): number {
    return runtime === 'vm' ? Math.min(VM_POOL_MAX, this.config.poolSize) : this.config.poolSize;
  }

  /** The live sandbox, or the error a user should see: 404 never existed, 410 ended. */
  async get(id: string, owner?: string): Promise<LiveSandbox> {
    const s = this.live.get(id);
    if (s && (owner === undefined || s.record.owner === owner)) return s;
    const record = await this.store.get(id);
    if (!record || (owner !== undefined && record.owner !== owner) || record.state === 'merged') {
      throw new ApiError('not_found', `sandbox ${id} not found`);
    }
    // A frozen sandbox comes back transparently on the next call that needs it.
    if (record.state === 'frozen') return this.resume(record);
    throw new ApiError('sandbox_gone', `sandbox ${id} is gone (${record.state}${record.endReason ? `: ${record.endReason}` : ''})`);
  }

  async info(id: string, owner?: string): Promise<SandboxInfo> {
    const live = this.live.get(id);
    const record = live?.record ?? (await this.store.get(id));
    if (!record || (owner !== undefined && record.owner !== owner) || record.state === 'merged') throw new ApiError('not_found', `sandbox ${id} not found`);
    return this.toInfo(record, await this.store.children(id));
  }

  async list(filter: { ancestor?: string; state?: SandboxRecord['state']; all?: boolean }, owner?: string): Promise<SandboxInfo[]> {
    const records = await this.store.list({ ancestor: filter.ancestor, state: filter.state, includeEnded: filter.all, owner });
    return Promise.all(records.map(async (r) => this.toInfo(this.live.get(r.id)?.record ?? r, await this.store.children(r.id))));
  }

  /** Runs code; `onEvent` sees the agent's stream. Queued behind other execs of the same sandbox. */
  async exec(s: LiveSandbox, body: AgentRequestBody<'exec'>, onEvent: (msg: ExecStreamMessage) => void) {
    return s.queue.run(async () => {
      if (!this.live.has(s.record.id)) throw new ApiError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      s.running++;
      this.setState(s, 'running');
      try {
        return await s.rt.channel.exec(body, onEvent);
      } finally {
        s.running--;
        s.record.lastActiveAt = Date.now();
        if (this.live.has(s.record.id)) this.setState(s, 'ready');
      }
    });
  }

  async interrupt(s: LiveSandbox): Promise<boolean> {
    if (!s.running) return false;
    const answer = await s.rt.channel.request({ op: 'interrupt' });
    return answer.interrupted;
  }

  /** Marks activity (file operations count as use for the idle timeout). */
  touch(s: LiveSandbox): void {
    s.record.lastActiveAt = Date.now();
  }

  async destroy(id: string, owner?: string, reason = 'deleted'): Promise<void> {
    const s = this.live.get(id);
    if (!s) {
      // A frozen sandbox is only files.
      const record = await this.store.get(id);
      if (record?.state === 'frozen' && (owner === undefined || record.owner === owner) && !this.resuming.has(id)) {
        await rm(this.frozenDir(id), { recursive: true, force: true });
        await this.store.update(id, { state: 'stopped', endedAt: Date.now(), endReason: reason });
      }
      return;
    }
    if (owner !== undefined && s.record.owner !== owner) return;
    await this.end(s, 'stopped', reason);
  }

  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.sweeper);
    await this.pool.close();
    // Persistent sandboxes that can freeze outlive the server on disk; the others end.
    await Promise.all([...this.live.values()].map(async (s) => {
      if (s.record.persistent && s.runtime.capabilities.freeze && s.runtime.freeze) {
        try {
          return await this.freeze(s);
        } catch (err) {
          this.log.warn('could not freeze a persistent sandbox at shutdown', { sandbox: s.record.id, error: (err as Error).message });
        }
      }
      return this.end(s, 'stopped', 'server shut down');
    }));
    await Promise.all([...this.teardowns]);
    for (const r of this.runtimes.values()) await r.close();
  }

  /** A pool miss: start one now, retrying once, and say 503 (retryable) if the host cannot. */
  private async startOnDemand(key: PoolKey): Promise<RuntimeSandbox> {
    try {
      return await this.startRuntimeSandbox(key);
    } catch (first) {
      this.log.warn('sandbox start failed, retrying', { error: (first as Error).message });
      try {
        return await this.startRuntimeSandbox(key);
      } catch (err) {
        throw new ApiError('unavailable', `could not start a sandbox: ${(err as Error).message}`, undefined, { 'Retry-After': '1' });
      }
    }
  }

  private async startRuntimeSandbox(key: PoolKey, background = false): Promise<RuntimeSandbox> {
    const id = newSandboxId();
    const runtime = this.runtimes.get(key.runtime);
    if (!runtime) throw new Error(`no ${key.runtime} runtime`);
    return runtime.start({ id, template: key.template, egress: key.egress, hostname: `sbx-${id.slice(4, 16)}`, background });
  }

  private adopt(record: SandboxRecord, runtime: Runtime, rt: RuntimeSandbox): LiveSandbox {
    const s: LiveSandbox = { record, runtime, rt, queue: new SerialQueue(), running: 0 };
    this.live.set(record.id, s);
    this.watch(s, rt);
    return s;
  }

  /** A runtime sandbox dying on its own ends whichever API sandbox drives it at that moment. */
  private watch(s: LiveSandbox, rt: RuntimeSandbox): void {
    void rt.exited.then(({ reason }) => {
      if (s.rt !== rt || this.live.get(s.record.id) !== s) return;
      this.counters.crashed++;
      void this.end(s, 'error', reason);
    });
  }

  /**
   * fork(n): n copy-on-write children of an idle sandbox (waits for a running exec: forks go
   * through the same queue). Children inherit egress, timeouts and metadata.
   */
  async fork(s: LiveSandbox, n: number): Promise<SandboxRecord[]> {
    if (!s.runtime.capabilities.fork) throw new ApiError('bad_request', `the ${s.runtime.name} runtime cannot fork`);
    return s.queue.run(async () => {
      if (!this.live.has(s.record.id)) throw new ApiError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      if (this.live.size + n > this.config.maxSandboxes) {
        throw new ApiError('rate_limited', `forking ${n} would exceed the server's ${this.config.maxSandboxes} sandboxes`, undefined, { 'Retry-After': '5' });
      }
      const specs = Array.from({ length: n }, () => {
        const id = newSandboxId();
        return { id, template: s.record.template, egress: s.record.egress, hostname: `sbx-${id.slice(4, 16)}` };
      });
      const children = await s.runtime.fork(s.rt, specs);
      const now = Date.now();
      const records: SandboxRecord[] = [];
      for (const rt of children) {
        const record: SandboxRecord = {
          ...s.record, id: rt.id, state: 'ready', parentId: s.record.id, createdAt: now, lastActiveAt: now,
          endedAt: null, endReason: null, metadata: { ...s.record.metadata },
        };
        await this.store.insert(record);
        this.adopt(record, s.runtime, rt);
        records.push(record);
      }
      s.record.lastActiveAt = now;
      this.counters.forked += children.length;
      return records;
    });
  }

  /** True when `descendant` is below `ancestor` in the lineage. */
  private async isDescendant(descendant: string, ancestor: string): Promise<boolean> {
    let current = (this.live.get(descendant)?.record ?? (await this.store.get(descendant)))?.parentId ?? null;
    for (let hops = 0; current && hops < 1000; hops++) {
      if (current === ancestor) return true;
      current = (this.live.get(current)?.record ?? (await this.store.get(current)))?.parentId ?? null;
    }
    return false;
  }

  /** Checks a merge's parties: into itself 400, unknown/retired winner 404, not a descendant 400. */
  async mergeParties(parentId: string, winnerId: string, owner?: string): Promise<{ parent: LiveSandbox; winner: LiveSandbox }> {
    if (parentId === winnerId) throw new ApiError('bad_request', 'a sandbox cannot be merged into itself', 'winner');
    const parent = await this.get(parentId, owner);
    const winner = await this.get(winnerId, owner).catch((err: ApiError) => {
      throw err.code === 'sandbox_gone' ? new ApiError('not_found', err.message) : err;
    });
    if (!(await this.isDescendant(winnerId, parentId))) {
      throw new ApiError('bad_request', `sandbox ${winnerId} is not a descendant of ${parentId}`, 'winner');
    }
    return { parent, winner };
  }

  /**
   * Whole-state merge: from now on the parent's id drives the winner's sandbox (memory and files);
   * the parent's old sandbox is destroyed and the winner's id retired. Siblings live on.
   */
  async mergeWhole(parent: LiveSandbox, winner: LiveSandbox): Promise<void> {
    await parent.queue.run(() => winner.queue.run(async () => {
      if (this.live.get(winner.record.id) !== winner) throw new ApiError('not_found', `sandbox ${winner.record.id} not found`);
      const old = parent.rt;
      this.live.delete(winner.record.id);
      parent.rt = winner.rt;
      parent.runtime = winner.runtime;
      this.watch(parent, winner.rt);
      parent.record.lastActiveAt = Date.now();
      winner.record.state = 'merged';
      winner.record.endedAt = Date.now();
      winner.record.endReason = `merged into ${parent.record.id}`;
      await this.store.update(winner.record.id, { state: 'merged', endedAt: winner.record.endedAt, endReason: winner.record.endReason });
      // The winner's children are the parent's now.
      for (const child of await this.store.children(winner.record.id)) {
        await this.store.update(child, { parentId: parent.record.id });
        const live = this.live.get(child);
        if (live) live.record.parentId = parent.record.id;
      }
      this.counters.merged++;
      await old.destroy();
    }));
  }

  /** PSS of a live sandbox's own processes, in bytes (for capacity, benchmarks and tests). */
  async memoryOf(id: string): Promise<number> {
    const s = this.live.get(id);
    return s ? s.rt.memoryPss() : 0;
  }

  async vars(s: LiveSandbox) {
    return s.queue.run(async () => (await s.rt.channel.request({ op: 'vars' })).vars);
  }

  private frozenDir(id: string): string {
    return path.join(this.config.stateDir, 'frozen', id);
  }

  /**
   * Freezes a sandbox to the state directory (memory and disk): it stops using CPU and memory, its
   * record says `frozen`, and the next call on its id resumes it, even after a server restart.
   */
  async freeze(s: LiveSandbox): Promise<void> {
    const freeze = s.runtime.freeze?.bind(s.runtime);
    if (!freeze || !s.runtime.capabilities.freeze) {
      throw new ApiError('bad_request', `the ${s.runtime.name} runtime cannot freeze a sandbox (its processes' memory has no way to disk here)`);
    }
    await s.queue.run(async () => {
      if (this.live.get(s.record.id) !== s) throw new ApiError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      // Out of the live set first: the VM ending below is not a crash.
      this.live.delete(s.record.id);
      try {
        await freeze(s.rt, this.frozenDir(s.record.id));
      } catch (err) {
        this.live.set(s.record.id, s);
        // A VM that died during the freeze went unnoticed while out of the live set: end it now.
        const died = await Promise.race([s.rt.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 50))]);
        if (died) void this.end(s, 'error', `the sandbox died while freezing: ${(err as Error).message}`);
        throw err;
      }
      s.record.state = 'frozen';
      await this.store.update(s.record.id, { state: 'frozen', lastActiveAt: s.record.lastActiveAt });
      this.counters.frozen++;
      this.log.debug('sandbox frozen', { sandbox: s.record.id });
    });
  }

  private readonly resuming = new Map<string, Promise<LiveSandbox>>();

  /** Resumes a frozen sandbox (one resume per id at a time; callers share it). */
  async resume(record: SandboxRecord): Promise<LiveSandbox> {
    const live = this.live.get(record.id);
    if (live) return live;
    if (record.state !== 'frozen') throw new ApiError('conflict', `sandbox ${record.id} is not frozen (${record.state})`);
    let p = this.resuming.get(record.id);
    if (!p) {
      p = (async () => {
        if (this.closing) throw new ApiError('unavailable', 'the server is shutting down');
        const runtime = this.runtimes.get(record.runtime);
        if (!runtime?.resume) throw new ApiError('unavailable', `the ${record.runtime} runtime is not available on this server to resume sandbox ${record.id}`);
        const dir = this.frozenDir(record.id);
        const rt = await runtime.resume({ id: record.id, template: record.template, egress: record.egress, hostname: `sbx-${record.id.slice(4, 16)}` }, dir);
        await rm(dir, { recursive: true, force: true });
        const now = Date.now();
        record.state = 'ready';
        record.lastActiveAt = now;
        await this.store.update(record.id, { state: 'ready', lastActiveAt: now });
        this.counters.resumed++;
        return this.adopt(record, runtime, rt);
      })();
      this.resuming.set(record.id, p);
      void p.finally(() => this.resuming.delete(record.id)).catch(() => undefined);
    }
    return p;
  }

  diffFiles(a: LiveSandbox, b: LiveSandbox, opts: { paths?: string[]; content?: boolean }) {
    if (a.runtime !== b.runtime) throw new ApiError('bad_request', `cannot diff a ${a.runtime.name} sandbox against a ${b.runtime.name} sandbox`);
    return a.runtime.diff(a.rt, b.rt, opts);
  }

  private async end(s: LiveSandbox, state: 'stopped' | 'error', reason: string): Promise<void> {
    if (this.live.get(s.record.id) !== s) return;
    this.live.delete(s.record.id);
    this.counters.destroyed++;
    s.record.state = state;
    s.record.endedAt = Date.now();
    s.record.endReason = reason;
    this.log.debug('sandbox ended', { sandbox: s.record.id, state, reason });
    await this.store.update(s.record.id, { state, endedAt: s.record.endedAt, endReason: reason, lastActiveAt: s.record.lastActiveAt });
    // The sandbox is already unreachable through the API: kill and clean up behind the answer.
    const teardown = s.rt.destroy().catch((err: Error) => this.log.error('teardown failed', { sandbox: s.record.id, error: err.message }));
    this.teardowns.add(teardown);
    void teardown.finally(() => this.teardowns.delete(teardown));
  }

  private setState(s: LiveSandbox, state: SandboxRecord['state']): void {
    s.record.state = state;
  }

  /** Idle timeouts (not while an exec runs or waits) and maximum lifetimes. */
  private async sweep(): Promise<void> {
    const now = Date.now();
    for (const s of [...this.live.values()]) {
      const r = s.record;
      if (now - r.createdAt > r.maxLifetimeSeconds * 1000) {
        this.counters.expired++;
        void this.end(s, 'stopped', `max lifetime of ${r.maxLifetimeSeconds}s reached`);
      } else if (!s.running && s.queue.length === 0 && now - r.lastActiveAt > r.idleTimeoutSeconds * 1000) {
        if (r.persistent && s.runtime.capabilities.freeze) {
          // Idle persistent sandboxes go to disk instead of away.
          r.lastActiveAt = now; // not picked again while the freeze runs
          void this.freeze(s).catch((err: Error) => this.log.warn('idle freeze failed', { sandbox: r.id, error: err.message }));
          continue;
        }
        this.counters.expired++;
        void this.end(s, 'stopped', `idle for more than ${r.idleTimeoutSeconds}s`);
      }
    }
  }

  private toInfo(r: SandboxRecord, children: string[]): SandboxInfo {
    return {
      id: r.id, state: r.state, template: r.template, runtime: r.runtime, egress: r.egress, persistent: r.persistent,
      parent: r.parentId, children, created_at: new Date(r.createdAt).toISOString(),
      last_active_at: new Date(r.lastActiveAt).toISOString(), idle_timeout_seconds: r.idleTimeoutSeconds, metadata: r.metadata,
    };
  }
}

export type { LiveSandbox };
