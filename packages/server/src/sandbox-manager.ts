/**
 * Owns the live sandboxes: the one way from the HTTP layer (and server.ts) to a runtime. A thin
 * facade over the parts in manager/, each with one job: lifecycle (create, adopt, crash, end),
 * lookup (find, info, lists), pool use, files, the exec queue, fork/merge/diff, freeze/resume, the sweep
 * of idle and expired sandboxes, and the metrics gauges.
 */
import { SandboxArchives } from './manager/archives.js';
import { SandboxPorts } from './manager/ports.js';
import { SandboxProcesses } from './manager/processes.js';
import { EventEmitter } from 'node:events';
import type { AgentRequestBody, SandboxEvent } from '@podflare/protocol';
import type { ExecEventSink } from './agent-channel.js';
import type { ServerConfig } from './config.js';
import { ExecHistory } from './exec-history.js';
import type { Logger } from './log.js';
import { Capacity } from './manager/capacity.js';
import { Checkpoints } from './manager/checkpoints.js';
import { newCounters, type ManagerContext } from './manager/context.js';
import { ExecQueue } from './manager/exec-queue.js';
import { ForkMerge } from './manager/fork-merge.js';
import { SandboxFiles } from './manager/files.js';
import { Freezer } from './manager/freezer.js';
import { registerManagerGauges } from './manager/gauges.js';
import { Lifecycle, type CreateOptions, type Created } from './manager/lifecycle.js';
import { LimitWatch } from './manager/limit-watch.js';
import { LiveTemplates, registryView } from './manager/live-templates.js';
import { newSandboxId, type LiveSandbox, type RuntimeKind } from './manager/live-sandbox.js';
import { SandboxLookup } from './manager/lookup.js';
import { PoolUse } from './manager/pool-use.js';
import { Sweeper } from './manager/sweep.js';
import type { TemplateLookup } from './manager/template-policy.js';
import { ServerMetrics } from './metrics.js';
import type { Runtime } from './runtime/runtime.js';
import { SandboxEventLog } from './sandbox-events.js';
import type { SandboxRecord, SandboxStore } from './store/store.js';

export { DEFAULT_TEMPLATE, newSandboxId, type LiveSandbox, type RuntimeKind } from './manager/live-sandbox.js';
export type { CreateOptions, Created } from './manager/lifecycle.js';
export type { CreateMissReason } from './manager/pool-use.js';

export class SandboxManager {
  readonly defaultRuntime: Runtime;
  readonly counters = newCounters();
  /** Latencies, pool and state gauges, limit kills: GET /v1/metrics and the dashboard. */
  readonly metrics = new ServerMetrics();
  /** What ran in each sandbox (bounded, in memory): the dashboard's exec history. */
  readonly history = new ExecHistory();
  /** 'change' (sandbox id) whenever a sandbox is created, changes state, forks, merges or ends. */
  readonly changes = new EventEmitter<{ change: [string] }>();
  /** A live sandbox's files (upload, read, stat, list, remove, mkdir). */
  readonly files = new SandboxFiles();
  /** A live sandbox's background processes and terminals (start, list, output, stdin, signal, resize). */
  readonly processes = new SandboxProcesses();
  /** Exposed ports: signed URLs and connections into a sandbox's ports. */
  readonly ports = new SandboxPorts(this.processes);
  /** Directories as tar streams (tar runs in the sandbox). */
  readonly archives = new SandboxArchives(this.files, this.processes);
  /** Checkpoints, restore, atomic execs and rewind (manager/checkpoints.ts). */
  readonly checkpoints: Checkpoints;
  /** Templates made from live sandboxes, and template deletion (manager/live-templates.ts). */
  readonly liveTemplates: LiveTemplates;

  private readonly ctx: ManagerContext;
  private readonly pool: PoolUse;
  private readonly lifecycle: Lifecycle;
  private readonly lookup: SandboxLookup;
  private readonly execs: ExecQueue;
  private readonly forks: ForkMerge;
  private readonly freezer: Freezer;
  private readonly sweeper: Sweeper;

