/**
 * Owns the live sandboxes: creation (from the warm pool or on demand), the one-exec-at-a-time
 * queue, idle timeouts and lifetimes, crash detection, and the records in the store. The HTTP layer
 * calls this; it never touches a runtime directly.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import {
  isEgressPolicy, KILLED_EXIT_CODE, TIMEOUT_EXIT_CODE, type AgentRequestBody, type CreateSandboxBody, type EgressSetting, type ExecStreamMessage, type SandboxEvent, type SandboxInfo,
} from '@podflare/protocol';
import type { ServerConfig } from './config.js';
import { ApiError } from './errors.js';
import { ExecHistory } from './exec-history.js';
import type { Logger } from './log.js';
import { ServerMetrics } from './metrics.js';
import { WarmPool, type PoolKey, type PoolMissReason } from './pool.js';
import { limitError, limitsInfo, resolveLimits, sameLimits } from './limits.js';
import type { LimitCounters, Runtime, RuntimeSandbox } from './runtime/runtime.js';
import { SandboxEventLog } from './sandbox-events.js';
import { SerialQueue } from './serial-queue.js';
import type { ExecEventSink } from './agent-channel.js';
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
  /**
   * Diffs involving this sandbox, one at a time: a diff reads the agents' listings, and what one
   * tenant can make the server hold must not multiply with concurrent requests.
   */
  diffs: SerialQueue;
}

export interface CreateOptions extends CreateSandboxBody {
  owner: string;
}

/** Why a create started its sandbox cold: a pool miss, or an egress allowlist (no pool serves those). */
export type CreateMissReason = PoolMissReason | 'egress_policy';

export interface Created {
  record: SandboxRecord;
  /** Null when the warm pool served it. */
  poolMiss: CreateMissReason | null;
}

export type RuntimeKind = Runtime['name'];

/**
 * VM clones cost far more than namespace sandboxes (a QEMU each, ~100 MB): keep at most this many
 * warm per key.
 */
const VM_POOL_MAX = 2;
/** After its agent's channel closed, how long a sandbox's own exit may take to say why. */
const CHANNEL_EXIT_GRACE_MS = 1000;

export class SandboxManager {
  private readonly live = new Map<string, LiveSandbox>();
  /** Limit counters last seen per runtime sandbox: an exec that moved them ran into a limit. */
  private readonly limitBaseline = new WeakMap<RuntimeSandbox, LimitCounters>();
  /** Teardowns still running after their DELETE answered; close() waits for them. */
  private readonly teardowns = new Set<Promise<void>>();
  /** Sandboxes being created or forked, counted against the caps before they are live. */
  private readonly reserved = { total: 0, byOwner: new Map<string, number>() };
  private readonly pool: WarmPool;
  /** Creates with an egress allowlist (started cold: no pool serves them). */
  private policyCreates = 0;
  private readonly sweeper: NodeJS.Timeout;
  private closing = false;
  readonly defaultRuntime: Runtime;
  readonly counters = { created: 0, destroyed: 0, crashed: 0, expired: 0, forked: 0, merged: 0, limitKills: 0, frozen: 0, resumed: 0 };
  /** Latencies, pool and state gauges, limit kills: GET /v1/metrics and the dashboard. */
  readonly metrics = new ServerMetrics();
  /** What ran in each sandbox (bounded, in memory): the dashboard's exec history. */
  readonly history = new ExecHistory();
  /** 'change' (sandbox id) whenever a sandbox is created, changes state, forks, merges or ends. */
  readonly changes = new EventEmitter<{ change: [string] }>();

  private readonly runtimes = new Map<RuntimeKind, Runtime>();

