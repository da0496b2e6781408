/** What the server sends the dashboard (packages/server/src/http/dashboard-routes.ts). */
export type SandboxState = 'starting' | 'ready' | 'running' | 'stopped' | 'error' | 'merged' | 'frozen' | 'lost';

export interface DashboardSandbox {
  id: string;
  template: string;
  runtime: string;
  state: SandboxState;
  egress: boolean | { allow: string[] };
  parent: string | null;
  created_at: number;
  last_active_at: number;
  ended_at: number | null;
  end_reason: string | null;
  idle_timeout_seconds: number;
  memory_bytes: number | null;
  metadata: Record<string, string>;
}

export interface SandboxesSnapshot {
  now: number;
  sandboxes: DashboardSandbox[];
}

export interface ExecErrorInfo { name: string; value: string; traceback: string }

export type ExecOutput =
  | { type: 'stdout' | 'stderr'; data: string }
  | { type: 'result'; data: Record<string, unknown>; is_main_result: boolean }
  | { type: 'error'; data: ExecErrorInfo };

export interface ExecRecord {
  id: number;
  sandbox: string;
  language: 'python' | 'bash';
  code: string;
  started_at: number;
  ended_at: number | null;
  exit_code: number | null;
  execution_count: number | null;
  state_lost: boolean;
  outputs: ExecOutput[];
  truncated: boolean;
}

export type ExecUpdate =
  | { phase: 'start'; sandbox: string; exec: ExecRecord }
  | { phase: 'output'; sandbox: string; id: number; output: ExecOutput }
  | { phase: 'end'; sandbox: string; exec: ExecRecord };

export interface HistogramSnapshot { buckets: number[]; counts: number[]; count: number; sum: number }

export interface PoolStats { template: string; egress: boolean; ready: number; starting: number; target: number; hits: number; misses: number }

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
  host: {
    hostname: string; cpus: number; loadavg: number[]; total_memory: number; free_memory: number;
    uptime_seconds: number; node: string; server_rss: number;
  };
}

export interface FileStat { name: string; path: string; type: 'file' | 'dir' | 'symlink' | 'other'; size: number; mode: number; mtime: number }

export interface FileDiff {
  added: string[];
  removed: string[];
  modified: string[];
  content?: Record<string, string>;
  binary?: string[];
  too_large?: string[];
  vars?: {
    added: Array<{ name: string; type: string; repr: string }>;
    removed: Array<{ name: string; type: string; repr: string }>;
    changed: Array<{ name: string; type: string; before: string; after: string }>;
  };
}
