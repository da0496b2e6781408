/**
 * The open registry of runtime drivers, keyed by name. A driver says whether it can run on this
 * host (`detect`, and why not) and makes its runtime (`create`); the server asks the registry for
 * every usable driver's runtime and which one is the default. A new runtime is one new driver and
 * one `register` call.
 */
import { AUTO_RUNTIME, RUNTIME_NAME_PATTERN, type RuntimeName } from './names.js';
import type { Runtime, RuntimeSandbox } from './runtime.js';

/** Whether a driver can run here. */
export type Detection =
  | {
    usable: true;
    /** Picked by `auto` over the drivers registered before it (the VM runtime with hardware KVM). */
    preferred?: boolean;
    /** What was found, for the log (e.g. the acceleration). */
    detail?: string;
  }
  | {
    usable: false;
    /** Completes "the <name> runtime …": what is missing and how to get it. */
    reason: string;
  };

/** A value the server exports as a metric for a driver (e.g. its helper processes' restarts). */
export interface DriverGauge {
  name: string;
  help: string;
  kind?: 'gauge' | 'counter';
  read(): Array<{ labels: Record<string, string>; value: number }>;
}

/** What a driver made: its runtime and what the server needs to know around it. */
export interface DriverInstance<S extends RuntimeSandbox = RuntimeSandbox> {
  runtime: Runtime<S>;
  /** Work to finish before the server listens when this is the default runtime (a guest image). */
  prepareDefault?(): Promise<void>;
  /** Metrics of the driver's own. */
  gauges?: DriverGauge[];
  /** Extra fields for the server's start-up log line. */
  logFields?: Record<string, string>;
}

/**
 * One runtime driver. `Ctx` is what the host hands every driver (its state directory, image,
 * logger, shared services and the configuration slice drivers need), defined by the server. A
 * driver has no name of its own: it runs under the name it is registered with.
 */
export interface RuntimeDriver<Ctx> {
  /** Whether this host can run it; cheap, no side effects. */
  detect(ctx: Ctx): Promise<Detection>;
  /** Makes the runtime, named `name` (its `Runtime.name`). */
  create(ctx: Ctx, name: RuntimeName): Promise<DriverInstance>;
}

/** A driver with the name it is registered under. */
export interface RegisteredDriver<D> {
  readonly name: RuntimeName;
  readonly driver: D;
}

/** A runtime name that no driver is registered under. */
export class UnknownRuntimeError extends Error {
  constructor(readonly runtime: string, readonly known: readonly string[]) {
    super(`runtime must be ${describeChoices([...known, AUTO_RUNTIME])}, got "${runtime}"`);
  }
}

/** The runtime asked for by name cannot run on this host. */
export class RuntimeUnavailableError extends Error {
  constructor(readonly runtime: string, reason: string) {
    super(`the ${runtime} runtime ${reason}`);
  }
}

/** "a, b or c". */
export function describeChoices(names: readonly string[]): string {
  return names.length <= 1 ? names.join('') : `${names.slice(0, -1).join(', ')} or ${names.at(-1)!}`;
}

export interface StartedRuntimes {
  /** Every usable driver's instance, the default first. */
  instances: DriverInstance[];
  /** Drivers not offered here, and why. */
  skipped: Array<{ name: RuntimeName; reason: string }>;
}

/**
 * Drivers by name. `D` is the host's driver type (a server may ask more of its drivers than
 * `RuntimeDriver`, e.g. how to build their images ahead of time).
 */
export class RuntimeRegistry<Ctx, D extends RuntimeDriver<Ctx> = RuntimeDriver<Ctx>> implements Iterable<RegisteredDriver<D>> {
  private readonly drivers = new Map<RuntimeName, D>();

  /** Adds a driver under `name`, which must be new, well-formed and not `auto`. */
  register(name: RuntimeName, driver: D): this {
    if (!RUNTIME_NAME_PATTERN.test(name) || name === AUTO_RUNTIME) {
      throw new Error(`invalid runtime driver name "${name}" (must match ${RUNTIME_NAME_PATTERN} and not be ${AUTO_RUNTIME})`);
    }
    if (this.drivers.has(name)) throw new Error(`a runtime driver named "${name}" is already registered`);
    this.drivers.set(name, driver);
    return this;
  }

  /** A copy with one more driver (a test plugs a driver in without touching the built-in registry). */
  with(name: RuntimeName, driver: D): RuntimeRegistry<Ctx, D> {
    const copy = new RuntimeRegistry<Ctx, D>();
    for (const d of this) copy.register(d.name, d.driver);
    return copy.register(name, driver);
  }

  get(name: RuntimeName): D | undefined {
    return this.drivers.get(name);
  }

  /** Registered names, in registration order. */
  names(): RuntimeName[] {
    return [...this.drivers.keys()];
  }

  /** True for a registered name or `auto` (what the API and configuration accept). */
  accepts(name: string): boolean {
    return name === AUTO_RUNTIME || this.drivers.has(name);
  }

  /** Throws UnknownRuntimeError unless `accepts(name)`. */
  check(name: string): RuntimeName {
    if (!this.accepts(name)) throw new UnknownRuntimeError(name, this.names());
    return name;
  }

  *[Symbol.iterator](): Iterator<RegisteredDriver<D>> {
    for (const [name, driver] of this.drivers) yield { name, driver };
  }

  /**
   * Makes the runtime of every driver usable here. `requested` (a name, or `auto`) becomes the
   * default: a named one must be usable (RuntimeUnavailableError says why not); `auto` is the first
   * usable driver that says it is preferred, else the first usable one in registration order.
   */
  async startAll(requested: string, ctx: Ctx): Promise<StartedRuntimes> {
    this.check(requested);
    const usable: Array<{ name: RuntimeName; driver: D; preferred: boolean }> = [];
    const skipped: StartedRuntimes['skipped'] = [];
    // Probed at once (each runs a command or two; a start-up waits for all of them), judged in order.
    const probes = await Promise.all([...this.drivers].map(async ([name, driver]) => ({ name, driver, found: await driver.detect(ctx) })));
    for (const { name, driver, found } of probes) {
      if (found.usable) usable.push({ name, driver, preferred: found.preferred ?? false });
      else if (name === requested) throw new RuntimeUnavailableError(name, found.reason);
      else skipped.push({ name, reason: found.reason });
    }
    const chosen = requested === AUTO_RUNTIME ? (usable.find((u) => u.preferred) ?? usable[0]) : usable.find((u) => u.name === requested);
    if (!chosen) throw new Error(`no runtime can run on this host: ${skipped.map((s) => `the ${s.name} runtime ${s.reason}`).join('; ')}`);
    const ordered = [chosen, ...usable.filter((u) => u !== chosen)];
    // Created at once too (a restart waits for all of them), kept in order: the chosen one first.
    const results = await Promise.allSettled(ordered.map(({ name, driver }) => driver.create(ctx, name)));
    const instances = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await Promise.allSettled(instances.map((i) => i.runtime.close()));
      throw failed.reason;
    }
    return { instances, skipped };
  }
}
