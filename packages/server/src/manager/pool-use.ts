/**
 * Where a new sandbox's runtime sandbox comes from: the warm pool when one is ready for its key,
 * else started on demand (retried once; 503 if the host cannot). Egress allowlists always start
 * cold: a policy is per sandbox, no pool serves it. Refills and misses are forks of the template's
 * zygote (zygote.ts) where the runtime can fork, cold starts otherwise (or while it starts).
 */
import { isEgressPolicy, type EgressSetting } from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import { WarmPool, type PoolKey, type PoolMissReason } from '../pool.js';
import type { Runtime, RuntimeSandbox, SandboxSpec } from '../runtime/runtime.js';
import { templatePreload } from '../template-preload.js';
import { Zygotes, type ZygoteStats } from '../zygote.js';
import type { ManagerContext } from './context.js';
import { DEFAULT_TEMPLATE, newSandboxId, type RuntimeKind } from './live-sandbox.js';
import { templatePoolTarget, warmConfiguredTemplates } from './template-policy.js';

/** Why a create started its sandbox cold: a pool miss, or an egress allowlist (no pool serves those). */
export type CreateMissReason = PoolMissReason | 'egress_policy';


export class PoolUse {
  private readonly pool: WarmPool;
  /** Per template, the pre-warmed sandbox that refills and misses are forked from (zygote.ts). */
  private readonly zygotes: Zygotes;
  /** The spec a template's zygote is started (or forked) with. */
  private readonly zygoteSpec: (template: string) => SandboxSpec;
  /** Creates with an egress allowlist (started cold: no pool serves them). */
  private policyCreatesCount = 0;

  constructor(private readonly ctx: ManagerContext) {
    const { config } = ctx;
    const preload = (template: string) => (template === DEFAULT_TEMPLATE && config.defaultTemplatePreload ? config.defaultTemplatePreload : templatePreload(template));
    this.zygoteSpec = (template) => {
      const id = newSandboxId();
      const env = { PODFLARE_ZYGOTE_PRELOAD: preload(template).join(',') };
      return { id, template, egress: false, hostname: `sbx-${id.slice(4, 16)}`, background: true, env, limits: config.defaultLimits };
    };
    this.zygotes = new Zygotes({
      enabled: config.zygote,
      zygoteSpec: this.zygoteSpec,
      maxBatch: 4,
      log: ctx.log,
    });
    this.pool = new WarmPool((key) => this.startRuntimeSandbox(key.runtime, key.template, key.egress, true), {
      target: config.poolSize,
      // Refills forked from a zygote are cheap, and the zygote forks those asked for together.
      maxParallelStarts: config.zygote ? 8 : 2,
      // Where warm sandboxes are costly (a VM's QEMU each), a bucket keeps its target, never more.
      maxTarget: (key) => (this.ctx.runtimes.get(key.runtime)?.warmPoolMax === undefined ? config.poolMaxSize : 0),
      idleMs: Math.max(1, config.poolIdleSeconds) * 1000,
      log: ctx.log,
    });
  }

  /** Starts filling the pool of the default runtime and template, and of the templates the configuration sizes. */
  warmDefault(): void {
    const key: PoolKey = { runtime: this.ctx.defaultRuntime.name, template: DEFAULT_TEMPLATE, egress: true };
    // Even without a pool: misses are forks of the zygote.
    this.zygotes.warm(this.ctx.defaultRuntime, DEFAULT_TEMPLATE);
    this.pool.warm(key, this.ctx.config.templatePoolSizes[DEFAULT_TEMPLATE] ?? this.poolTarget(key.runtime));
    warmConfiguredTemplates(this.ctx.config, this.ctx.templates, this.ctx.runtimes.get('ns'), (k, n) => this.pool.warm(k, n), this.ctx.log);
  }

  /** Pools of templates nobody took from for a while shrink (called by the sweep). */
  shrinkIdle(now: number): void {
    this.pool.dropIdle(this.ctx.config.templatePoolIdleSeconds * 1000, now);
  }

  /**
   * A runtime sandbox for a new API sandbox, and why it started cold (undefined: served from the
   * pool).
   */
  async acquire(runtime: Runtime, template: string, egress: EgressSetting): Promise<{ rt: RuntimeSandbox; poolMiss?: CreateMissReason }> {
    if (isEgressPolicy(egress)) {
      // A policy is per sandbox: no pool serves it.
      if (!runtime.capabilities.egressPolicy) {
        throw new SandboxError('bad_request', `the ${runtime.name} runtime cannot enforce egress allowlists`, { field: 'egress' });
      }
      return { rt: await this.startOnDemand(runtime.name, template, egress), poolMiss: 'egress_policy' };
    }
    const key: PoolKey = { runtime: runtime.name, template, egress };
    const taken = this.pool.take(key, templatePoolTarget(this.ctx.config, template, this.poolTarget(runtime.name)));
    if (taken.sandbox) return { rt: taken.sandbox };
    const poolMiss = taken.miss;
    const t0 = performance.now();
    const rt = await this.startOnDemand(runtime.name, template, egress);
    // A miss the configuration asks for is no news; one the pool could not keep up with is.
    const level = poolMiss === 'pool_off' ? 'debug' : 'info';
    const ms = Math.round(performance.now() - t0);
    this.ctx.log[level]('create missed the warm pool', { reason: poolMiss, template, egress, runtime: runtime.name, ms });
    return { rt, poolMiss };
  }

