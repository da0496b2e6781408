/**
 * What the server keeps about sandboxes beyond a process's life: records and lineage. Async so a
 * networked database (PostgreSQL, for the cluster mode) can stand behind the same interface.
 */
import { ENDED_SANDBOX_STATES, type EgressSetting, type SandboxState } from '@podflare/protocol';

/** A sandbox's resource limits as stored (the runtimes' SandboxLimits has this shape). */
export interface RecordLimits {
  cpus: number;
  memoryBytes: number;
  diskBytes: number;
  pids: number;
}

export interface SandboxRecord {
  id: string;
  state: SandboxState;
  template: string;
  /** The name of the runtime that runs it. */
  runtime: string;
  egress: EgressSetting;
  persistent: boolean;
  parentId: string | null;
  createdAt: number;
  lastActiveAt: number;
  endedAt: number | null;
  endReason: string | null;
  idleTimeoutSeconds: number;
  maxLifetimeSeconds: number;
  metadata: Record<string, string>;
  /** sha256 of the API key that created it ('' when auth is off). */
  owner: string;
  /** Resource limits it ran with (absent in records older than limits). */
  limits?: RecordLimits;
}

export interface SandboxFilter {
  ancestor?: string;
  state?: SandboxState;
  /** Include ended sandboxes (stopped, error, merged, lost). */
  includeEnded?: boolean;
  owner?: string;
}

export interface SandboxStore {
  insert(record: SandboxRecord): Promise<void>;
  update(id: string, patch: Partial<Omit<SandboxRecord, 'id'>>): Promise<void>;
  get(id: string): Promise<SandboxRecord | undefined>;
  list(filter?: SandboxFilter): Promise<SandboxRecord[]>;
  children(id: string): Promise<string[]>;
  /**
   * Runs `fn` against a view of the store whose writes land together or not at all (several rows
   * that change together: a merge's winner and its reparented children, a fork's records). A
   * throw from `fn` discards every write it made and is rethrown.
   */
  transaction<T>(fn: (tx: SandboxStore) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/** The states of sandboxes that are over (the protocol's list). */
export const ENDED_STATES: readonly SandboxState[] = ENDED_SANDBOX_STATES;