  constructor(
    /** Every runtime this server offers; the first is the default (`runtime` omitted or `auto`). */
    runtimes: Runtime[],
    store: SandboxStore,
    config: ServerConfig,
    log: Logger,
    /** Where the runtime records sandbox events (egress decisions); read by GET …/events. */
    eventLog = new SandboxEventLog(),
    /** Every registered runtime name, offered here or not (an unknown one is a bad request). */
    knownRuntimes: readonly string[] = runtimes.map((r) => r.name),
    /** The templates besides `default` (image/templates.ts); without it, only `default` exists. */
    templates?: TemplateLookup,
  ) {
    this.defaultRuntime = runtimes[0]!;
    this.ctx = {
      config, store, log, eventLog,
      runtimes: new Map<RuntimeKind, Runtime>(runtimes.map((r) => [r.name, r])),
      defaultRuntime: this.defaultRuntime,
      knownRuntimes,
      live: new Map(),
      counters: this.counters, metrics: this.metrics, history: this.history, changes: this.changes,
      status: { closing: false },
      templates,
    };
    const capacity = new Capacity(this.ctx);
    const limits = new LimitWatch(this.ctx);
    this.pool = new PoolUse(this.ctx);
    this.checkpoints = new Checkpoints({
      log, newRuntimeId: newSandboxId,
      limitsOf: (s) => s.record.limits ?? config.defaultLimits,
      isLive: (s) => this.ctx.live.get(s.record.id) === s,
      replaceState: async (s, rt) => this.lifecycle.replaceState(s, rt),
    });
    this.lifecycle = new Lifecycle(this.ctx, capacity, this.pool, (s) => this.checkpoints.dropAll(s.record.id));
    this.lookup = new SandboxLookup(this.ctx);
    this.execs = new ExecQueue(this.ctx, limits, this.checkpoints);
    this.freezer = new Freezer(this.ctx, this.lifecycle);
    this.forks = new ForkMerge(this.ctx, capacity, this.lifecycle, limits, (id, owner) => this.get(id, owner));
    this.liveTemplates = new LiveTemplates(this.ctx, registryView(templates), (t) => this.pool.dropTemplate(t), this.pool);
    this.sweeper = new Sweeper(this.ctx, this.lifecycle, this.freezer, this.pool);
    registerManagerGauges(this.ctx, this.pool);
  }

  /**
   * Start-up: reconcile with what an earlier server on this state directory left. The pool is
   * warmed by warmPool(), once the server listens: the adopted sandboxes answer first.
   */
  async start(): Promise<void> {
    await this.lifecycle.reconcile();
  }

  /** Starts filling the warm pool and the zygotes (in the background). */
  warmPool(): void {
    if (!this.ctx.status.closing) this.pool.warmDefault();
  }

  get poolStats() {
    return this.pool.stats();
  }

  waitPoolFull(timeoutMs?: number): Promise<void> {
    return this.pool.waitFull(timeoutMs);
  }

  get liveCount(): number {
    return this.ctx.live.size;
  }

  async create(opts: CreateOptions): Promise<Created> {
    const created = await this.lifecycle.create(opts);
    const s = this.ctx.live.get(created.record.id);
    if (opts.history && s) {
      try {
        this.checkpoints.setHistory(s, opts.history);
      } catch (err) {
        await this.lifecycle.end(s, 'stopped', 'its runtime cannot keep the history asked for');
        throw err;
      }
    }
    return created;
  }

  /** The live sandbox, or the error a user should see: 404 never existed, 410 ended. */
  async get(id: string, owner?: string): Promise<LiveSandbox> {
    const found = await this.lookup.find(id, owner);
    // A frozen sandbox comes back transparently on the next call that needs it.
    return 'rt' in found ? found : this.freezer.resume(found);
  }

  info(id: string, owner?: string) {
    return this.lookup.info(id, owner);
  }

  list(filter: { ancestor?: string; state?: SandboxRecord['state']; all?: boolean }, owner?: string) {
    return this.lookup.list(filter, owner);
  }

