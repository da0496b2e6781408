/**
 * Background processes: commands that run beside the interpreter and outlive the call that started
 * them (agent side: agent/podflare_processes.py). Defined once here: the channel ops between the
 * server and the agent, and the REST bodies and events.
 *
 * Output is kept in a bounded log per process. Every character has an offset (stdout and stderr
 * counted together, from the process's start), so a client that reconnects reads "from offset N" and
 * gets everything still kept; characters dropped from the log's front are reported as `lost`.
 *
 * Fork: a child sandbox does not get its parent's background processes (only the interpreter's memory
 * and the files are copied); the parent's keep running in the parent.
 */
import { z } from 'zod';

/** Characters of output kept per process unless the start request says otherwise. */
export const DEFAULT_PROCESS_LOG_CHARS = 1024 * 1024;
/** The most a start request may ask to keep. */
export const MAX_PROCESS_LOG_CHARS = 16 * 1024 * 1024;
/** Characters one `proc_read` answer carries at most. */
export const MAX_PROCESS_READ_CHARS = 256 * 1024;
/** Longest wait of one `proc_read` for new output. */
export const MAX_PROCESS_WAIT_MS = 60_000;
/** Signals a caller may send to a process (its whole process group). */
export const PROCESS_SIGNALS = ['SIGTERM', 'SIGKILL', 'SIGINT', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2', 'SIGSTOP', 'SIGCONT'] as const;
export type ProcessSignal = (typeof PROCESS_SIGNALS)[number];

const id = z.number().int().nonnegative();
const pid = z.number().int().min(1).max(4_194_304);
const envName = z.string().min(1).max(256).regex(/^[^=\0]+$/, 'must not contain = or NUL');
const env = z.record(envName, z.string().max(128 * 1024).regex(/^[^\0]*$/, 'must not contain NUL'))
  .refine((e) => Object.keys(e).length <= 1000, 'at most 1000 variables');
const cwd = z.string().min(1).max(4096).regex(/^[^\0]+$/, 'must not contain NUL');
/** A terminal's size, for a process on a pseudo-terminal (a PTY). */
export const TerminalSize = z.object({ cols: z.number().int().min(1).max(1000), rows: z.number().int().min(1).max(1000) }).strict();
export type TerminalSize = z.infer<typeof TerminalSize>;
const cmd = z.string().min(1).max(1024 * 1024).regex(/^[^\0]+$/, 'must not contain NUL');

// ---- channel ops (server -> agent) ---------------------------------------------------------

export const ProcStartRequest = z.object({
  id, op: z.literal('proc_start'), cmd, cwd: cwd.optional(), env: env.optional(),
  log_chars: z.number().int().min(1024).max(MAX_PROCESS_LOG_CHARS).optional(),
  /** On a pseudo-terminal of this size (its output is one stream, `stdout`; TERM=xterm-256color). */
  pty: TerminalSize.optional(),
});
export const ProcListRequest = z.object({ id, op: z.literal('proc_list') });
/** Output from `offset`; with `wait_ms`, answered once there is some, the process ends, or the wait is over. */
export const ProcReadRequest = z.object({
  id, op: z.literal('proc_read'), pid,
  offset: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
  max_chars: z.number().int().min(1).max(MAX_PROCESS_READ_CHARS).optional(),
  wait_ms: z.number().int().min(0).max(MAX_PROCESS_WAIT_MS).optional(),
});
export const ProcWriteRequest = z.object({ id, op: z.literal('proc_write'), pid, data: z.string().max(1024 * 1024), eof: z.boolean().optional() });
export const ProcResizeRequest = z.object({ id, op: z.literal('proc_resize'), pid, cols: TerminalSize.shape.cols, rows: TerminalSize.shape.rows });
export const ProcSignalRequest = z.object({ id, op: z.literal('proc_signal'), pid, signal: z.enum(PROCESS_SIGNALS) });

// ---- what the agent answers (untrusted: bounded) -------------------------------------------

const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
export const ProcessInfo = z.object({
  pid,
  cmd: z.string().max(1024 * 1024),
  cwd: z.string().max(4096),
  running: z.boolean(),
  exit_code: z.number().int().min(-(2 ** 31)).max(2 ** 31).nullable(),
  /** Epoch seconds. */
  started_at: z.number().finite(),
  ended_at: z.number().finite().nullable(),
  /** Offset of the oldest character still kept, and just past the newest. */
  log_start: count,
  log_end: count,
  /** On a pseudo-terminal. */
  tty: z.boolean().optional(),
});
export type ProcessInfo = z.infer<typeof ProcessInfo>;

export const ProcessChunk = z.object({ stream: z.enum(['stdout', 'stderr']), offset: count, data: z.string().max(MAX_PROCESS_READ_CHARS) });
export type ProcessChunk = z.infer<typeof ProcessChunk>;

export const ProcessReplySchemas = {
  proc_start: z.object({ process: ProcessInfo }),
  proc_list: z.object({ processes: z.array(ProcessInfo).max(10_000) }),
  proc_read: z.object({
    chunks: z.array(ProcessChunk).max(10_000),
    /** Where the next read starts. */
    next: count,
    /** Characters between the requested offset and the log's start that were dropped. */
    lost: count,
    process: ProcessInfo,
    /** The process has ended and everything it wrote up to `next` has been read. */
    eof: z.boolean(),
  }),
  proc_write: z.object({}),
  proc_signal: z.object({ delivered: z.boolean() }),
  proc_resize: z.object({}),
};

// ---- REST ----------------------------------------------------------------------------------

/** `POST /v1/sandboxes/:id/processes` */
export const StartProcessBody = z.object({
  cmd,
  cwd: cwd.optional(),
  env: env.optional(),
  /** Characters of output kept (the oldest dropped past it). */
  log_chars: z.number().int().min(1024).max(MAX_PROCESS_LOG_CHARS).optional(),
  /** Run it on a pseudo-terminal of this size (an interactive shell; see also the PTY WebSocket). */
  pty: TerminalSize.optional(),
}).strict();
export type StartProcessBody = z.infer<typeof StartProcessBody>;

/** `POST /v1/sandboxes/:id/processes/:pid/stdin` */
export const ProcessStdinBody = z.object({ data: z.string().max(1024 * 1024).optional(), eof: z.boolean().optional() }).strict();
export type ProcessStdinBody = z.infer<typeof ProcessStdinBody>;

/** `POST /v1/sandboxes/:id/processes/:pid/signal` */
export const ProcessSignalBody = z.object({ signal: z.enum(PROCESS_SIGNALS).optional() }).strict();
export type ProcessSignalBody = z.infer<typeof ProcessSignalBody>;

/**
 * One line of `GET /v1/sandboxes/:id/processes/:pid/output` (NDJSON): output with its offset, a
 * `lost` note when the log no longer holds what was asked for, and `exit` once the process has
 * ended and all its output was sent.
 */
export type ProcessOutputEvent =
  | { type: 'stdout' | 'stderr'; data: string; offset: number }
  | { type: 'lost'; data: number; offset: number }
  | { type: 'exit'; data: number; offset: number };
