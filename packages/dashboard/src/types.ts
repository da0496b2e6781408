/**
 * What the server sends the page: the shapes are defined once, in @podflare/protocol (types only:
 * nothing of that package ends up in the bundle).
 */
export type {
  ClusterHost, ClusterSnapshot, DashboardSandbox, ExecRecord, ExecUpdate, FileStat, HistogramSnapshot, HistoryOutput as ExecOutput, HostSnapshot,
  SandboxesSnapshot, DiffAnswer as FileDiff,
} from '@podflare/protocol';