  /** Records as the store has them, with live state overlaid (the dashboard shows ended ones too). */
  records(filter: { all?: boolean }, owner?: string): Promise<SandboxRecord[]> {
    return this.lookup.records(filter, owner);
  }

  /**
   * Runs code; `onEvent` sees its output (a promise it returns holds the agent's channel until it
   * settles: backpressure); resolves with the exit. Queued behind other execs of the same sandbox.
   */
  exec(s: LiveSandbox, body: AgentRequestBody<'exec'>, onEvent: ExecEventSink, opts: { atomic?: boolean } = {}) {
    return this.execs.exec(s, body, onEvent, opts);
  }

  interrupt(s: LiveSandbox): Promise<boolean> {
    return this.execs.interrupt(s);
  }

  vars(s: LiveSandbox) {
    return this.execs.vars(s);
  }

  async destroy(id: string, owner?: string, reason = 'deleted'): Promise<void> {
    const s = this.ctx.live.get(id);
    // A frozen sandbox is only files.
    if (!s) return this.freezer.destroyFrozen(id, owner, reason);
    if (owner !== undefined && s.record.owner !== owner) return;
    await this.lifecycle.end(s, 'stopped', reason);
  }

  fork(s: LiveSandbox, n: number): Promise<SandboxRecord[]> {
    return this.forks.fork(s, n);
  }

  mergeParties(parentId: string, winnerId: string, owner?: string) {
    return this.forks.mergeParties(parentId, winnerId, owner);
  }

  /** Copies `paths` from `winner` into `parent` (docs/api.md merge_into with paths). */
  mergePaths(parent: LiveSandbox, winner: LiveSandbox, paths: string[]): Promise<void> {
    return this.forks.mergePaths(parent, winner, paths);
  }

  async mergeWhole(parent: LiveSandbox, winner: LiveSandbox): Promise<void> {
    await this.forks.mergeWhole(parent, winner);
    // The winner's id is retired: its checkpoints go with it (the parent keeps its own).
    void this.checkpoints.dropAll(winner.record.id);
  }

  diffFiles(a: LiveSandbox, b: LiveSandbox, opts: { paths?: string[]; content?: boolean }) {
    return this.forks.diffFiles(a, b, opts);
  }

  freeze(s: LiveSandbox): Promise<void> {
    return this.freezer.freeze(s);
  }

  resume(record: SandboxRecord): Promise<LiveSandbox> {
    return this.freezer.resume(record);
  }

  /** PSS of a live sandbox's own processes, in bytes (for capacity, benchmarks and tests). */
  async memoryOf(id: string): Promise<number> {
    const s = this.ctx.live.get(id);
    return s ? s.rt.memoryPss() : 0;
  }

  /** The sandbox's events (egress decisions) after sequence number `after`. */
  events(s: LiveSandbox, after?: number): SandboxEvent[] {
    return this.ctx.eventLog.list(s.rt.id, after);
  }

  async close(): Promise<void> {
    this.ctx.status.closing = true;
    this.sweeper.stop();
    await this.pool.close();
    // onStop 'keep': sandboxes of runtimes that can outlive the server stay alive (and their
    // records live) for the next server to adopt; warm-pool sandboxes went above all the same.
    const keep = this.ctx.config.onStop === 'keep';
    // Persistent sandboxes that can freeze outlive the server on disk; the others end.
    await Promise.all([...this.ctx.live.values()].map(async (s) => {
      if (keep && s.runtime.capabilities.outlivesServer) return;
      if (s.record.persistent && s.runtime.capabilities.freeze && s.runtime.freeze) {
        try {
          return await this.freezer.freeze(s);
        } catch (err) {
          this.ctx.log.warn('could not freeze a persistent sandbox at shutdown', { sandbox: s.record.id, error: (err as Error).message });
        }
      }
      return this.lifecycle.end(s, 'stopped', 'server shut down');
    }));
    await this.lifecycle.teardownsDone();
    for (const r of this.ctx.runtimes.values()) await r.close({ keepSandboxes: keep });
  }
}