  /** Counts a create that went live with an egress allowlist. */
  notePolicyCreate(): void {
    this.policyCreatesCount++;
  }

  get policyCreates(): number {
    return this.policyCreatesCount;
  }

  stats() {
    return this.pool.stats();
  }

  missReasons() {
    return this.pool.missReasons();
  }

  zygoteStats(): ZygoteStats[] {
    return this.zygotes.stats();
  }

  waitFull(timeoutMs?: number): Promise<void> {
    return this.pool.waitFull(timeoutMs);
  }

  /**
   * A zygote for a template just made from the live sandbox `parent`: a fork of it (its
   * interpreter's state) over the template's layers, not yet in use (adoptZygote). Null where the
   * runtime or the configuration has no zygotes, or the fork failed (the template then starts
   * with its files only).
   */
  async forkZygote(runtime: Runtime, parent: RuntimeSandbox, template: string, layers: string[]): Promise<RuntimeSandbox | null> {
    if (!this.ctx.config.zygote || !runtime.capabilities.zygote || !runtime.capabilities.fork) return null;
    let child: RuntimeSandbox | undefined;
    try {
      [child] = await runtime.fork(parent, [this.zygoteSpec(template)], { templateLayers: layers });
      if (!child) return null;
      await child.ready;
      await child.channel.request({ op: 'vars' });
      return child;
    } catch (err) {
      this.ctx.log.warn('could not fork the sandbox into its template\'s zygote; the template carries its files only', { template, error: (err as Error).message });
      await child?.destroy();
      return null;
    }
  }

  /** Makes a zygote from forkZygote the template's; false (and it is destroyed) if the template has one. */
  adoptZygote(runtime: Runtime, template: string, zygote: RuntimeSandbox): boolean {
    if (this.zygotes.adopt(runtime, template, zygote)) return true;
    void zygote.destroy();
    return false;
  }

  /** A deleted template's warm pools and zygote end (resolves once their sandboxes are gone). */
  async dropTemplate(template: string): Promise<void> {
    await Promise.all([this.pool.dropTemplate(template), this.zygotes.retire(template)]);
  }

  async close(): Promise<void> {
    await this.pool.close();
    await this.zygotes.close();
  }

  private poolTarget(runtime: RuntimeKind): number {
    return Math.min(this.ctx.runtimes.get(runtime)?.warmPoolMax ?? Infinity, this.ctx.config.poolSize);
  }

  /** A pool miss: start one now, retrying once, and say 503 (retryable) if the host cannot. */
  private async startOnDemand(runtime: RuntimeKind, template: string, egress: EgressSetting): Promise<RuntimeSandbox> {
    try {
      return await this.startRuntimeSandbox(runtime, template, egress);
    } catch (first) {
      this.ctx.log.warn('sandbox start failed, retrying', { error: (first as Error).message });
      try {
        return await this.startRuntimeSandbox(runtime, template, egress);
      } catch (err) {
        throw new SandboxError('unavailable', `could not start a sandbox: ${(err as Error).message}`, { retryAfterSeconds: 1 });
      }
    }
  }

  private async startRuntimeSandbox(
    runtimeName: RuntimeKind, template: string, egress: EgressSetting, background = false,
  ): Promise<RuntimeSandbox> {
    const runtime = this.ctx.runtimes.get(runtimeName);
    if (!runtime) throw new Error(`no ${runtimeName} runtime`);
    const spec = () => {
      const id = newSandboxId();
      return { id, template, egress, hostname: `sbx-${id.slice(4, 16)}`, background, limits: this.ctx.config.defaultLimits };
    };
    // A refill waits for a zygote still starting; a create does not (it starts cold meanwhile).
    const fromZygote = () => this.zygotes.fork(runtime, spec(), { wait: background, urgent: !background });
    // A refill tries again once (a zygote that died is being replaced); a create starts cold.
    const forked = await fromZygote().catch((err: Error) => (background ? fromZygote() : Promise.reject(err))).catch((err: Error) => {
      if (!this.ctx.status.closing) this.ctx.log.warn('fork from the zygote failed; starting cold', { template, error: err.message });
      return null;
    });
    return forked ?? runtime.start(spec());
  }
}
