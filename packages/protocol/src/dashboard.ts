/**
 * What the server sends the dashboard (packages/server/src/http/dashboard-routes.ts), defined once
 * for both: the server builds these, the page (packages/dashboard) reads them. Types only.
 */
import type { ExecErrorInfo } from './events.js';
import type { EgressSetting } from './egress.js';
import type { SandboxState } from './sandbox.js';

export interface DashboardSandbox {
  id: string;
  template: string;
  runtime: string;
  state: SandboxState;
  egress: EgressSetting;
  parent: string | null;
  created_at: number;
  last_active_at: number;
  ended_at: number | null;
  end_reason: string | null;
  idle_timeout_seconds: number;
  memory_bytes: number | null;
  metadata: Record<string, string>;
  /** The cluster host it runs on (through a gateway only). */
  host?: string;
}

export interface SandboxesSnapshot {
  now: number;
  sandboxes: DashboardSandbox[];
}

/** One piece of an exec's output, as the history keeps it. */
export type HistoryOutput =
  | { type: 'stdout' | 'stderr'; data: string }
  | { type: 'result'; data: Record<string, unknown>; is_main_result: boolean }
  | { type: 'error'; data: ExecErrorInfo };

export interface ExecRecord {
  /** Unique on this server, increasing. */
  id: number;
  sandbox: string;
  language: 'python' | 'bash' | 'javascript';
  code: string;
  started_at: number;
  ended_at: number | null;
  exit_code: number | null;
  execution_count: number | null;
  state_lost: boolean;
  outputs: HistoryOutput[];
  /** True once output was dropped for the per-exec cap. */
  truncated: boolean;
}

/** A step of an exec, as streamed to the dashboard. */
export type ExecUpdate =
  | { phase: 'start'; sandbox: string; exec: ExecRecord }
  | { phase: 'output'; sandbox: string; id: number; output: HistoryOutput }
  | { phase: 'end'; sandbox: string; exec: ExecRecord };

export interface HistogramSnapshot {
  /** Upper bounds in seconds; the last bucket (+Inf) is implicit in `count`. */
  buckets: number[];
  /** Observations per bucket (not cumulative), one per bound plus one for +Inf. */
  counts: number[];
  count: number;
  sum: number;
}

export interface PoolStats {
  /** A runtime's name. */
  runtime: string;
  template: string;
  egress: boolean;
  ready: number;
  starting: number;
  target: number;
  hits: number;
  misses: number;
}

export interface HostSnapshot {
  now: number;
  pools: PoolStats[];
  sandboxes: Record<string, number>;
  metrics: {
    uptime_seconds: number;
    histograms: Record<'create' | 'exec' | 'fork', HistogramSnapshot>;
    limit_kills: Record<string, number>;
  };
  history_bytes: number;
  /** Through a cluster gateway: the cluster host these figures are of (one node's). */
  cluster_host?: string;
  host: {
    hostname: string; cpus: number; loadavg: number[]; total_memory: number; free_memory: number;
    uptime_seconds: number; node: string; server_rss: number;
  };
}

/** One host of a cluster as a gateway sees it (`GET /v1/cluster/hosts`, and the dashboard's `cluster` event). */
export interface ClusterHost {
  id: string;
  address: string;
  ready: boolean;
  draining: boolean;
  /** Heartbeating within the TTL. */
  fresh: boolean;
  /** This gateway's health probes reach it. */
  reachable: boolean;
  heartbeat_age_ms: number;
  live: number;
  capacity: number;
  pool: { ready: number; target: number };
  /** The host's load average (1, 5, 15 min), from its node's dashboard stream; absent until known. */
  loadavg?: number[];
}

/** The dashboard's `cluster` event (through a gateway): every host, every second. */
export interface ClusterSnapshot {
  hosts: ClusterHost[];
}

/** `diff` of two sandboxes' files (GET /v1/sandboxes/:id/diff). */
export interface FileDiff {
  added: string[];
  removed: string[];
  modified: string[];
  /** Unified diff per changed text file (`?content=1`). */
  content?: Record<string, string>;
  /** Changed files not shown in `content` because they are binary, or over the size cap. */
  binary?: string[];
  too_large?: string[];
  /** Set when the answer was cut at the server's bounds (changed paths listed, text diff bytes). */
  truncated?: boolean;
}

/** One interpreter variable, as a diff reports it. */
export interface VarSummary { name: string; type: string; repr: string }

/** The interpreter variables of the other sandbox relative to this one (`?vars=1`). */
export interface VarsDiff {
  added: VarSummary[];
  removed: VarSummary[];
  changed: Array<{ name: string; type: string; before: string; after: string }>;
}

/** The diff answer (GET /v1/sandboxes/:id/diff/:other): files, and variables with `?vars=1`. */
export interface DiffAnswer extends FileDiff {
  vars?: VarsDiff;
}
