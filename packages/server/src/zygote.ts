/**
 * Zygotes: per runtime and template, one pre-warmed sandbox that nobody uses, whose interpreter
 * has already imported what the template's users import (template-preload.ts). Warm-pool refills
 * and pool misses are forks of it (memory copy-on-write, the namespace runtime's fork machinery),
 * not cold starts: a miss costs about a fork(1), and `import pandas` in the new sandbox is a
 * dictionary lookup.
 *
 * What makes a zygote's child an ordinary new sandbox:
 * - the fork gives it a fresh id, hostname, namespaces, reseeded random generators (as any fork
 *   child); the preload list is taken out of the environment in the zygote (agent side);
 * - `freshFiles`: its root starts from the image's layers, not from the zygote's files;
 * - the server records it with no parent (the zygote is no API sandbox: no id a user can see);
 * - its own cgroups and disk limit from its spec.
 *
 * One zygote serves a template whatever the egress: a fork child's network namespace is new
 * anyway and its network (slirp4netns) is attached per child from its own spec, so the zygote
 * itself runs without one.
 *
 * Forks are batched: requests arriving while the zygote forks go together into its next fork
 * (the interpreter forks one child after the other, but the host-side set-up of a batch overlaps).
 * Creates waiting on a miss go ahead of pool refills, and fork beside a batch of refills in flight
 * (two forks of one zygote at once: its agent runs no user code, so its fork answers need no
 * more proof than one fork's).
 *
 * A zygote that dies (or whose forks keep failing) is replaced; its live children are not
 * affected (a dead zygote becomes a husk until its last child ends: ns-sandbox.ts).
 */
import type { Logger } from './log.js';
import type { Runtime, RuntimeSandbox, SandboxSpec } from './runtime/runtime.js';

export interface ZygoteOptions {
  /** Off: every start is cold (as before zygotes). */
  enabled: boolean;
  /** The zygote's own spec (a fresh id each time it is started; its env names what it preloads). */
  zygoteSpec(template: string): SandboxSpec;
  /** Children per fork at most: a create waiting behind a large batch would wait for all of it. */
  maxBatch: number;
  log: Logger;
}

interface Request {
  spec: SandboxSpec;
  /** A create waiting on a miss (ahead of refills). */
  urgent: boolean;
  resolve(sandbox: RuntimeSandbox): void;
  reject(err: Error): void;
}

interface Zygote {
  runtime: Runtime;
  template: string;
  /** Set once it answers with its preload done. */
  sandbox: RuntimeSandbox | null;
  starting: Promise<RuntimeSandbox | null> | null;
  /** Misses first, then refills. */
  waiting: Request[];
  /** A batch of misses is forking; a batch of refills is forking (see pump). */
  forkingUrgent: boolean;
  forkingRefills: boolean;
  /** Consecutive failed forks or starts: past a few the zygote is replaced, starts back off. */
  failures: number;
  /** No new zygote before this (ms epoch): a broken image must not make the server spin. */
  retryAt: number;
}

/** Consecutive failed forks after which a zygote is replaced. */
const FORK_FAILURES_BEFORE_REPLACE = 2;

/** Counters for /v1/metrics and tests. */
export interface ZygoteStats {
  runtime: string;
  template: string;
  ready: boolean;
  forked: number;
  started: number;
}

export class Zygotes {
  private readonly zygotes = new Map<string, Zygote>();
  private readonly counts = new Map<string, { forked: number; started: number }>();
  private closed = false;

  constructor(private readonly opts: ZygoteOptions) {}

  /** Whether sandboxes of this runtime can come from a zygote (it must fork; egress lists never). */
  serves(runtime: Runtime, spec: Pick<SandboxSpec, 'egress'>): boolean {
    return this.opts.enabled && !this.closed && runtime.capabilities.fork && runtime.capabilities.zygote === true && typeof spec.egress === 'boolean';
  }

  /** Starts the template's zygote in the background, if it has none. */
  warm(runtime: Runtime, template: string): void {
    if (!this.opts.enabled || !runtime.capabilities.zygote) return;
    void this.ensure(this.zygote(runtime, template));
  }

