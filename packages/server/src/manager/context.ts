/** The state the manager's parts share: one object per manager, made by the facade (no module state). */
import type { EventEmitter } from 'node:events';
import type { ServerConfig } from '../config.js';
import type { ExecHistory } from '../exec-history.js';
import type { Logger } from '../log.js';
import type { ServerMetrics } from '../metrics.js';
import type { Runtime } from '../runtime/runtime.js';
import type { SandboxEventLog } from '../sandbox-events.js';
import type { SandboxStore } from '../store/store.js';
import type { LiveSandbox, RuntimeKind } from './live-sandbox.js';

/** Lifecycle counts since start (GET /v1/metrics, the dashboard). */
export interface ManagerCounters {
  created: number; destroyed: number; crashed: number; expired: number; forked: number; merged: number;
  limitKills: number; frozen: number; resumed: number;
}

export function newCounters(): ManagerCounters {
  return { created: 0, destroyed: 0, crashed: 0, expired: 0, forked: 0, merged: 0, limitKills: 0, frozen: 0, resumed: 0 };
}

export interface ManagerContext {
  readonly config: ServerConfig;
  readonly store: SandboxStore;
  readonly log: Logger;
  /** Where the runtime records sandbox events (egress decisions); read by GET …/events. */
  readonly eventLog: SandboxEventLog;
  /** Every runtime this server offers. */
  readonly runtimes: ReadonlyMap<RuntimeKind, Runtime>;
  /** The first runtime offered: `runtime` omitted or `auto`. */
  readonly defaultRuntime: Runtime;
  /** Every registered runtime name, offered here or not. */
  readonly knownRuntimes: readonly string[];
  /** The sandboxes the API can drive, by id. */
  readonly live: Map<string, LiveSandbox>;
  readonly counters: ManagerCounters;
  readonly metrics: ServerMetrics;
  readonly history: ExecHistory;
  /** 'change' (sandbox id) whenever a sandbox is created, changes state, forks, merges or ends. */
  readonly changes: EventEmitter<{ change: [string] }>;
  /** Set once close() began: no new sandboxes. */
  readonly status: { closing: boolean };
}
