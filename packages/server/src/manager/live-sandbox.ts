/** What the manager keeps per live sandbox, and the names every part of the manager shares. */
import { randomBytes } from 'node:crypto';
import type { Runtime, RuntimeSandbox } from '../runtime/runtime.js';
import { SerialQueue } from '../serial-queue.js';
import type { SandboxRecord } from '../store/store.js';

export const DEFAULT_TEMPLATE = 'default';

export type RuntimeKind = Runtime['name'];

export function newSandboxId(): string {
  return 'sbx_' + randomBytes(16).toString('hex');
}

/** A sandbox the API can drive: its record, the runtime sandbox behind it, and its queues. */
export interface LiveSandbox {
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

/** A fresh live entry (queues empty, nothing running). */
export function newLiveSandbox(record: SandboxRecord, runtime: Runtime, rt: RuntimeSandbox): LiveSandbox {
  return { record, runtime, rt, queue: new SerialQueue(), running: 0, diffs: new SerialQueue() };
}