  /**
   * A new sandbox for `spec`, forked from its template's zygote. `wait`: wait for a zygote still
   * starting (pool refills); otherwise null when none is ready yet (a create starts cold rather
   * than wait for the preload). Rejects when the fork fails (the caller may start cold).
   */
  async fork(runtime: Runtime, spec: SandboxSpec, opts: { wait: boolean; urgent: boolean }): Promise<RuntimeSandbox | null> {
    if (!this.serves(runtime, spec)) return null;
    const z = this.zygote(runtime, spec.template);
    const ready = this.ensure(z);
    if (!z.sandbox) {
      if (!opts.wait) return null;
      if (!(await ready)) return null;
    }
    const child = await new Promise<RuntimeSandbox>((resolve, reject) => {
      const request: Request = { spec, urgent: opts.urgent, resolve, reject };
      // Urgent ones after the other urgent ones, ahead of every refill.
      const firstRefill = opts.urgent ? z.waiting.findIndex((r) => !r.urgent) : -1;
      z.waiting.splice(firstRefill === -1 ? z.waiting.length : firstRefill, 0, request);
      this.pump(z);
    });
    if (!opts.urgent) {
      // A pooled sandbox is handed out fully set up, as a cold-started one was: its network and
      // cgroups attached, and its interpreter process started (a fork child starts it lazily;
      // `vars` is answered by it). Its first exec then waits for nothing, and the pool's "full"
      // means no work of its own is still running.
      try {
        await child.ready;
        await child.channel.request({ op: 'vars' });
      } catch (err) {
        await child.destroy();
        throw err;
      }
    }
    return child;
  }

  stats(): ZygoteStats[] {
    return [...this.zygotes.entries()].map(([key, z]) => ({
      runtime: z.runtime.name, template: z.template, ready: z.sandbox !== null, ...(this.counts.get(key) ?? { forked: 0, started: 0 }),
    }));
  }

  /** Makes `sandbox` the template's zygote: replaced (warmed again) should it end, and its waiting forks served. */
  private install(z: Zygote, sandbox: RuntimeSandbox): void {
    z.sandbox = sandbox;
    z.failures = 0;
    void sandbox.exited.then(({ reason }) => {
      if (z.sandbox !== sandbox) return;
      z.sandbox = null;
      if (this.closed) return;
      this.opts.log.warn('a zygote ended; starting another', { template: z.template, reason });
      this.warm(z.runtime, z.template);
    });
    this.pump(z);
  }

  /**
   * Makes `sandbox` (ready, its interpreter idle) the template's zygote, where it has none: a
   * template made from a live sandbox, whose zygote is a fork of that sandbox (its interpreter's
   * state carried). False if the template has a zygote already (the caller destroys `sandbox`).
   * Should it die, the replacement is an ordinary cold zygote (files and preload only).
   */
  adopt(runtime: Runtime, template: string, sandbox: RuntimeSandbox): boolean {
    if (this.closed || !this.opts.enabled) return false;
    const z = this.zygote(runtime, template);
    if (z.sandbox || z.starting) return false;
    this.install(z, sandbox);
    return true;
  }

  /** Ends a template's zygotes (the template was deleted); waiting requests fail. */
  async retire(template: string): Promise<void> {
    const mine = [...this.zygotes.entries()].filter(([, z]) => z.template === template);
    await Promise.all(mine.map(async ([key, z]) => {
      this.zygotes.delete(key);
      for (const r of z.waiting.splice(0)) r.reject(new Error(`template ${template} was deleted`));
      const s = z.sandbox ?? (await z.starting?.catch(() => null));
      z.sandbox = null;
      await s?.destroy();
    }));
  }

