/**
 * What the server hands every runtime driver: where to keep its files, the sandbox image, the
 * logger, the services drivers share (the spawner, the egress proxy), and the slice of the
 * configuration runtimes read. Runtime code sees only this, never the server's configuration type.
 */
import type { RuntimeDriver, RuntimeRegistry } from '@podflare/runtime';
import type { EgressService } from '../egress/index.js';
import type { ImagePaths, ImageProgress } from '../image/index.js';
import type { Logger } from '../log.js';
import type { Spawner } from './shared/spawner.js';

/** The configuration runtimes read (field names as in the server's configuration, config.ts). */
export interface RuntimeSettings {
  stateDir: string;
  imagesDir: string;
  /** The Python agent's source (agent/): what runs inside every sandbox. */
  agentDir: string;
  startTimeoutMs: number;
  interruptGraceMs: number;
  /** First host uid of the namespace sandboxes' id range. */
  sandboxUidBase: number;
  /** Size of the namespace runtime's disk volume. */
  diskVolumeBytes: number;
  /** The namespace runtime's host helper: workers and timeouts. */
  hostHelper: { workers: number; fastTimeoutMs: number; slowTimeoutMs: number };
  /** The VM runtime's host id range (QEMUs run as these uids). */
  vmUidBase: number;
  vmUidCount: number;
  /** Sandboxes of an earlier server whose agent protocol is another major version: 'clean' or 'refuse'. */
  onIncompatible?: 'clean' | 'refuse';
  /** What a stop does with live sandboxes; with 'destroy' they also end when the server dies without one. */
  onStop?: 'keep' | 'destroy';
}

export interface DriverContext {
  settings: RuntimeSettings;
  /** The sandbox image's layers (agent, Debian base). */
  image: ImagePaths;
  log: Logger;
  /** Starts helper processes (slirp4netns, QEMU): one per server. */
  spawner: Spawner;
  /** Serves sandboxes with an egress allowlist. */
  egress: EgressService;
  /** Progress of images a driver builds (the VM guest image). */
  onImageProgress?: (p: ImageProgress) => void;
  /**
   * A template's read-only layers below the agent layer, topmost first, base last
   * (image/templates.ts): for runtimes that mount templates (the namespace runtime).
   */
  layersFor?: (template: string) => Promise<string[]>;
}

/** What `podflare image build --runtime <name>` hands a driver that has an image of its own. */
export interface DriverImageOptions {
  imagesDir: string;
  /** The sandbox image it builds on. */
  image: ImagePaths;
  onProgress?: (p: ImageProgress) => void;
  log: (message: string) => void;
}

/** A runtime driver of this server. */
export interface ServerDriver extends RuntimeDriver<DriverContext> {
  /**
   * Builds (or finds) this runtime's own image beyond the sandbox image (the VM guest), ahead of
   * the first sandbox; resolves with lines describing it.
   */
  buildImage?(opts: DriverImageOptions): Promise<string[]>;
  /**
   * Its sandboxes start templates other than `default` (capability `templates` of the runtime it
   * makes), known without making it: what offline tools (`podflare template ls`) report.
   */
  readonly startsTemplates?: boolean;
}

/** The names of the drivers whose runtimes start templates other than `default`. */
export function templateRuntimeNames(runtimes: ServerRuntimes): string[] {
  return [...runtimes].filter((r) => r.driver.startsTemplates).map((r) => r.name);
}

/** The drivers a server offers, by name. */
export type ServerRuntimes = RuntimeRegistry<DriverContext, ServerDriver>;