  constructor(
    /** Every runtime this server offers; the first is the default (`runtime` omitted or `auto`). */
    runtimes: Runtime[],
    private readonly store: SandboxStore,
    private readonly config: ServerConfig,
    private readonly log: Logger,
    /** Where the runtime records sandbox events (egress decisions); read by GET …/events. */
    private readonly eventLog = new SandboxEventLog(),
  ) {
    for (const r of runtimes) this.runtimes.set(r.name, r);
    this.defaultRuntime = runtimes[0]!;
    this.pool = new WarmPool((key) => this.startRuntimeSandbox(key.runtime, key.template, key.egress, true), {
      target: config.poolSize,
      maxParallelStarts: 2,
      log,
    });
    this.sweeper = setInterval(() => void this.sweep(), 1000);
    this.sweeper.unref();
    this.registerGauges();
  }

  private registerGauges(): void {
    const m = this.metrics;
    const pools = () => this.pool.stats();
    const poolLabels = (p: { template: string; egress: boolean }) => ({ template: p.template, egress: String(p.egress) });
    m.gauge('podflare_pool_ready', 'Warm sandboxes ready to hand out, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.ready })));
    m.gauge('podflare_pool_target', 'Warm sandboxes the pool aims to keep, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.target })));
    m.gauge('podflare_pool_starting', 'Warm sandboxes starting, per template.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.starting })));
    m.gauge('podflare_pool_hits_total', 'Creates served from the warm pool.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.hits })), 'counter');
    m.gauge('podflare_pool_misses_total', 'Creates that had to start a sandbox on demand.', () => pools().map((p) => ({ labels: poolLabels(p), value: p.misses })), 'counter');
    m.gauge('podflare_create_cold_total', 'Creates that started their sandbox cold, by why: pool_off, cold_key, refilling (the pool did not keep up), starts_failing, empty, egress_policy.',
      () => [
        ...this.pool.missReasons().map((r) => ({ labels: { ...poolLabels(r.key), reason: r.reason }, value: r.count })),
        { labels: { template: '*', egress: 'policy', reason: 'egress_policy' }, value: this.policyCreates },
      ], 'counter');
    m.gauge('podflare_sandboxes', 'Live sandboxes by state.', () => {
      const byState: Record<string, number> = { ready: 0, running: 0 };
      for (const s of this.live.values()) byState[s.record.state] = (byState[s.record.state] ?? 0) + 1;
      return Object.entries(byState).map(([state, value]) => ({ labels: { state }, value }));
    });
    m.gauge('podflare_sandbox_events_total', 'Sandbox lifecycle events since start (created, destroyed, crashed, expired, forked, merged).',
      // Limit kills have their own series, by limit.
      () => Object.entries(this.counters).filter(([event]) => event !== 'limitKills').map(([event, value]) => ({ labels: { event }, value })), 'counter');
  }

  /**
   * Start-up: reconcile with what an earlier server on this state directory left (it may have been
   * killed): sandboxes the runtime can take over live on under their records; every other record
   * still marked live becomes `lost`, its leftovers removed by the runtime. Then warm the pool.
   */
  async start(): Promise<void> {
    // Frozen sandboxes live on disk, not in the dead server's processes: they outlive it.
    const previous = (await this.store.list({})).filter((r) => r.state !== 'frozen');
    const adopted: RuntimeSandbox[] = [];
    for (const runtime of this.runtimes.values()) {
      const mine = previous.filter((r) => r.runtime === runtime.name);
      adopted.push(...(await runtime.reconcile(mine.map((r) => r.id))).adopted);
    }
    const byId = new Map(adopted.map((rt) => [rt.id, rt]));
    const now = Date.now();
    let lost = 0;
    for (const record of previous) {
      const rt = byId.get(record.id);
      const runtime = this.runtimes.get(record.runtime);
      if (rt && runtime) {
        this.adopt({ ...record, state: 'ready', lastActiveAt: now }, runtime, rt);
        byId.delete(record.id);
        continue;
      }
      lost++;
      await this.store.update(record.id, {
        state: 'lost', endedAt: now,
        endReason: 'the server was restarted while it ran and its agent no longer answered: its processes, mounts and files were removed',
      });
    }
    // Taken over but without a record (cannot happen with a consistent store): not ours to keep.
    for (const rt of byId.values()) await rt.destroy();
    if (lost || adopted.length) this.log.info('reconciled with the previous server', { adopted: adopted.length - byId.size, lost });
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

  async create(opts: CreateOptions): Promise<Created> {
    if (this.closing) throw new ApiError('unavailable', 'the server is shutting down');
    const template = opts.template ?? DEFAULT_TEMPLATE;
    if (template !== DEFAULT_TEMPLATE) throw new ApiError('bad_request', `unknown template "${template}" (available: ${DEFAULT_TEMPLATE})`, 'template');
    const runtime = this.pickRuntime(opts.runtime);
    const release = this.reserve(opts.owner, 1);
    try {
      return await this.createReserved(opts, runtime, template, release);
    } finally {
      release();
    }
  }

  /** `release` is called as soon as the sandbox counts as live (exactly once, with create's finally). */
  private async createReserved(opts: CreateOptions, runtime: Runtime, template: string, release: () => void): Promise<Created> {
    const limits = resolveLimits(opts.limits, this.config.defaultLimits, this.config.maxLimits);
    const egress: EgressSetting = isEgressPolicy(opts.egress) ? { allow: [...opts.egress.allow] } : (opts.egress ?? true);
    const timed = this.metrics.createSeconds.time();
    let rt: RuntimeSandbox;
    /** Why this create started a sandbox cold (undefined: served from the pool). */
    let poolMiss: CreateMissReason | undefined;
    if (isEgressPolicy(egress)) {
      poolMiss = 'egress_policy';
      // A policy is per sandbox: no pool serves it.
      if (!runtime.capabilities.egressPolicy) throw new ApiError('bad_request', `the ${runtime.name} runtime cannot enforce egress allowlists`, 'egress');
      rt = await this.startOnDemand(runtime.name, template, egress);
    } else {
      const key: PoolKey = { runtime: runtime.name, template, egress };
      const taken = this.pool.take(key, Math.min(this.poolTarget(runtime.name), Math.max(1, Math.floor(this.config.poolSize / 4))));
      if (taken.sandbox) rt = taken.sandbox;
      else {
        poolMiss = taken.miss;
        const t0 = performance.now();
        rt = await this.startOnDemand(runtime.name, template, egress);
        // A miss the configuration asks for is no news; one the pool could not keep up with is.
        const level = poolMiss === 'pool_off' ? 'debug' : 'info';
        this.log[level]('create missed the warm pool', { reason: poolMiss, template, egress, runtime: runtime.name, ms: Math.round(performance.now() - t0) });
      }
    }
    // Pooled sandboxes start with the default limits; a creator asking for others gets them now.
    if (!sameLimits(limits, this.config.defaultLimits) && rt.setLimits) {
      try {
        await rt.setLimits(limits);
      } catch (err) {
        void rt.destroy();
        throw new ApiError('unavailable', `could not apply the sandbox's limits: ${(err as Error).message}`, undefined, { 'Retry-After': '1' });
      }
    }
    const now = Date.now();
    const record: SandboxRecord = {
      id: rt.id, state: 'ready', template, runtime: runtime.name, egress,
      persistent: opts.persistent ?? false, parentId: null, createdAt: now, lastActiveAt: now,
      endedAt: null, endReason: null,
      idleTimeoutSeconds: opts.idle_timeout_seconds ?? this.config.idleTimeoutSeconds,
      maxLifetimeSeconds: Math.min(opts.max_lifetime_seconds ?? this.config.maxLifetimeSeconds, this.config.maxLifetimeSeconds),
      metadata: opts.metadata ?? {}, owner: opts.owner, limits,
    };
    await this.store.insert(record);
    this.adopt(record, runtime, rt);
    release();
    this.counters.created++;
    if (poolMiss === 'egress_policy') this.policyCreates++;
    timed();
    this.changes.emit('change', record.id);
    return { record, poolMiss: poolMiss ?? null };
  }

  /**
   * Reserves room for `more` new sandboxes of `owner` until the returned release is called (once
   * they are live, or failed): concurrent creates and forks cannot together overshoot a cap.
   * 429 when the server's cap or the owner's would be exceeded. Retry-After is a guess (sandboxes
   * end when their callers delete them or idle out): a few seconds.
   */
  private reserve(owner: string, more: number): () => void {
    const { maxSandboxes, maxSandboxesPerKey } = this.config;
    const total = this.live.size + this.reserved.total;
    if (total + more > maxSandboxes) {
      throw new ApiError('rate_limited', `the server runs ${total} sandboxes and allows ${maxSandboxes}: ` +
        `${more} more would exceed that; delete some or retry later`, undefined, { 'Retry-After': '5' });
    }
    let owned = this.reserved.byOwner.get(owner) ?? 0;
    for (const s of this.live.values()) if (s.record.owner === owner) owned++;
    if (owned + more > maxSandboxesPerKey) {
      // Without API keys every caller is the same (anonymous) owner.
      const who = owner ? 'this API key has' : 'callers of this server (it has no API keys, so they share one allowance) have';
      throw new ApiError('rate_limited', `${who} ${owned} live sandboxes and may have ${maxSandboxesPerKey}: ` +
        `${more} more would exceed that; delete some or retry later`, undefined, { 'Retry-After': '5' });
    }
    this.reserved.total += more;
    this.reserved.byOwner.set(owner, (this.reserved.byOwner.get(owner) ?? 0) + more);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.reserved.total -= more;
      const left = this.reserved.byOwner.get(owner)! - more;
      if (left) this.reserved.byOwner.set(owner, left);
      else this.reserved.byOwner.delete(owner);
    };
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

  /**
   * Runs code; `onEvent` sees the agent's stream (a promise it returns holds the agent's channel
   * until it settles: backpressure). Queued behind other execs of the same sandbox.
   */
  async exec(s: LiveSandbox, body: AgentRequestBody<'exec'>, onEvent: ExecEventSink) {
    return s.queue.run(async () => {
      if (!this.live.has(s.record.id)) throw new ApiError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      s.running++;
      this.setState(s, 'running');
      const timed = this.metrics.execSeconds.time();
      const recorded = this.history.begin(s.record.id, s.record.owner, body.language, body.code);
      let exit: { code: number; execution_count?: number | null; state_lost?: boolean } = { code: KILLED_EXIT_CODE, state_lost: true };
      try {
        const rt = s.rt;
        // Everything the caller sees is also recorded for the dashboard's history.
        const emit = (msg: ExecStreamMessage) => {
          recorded.message(msg);
          return onEvent(msg);
        };
        if (!rt.limitCounters) return (exit = await rt.channel.exec(body, emit));
        // The error and exit are held back until the exit: if a limit caused the error (or the
        // exit), it is reported as such.
        let held: Extract<ExecStreamMessage, { ev: 'error' }> | undefined;
        const result = await rt.channel.exec(body, (m) => {
          if (m.ev === 'error') held = m;
          else if (m.ev !== 'exit') return emit(m);
        });
        // Read after every exec (two small cgroup files): a bash child killed for memory
        // leaves a zero exit code, and the kill must not be blamed on the next exec.
        const hit = await this.limitHit(s, rt, result.id, held);
        if (hit) held = hit;
        if (held) void emit(held);
        void emit(result);
        exit = result;
        return result;
      } finally {
        timed();
        recorded.end(exit);
        this.metrics.execs.inc({ language: body.language, outcome: exit.code === 0 ? 'ok' : exit.code === TIMEOUT_EXIT_CODE ? 'timeout' : 'error' });
        s.running--;
        s.record.lastActiveAt = Date.now();
        if (this.live.has(s.record.id)) this.setState(s, 'ready');
      }
    });
  }

  /** The limit error for what happened since the last look, if the sandbox ran into a limit. */
  private async limitHit(s: LiveSandbox, rt: RuntimeSandbox, id: number, original?: Extract<ExecStreamMessage, { ev: 'error' }>) {
    if (!rt.limitCounters) return null;
    const before = this.limitBaseline.get(rt) ?? { oomKills: 0, pidsRefused: 0 };
    const after = await rt.limitCounters();
    this.limitBaseline.set(rt, after);
    const hit = limitError(id, before, after, s.record.limits ?? this.config.defaultLimits, original);
    if (hit) {
      this.counters.limitKills++;
      this.metrics.countLimitKill(hit.data.name);
    }
    return hit;
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
    // onStop 'keep': sandboxes of runtimes that can outlive the server stay alive (and their
    // records live) for the next server to adopt; warm-pool sandboxes went above all the same.
    const keep = this.config.onStop === 'keep';
    // Persistent sandboxes that can freeze outlive the server on disk; the others end.
    await Promise.all([...this.live.values()].map(async (s) => {
      if (keep && s.runtime.capabilities.outlivesServer) return;
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
    for (const r of this.runtimes.values()) await r.close({ keepSandboxes: keep });
  }

  /** A pool miss: start one now, retrying once, and say 503 (retryable) if the host cannot. */
  private async startOnDemand(runtime: RuntimeKind, template: string, egress: EgressSetting): Promise<RuntimeSandbox> {
    try {
      return await this.startRuntimeSandbox(runtime, template, egress);
    } catch (first) {
      this.log.warn('sandbox start failed, retrying', { error: (first as Error).message });
      try {
        return await this.startRuntimeSandbox(runtime, template, egress);
      } catch (err) {
        throw new ApiError('unavailable', `could not start a sandbox: ${(err as Error).message}`, undefined, { 'Retry-After': '1' });
      }
    }
  }

  private async startRuntimeSandbox(runtimeName: RuntimeKind, template: string, egress: EgressSetting, background = false): Promise<RuntimeSandbox> {
    const id = newSandboxId();
    const runtime = this.runtimes.get(runtimeName);
    if (!runtime) throw new Error(`no ${runtimeName} runtime`);
    return runtime.start({ id, template, egress, hostname: `sbx-${id.slice(4, 16)}`, background, limits: this.config.defaultLimits });
  }

  private adopt(record: SandboxRecord, runtime: Runtime, rt: RuntimeSandbox): LiveSandbox {
    const s: LiveSandbox = { record, runtime, rt, queue: new SerialQueue(), running: 0, diffs: new SerialQueue() };
    rt.channel.on('violation', (what) => this.log.warn('sandbox agent protocol violation', { sandbox: record.id, violation: what }));
    this.live.set(record.id, s);
    // Execs and forks queue behind a runtime sandbox that is not fully set up yet.
    if (rt.ready) void s.queue.run(() => rt.ready!);
    this.watch(s, rt);
    return s;
  }

  /**
   * A runtime sandbox dying on its own ends whichever API sandbox drives it at that moment; so does
   * its agent's channel breaking (the sandbox cannot be driven any more: it is not `ready`).
   */
  private watch(s: LiveSandbox, rt: RuntimeSandbox): void {
    const crashed = (reason: string) => {
      if (s.rt !== rt || this.live.get(s.record.id) !== s) return;
      // Stopping: close() ends every sandbox itself, or (onStop 'keep') lets go of their channels
      // on purpose, leaving the sandboxes and their records for the next server.
      if (this.closing) return;
      this.counters.crashed++;
      void this.end(s, 'error', reason);
    };
    void rt.exited.then(({ reason }) => crashed(reason));
    // A dying sandbox closes its channel first: its own exit reason, when it comes soon, says more.
    const onClose = (reason: string) => void Promise.race([rt.exited, new Promise((r) => setTimeout(r, CHANNEL_EXIT_GRACE_MS))])
      .then(() => crashed(`the sandbox's agent channel broke: ${reason}`));
    if (rt.channel.closed) onClose(rt.channel.closeReason ?? 'closed');
    else rt.channel.once('close', onClose);
  }

  /**
   * fork(n): n copy-on-write children of an idle sandbox (waits for a running exec: forks go
   * through the same queue). Children inherit egress, timeouts and metadata.
   */
  async fork(s: LiveSandbox, n: number): Promise<SandboxRecord[]> {
    if (!s.runtime.capabilities.fork) throw new ApiError('bad_request', `the ${s.runtime.name} runtime cannot fork`);
    return s.queue.run(async () => {
      if (!this.live.has(s.record.id)) throw new ApiError('sandbox_gone', `sandbox ${s.record.id} is gone`);
      const release = this.reserve(s.record.owner, n);
      try {
        return await this.forkReserved(s, n, release);
      } finally {
        release();
      }
    });
  }

  private async forkReserved(s: LiveSandbox, n: number, release: () => void): Promise<SandboxRecord[]> {
    const specs = Array.from({ length: n }, () => {
      const id = newSandboxId();
      return { id, template: s.record.template, egress: s.record.egress, hostname: `sbx-${id.slice(4, 16)}`, limits: s.record.limits ?? this.config.defaultLimits };
    });
    let children: RuntimeSandbox[];
    const timed = this.metrics.forkSeconds.time();
    try {
      children = await s.runtime.fork(s.rt, specs);
    } catch (err) {
      // The children are processes of the parent's until they have groups of their own.
      const hit = await this.limitHit(s, s.rt, 0);
      if (hit) throw new ApiError('conflict', `cannot fork: ${hit.data.value}`);
      throw err;
    }
    timed();
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
    release();
    s.record.lastActiveAt = now;
    this.counters.forked += children.length;
    this.changes.emit('change', s.record.id);
    return records;
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
      this.changes.emit('change', parent.record.id);
      await old.destroy();
      this.eventLog.drop(old.id);
    }));
  }

  /** PSS of a live sandbox's own processes, in bytes (for capacity, benchmarks and tests). */
  async memoryOf(id: string): Promise<number> {
    const s = this.live.get(id);
    return s ? s.rt.memoryPss() : 0;
  }

  /** The sandbox's events (egress decisions) after sequence number `after`. */
  events(s: LiveSandbox, after?: number): SandboxEvent[] {
    return this.eventLog.list(s.rt.id, after);
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
        const rt = await runtime.resume({
          id: record.id, template: record.template, egress: record.egress, hostname: `sbx-${record.id.slice(4, 16)}`, limits: record.limits ?? this.config.defaultLimits,
        }, dir);
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
    const diff = () => a.runtime.diff(a.rt, b.rt, opts);
    if (a === b) return a.diffs.run(diff);
    // Both queues, always taken in the same order (by id): two opposite diffs cannot deadlock.
    const [first, second] = a.record.id < b.record.id ? [a, b] : [b, a];
    return first.diffs.run(() => second.diffs.run(diff));
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
    this.changes.emit('change', s.record.id);
    // The sandbox is already unreachable through the API: kill and clean up behind the answer.
    const rt = s.rt;
    const teardown = rt.destroy().catch((err: Error) => this.log.error('teardown failed', { sandbox: s.record.id, error: err.message }));
    this.teardowns.add(teardown);
    void teardown.finally(() => {
      this.teardowns.delete(teardown);
      this.eventLog.drop(rt.id);
    });
  }

  private setState(s: LiveSandbox, state: SandboxRecord['state']): void {
    s.record.state = state;
    this.changes.emit('change', s.record.id);
  }

  /** Records as the store has them, with live state overlaid (the dashboard shows ended ones too). */
  async records(filter: { all?: boolean }, owner?: string): Promise<SandboxRecord[]> {
    const records = await this.store.list({ includeEnded: filter.all, owner });
    return records.map((r) => this.live.get(r.id)?.record ?? r);
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
      last_active_at: new Date(r.lastActiveAt).toISOString(), idle_timeout_seconds: r.idleTimeoutSeconds,
      limits: limitsInfo(r.limits ?? this.config.defaultLimits), metadata: r.metadata, end_reason: r.endReason,
    };
  }
}

export type { LiveSandbox };