  /** Ends every zygote (each lingers as a husk while children of it live: the runtime's close ends those). */
  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.zygotes.values()];
    for (const z of all) for (const r of z.waiting.splice(0)) r.reject(new Error('the server is shutting down'));
    await Promise.all(all.map(async (z) => {
      const s = z.sandbox ?? (await z.starting?.catch(() => null));
      z.sandbox = null;
      await s?.destroy();
    }));
  }

  private key(runtime: Runtime, template: string): string {
    return `${runtime.name}|${template}`;
  }

  private zygote(runtime: Runtime, template: string): Zygote {
    const key = this.key(runtime, template);
    let z = this.zygotes.get(key);
    if (!z) {
      z = { runtime, template, sandbox: null, starting: null, waiting: [], forkingUrgent: false, forkingRefills: false, failures: 0, retryAt: 0 };
      this.zygotes.set(key, z);
      this.counts.set(key, { forked: 0, started: 0 });
    }
    return z;
  }

  /** Resolves with the ready zygote, starting one if needed; null if it could not (or may not yet). */
  private ensure(z: Zygote): Promise<RuntimeSandbox | null> {
    if (z.sandbox) return Promise.resolve(z.sandbox);
    if (z.starting) return z.starting;
    if (this.closed || Date.now() < z.retryAt) return Promise.resolve(null);
    const spec = this.opts.zygoteSpec(z.template);
    const t0 = performance.now();
    z.starting = (async () => {
      const sandbox = await z.runtime.start(spec);
      try {
        // Answered by the worker once its preload is done: the zygote is worth forking now.
        await sandbox.channel.request({ op: 'vars' });
      } catch (err) {
        await sandbox.destroy();
        throw err;
      }
      return sandbox;
    })().then((sandbox) => {
      z.starting = null;
      if (this.closed) {
        void sandbox.destroy();
        return null;
      }
      this.counts.get(this.key(z.runtime, z.template))!.started++;
      this.opts.log.debug('zygote ready', { runtime: z.runtime.name, template: z.template, ms: Math.round(performance.now() - t0) });
      this.install(z, sandbox);
      return sandbox;
    }, (err: Error) => {
      z.starting = null;
      z.failures++;
      z.retryAt = Date.now() + Math.min(30_000, 500 * 2 ** z.failures);
      if (!this.closed) this.opts.log.warn('a zygote could not start; sandboxes start cold meanwhile', { template: z.template, error: err.message });
      for (const r of z.waiting.splice(0)) r.reject(err);
      return null;
    });
    return z.starting;
  }

  /**
   * Forks up to maxBatch waiting requests at a time per zygote. Misses do not wait for a batch of
   * refills in flight (a whole fork, tens of milliseconds under load: the tail of a create that
   * missed): a batch of misses may fork beside it. Refills fork when nothing else does.
   */
  private pump(z: Zygote): void {
    const zygote = z.sandbox;
    if (z.waiting.length === 0) return;
    const urgent = z.waiting[0]!.urgent; // misses are queued first
    if (urgent ? z.forkingUrgent : z.forkingUrgent || z.forkingRefills) return;
    if (!zygote) {
      void this.ensure(z).then((s) => {
        if (s) return;
        for (const r of z.waiting.splice(0)) r.reject(new Error('no zygote'));
      });
      return;
    }
    const firstRefill = z.waiting.findIndex((r) => !r.urgent);
    const batch = z.waiting.splice(0, Math.min(this.opts.maxBatch, urgent && firstRefill >= 0 ? firstRefill : Infinity));
    if (urgent) z.forkingUrgent = true;
    else z.forkingRefills = true;
    z.runtime.fork(zygote, batch.map((r) => r.spec), { freshFiles: true }).then((children) => {
      z.failures = 0;
      this.counts.get(this.key(z.runtime, z.template))!.forked += children.length;
      const byId = new Map(children.map((c) => [c.id, c]));
      for (const r of batch) {
        const child = byId.get(r.spec.id);
        if (child) r.resolve(child);
        else r.reject(new Error('the zygote fork returned no child for this sandbox'));
      }
    }, (err: Error) => {
      z.failures++;
      if (z.sandbox === zygote && zygote.channel.closed) {
        // Dead (its exit may not have been seen yet): the requests' retries go to the next one.
        z.sandbox = null;
        void zygote.destroy();
        this.warm(z.runtime, z.template);
      } else if (z.sandbox === zygote && z.failures >= FORK_FAILURES_BEFORE_REPLACE) {
        this.opts.log.warn('a zygote\'s forks keep failing; replacing it', { template: z.template, error: err.message });
        z.sandbox = null;
        void zygote.destroy();
        this.warm(z.runtime, z.template);
      }
      for (const r of batch) r.reject(err);
    }).finally(() => {
      if (urgent) z.forkingUrgent = false;
      else z.forkingRefills = false;
      this.pump(z);
    });
  }
}

