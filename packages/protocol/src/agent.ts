/**
 * The server <-> in-sandbox agent channel: JSON lines over a stream socket (fd 3 of the agent).
 * This file is the protocol's single definition; `docs/protocol.md` explains it and the Python
 * agent (`agent/podflare_agent.py`) implements it. Bump AGENT_PROTOCOL_VERSION on any change that
 * an old agent would misread.
 *
 * Every request carries an integer `id` chosen by the server; every message about that request
 * carries the same `id`. Requests that stream (exec) answer with `type` events ending in `exit`;
 * all others answer with exactly one `{id, ok, ...}`.
 */
import { z } from 'zod';
import {
  ProcListRequest, ProcReadRequest, ProcResizeRequest, ProcSignalRequest, ProcStartRequest, ProcWriteRequest, ProcessReplySchemas,
} from './processes.js';

export const AGENT_PROTOCOL_VERSION = 2;
/**
 * The protocol's minor version: bumped for additions an older agent is never asked for (a new
 * optional field, a new op the server only uses when the agent's hello allows it). A server adopts
 * the sandboxes an earlier server left running when their agent's major version is its own
 * (agentProtocolCompatible); the minor version does not matter for that.
 */
export const AGENT_PROTOCOL_MINOR = 1;

/** This build's agent protocol as "major.minor" (what a sandbox's holder record keeps). */
export const AGENT_PROTOCOL = `${AGENT_PROTOCOL_VERSION}.${AGENT_PROTOCOL_MINOR}`;

/** Whether a sandbox whose agent speaks `recorded` ("major.minor") can be driven by this build. */
export function agentProtocolCompatible(recorded: string): boolean {
  return recorded.split('.')[0] === String(AGENT_PROTOCOL_VERSION);
}

/** File contents travel base64-encoded, in chunks of at most this many raw bytes. */
export const FILE_CHUNK_BYTES = 1024 * 1024;

const id = z.number().int().nonnegative();
const path = z.string().min(1).max(4096);

export const ExecRequest = z.object({
  id,
  op: z.literal('exec'),
  language: z.enum(['python', 'bash', 'javascript']),
  code: z.string(),
  /** Interrupt after this long; kill and restart the interpreter if it does not yield. */
  timeout_ms: z.number().int().positive().optional(),
  env: z.record(z.string(), z.string()).optional(),
  cwd: z.string().optional(),
});

export const InterruptRequest = z.object({ id, op: z.literal('interrupt') });
export const PingRequest = z.object({ id, op: z.literal('ping') });
export const UploadBeginRequest = z.object({ id, op: z.literal('upload_begin'), path, mode: z.number().int().optional() });
export const UploadChunkRequest = z.object({ id, op: z.literal('upload_chunk'), handle: z.string(), data: z.string() });
export const UploadEndRequest = z.object({ id, op: z.literal('upload_end'), handle: z.string(), abort: z.boolean().optional() });
export const FileReadRequest = z.object({ id, op: z.literal('file_read'), path, offset: z.number().int().nonnegative(), length: z.number().int().positive() });
export const StatRequest = z.object({ id, op: z.literal('stat'), path });
export const ListRequest = z.object({ id, op: z.literal('list'), path });
export const RemoveRequest = z.object({ id, op: z.literal('remove'), path, recursive: z.boolean().optional() });
export const MkdirRequest = z.object({ id, op: z.literal('mkdir'), path, parents: z.boolean().optional() });
/**
 * Fork the idle interpreter once per child. Each child switches its root to `root` (a mount the
 * server grafted into this sandbox for the moment of the fork), connects to /.pf/agent.sock in
 * its new root and says hello there. Answer: the children's pids as seen from this sandbox.
 */
export const ForkRequest = z.object({
  id,
  op: z.literal('fork'),
  children: z.array(z.object({ id: z.string(), root: z.string(), hostname: z.string() })).min(1).max(32),
});
/**
 * After a microVM clone resumes from a snapshot (VM runtime): set the clock, mix fresh entropy
 * into the kernel's RNG and reseed the interpreter's RNGs, take the sandbox's hostname and id.
 */
export const RestoreRequest = z.object({
  id,
  op: z.literal('restore'),
  time_ns: z.number().int().nonnegative(),
  /** Random bytes, base64. */
  entropy: z.string(),
  hostname: z.string(),
  sandbox_id: z.string(),
});
/**
 * A VM that was paused (a fork's parent, while its memory was saved) resumes with its clock where
 * the pause began: set it. Nothing else changes (its RNGs are its own: they stay as they were).
 */
export const SetTimeRequest = z.object({ id, op: z.literal('set_time'), time_ns: z.number().int().nonnegative() });
/**
 * Lists the root filesystem under `paths` (default `/`; other mounts skipped) into the file `out`
 * (on a tmpfs): one JSON array per line, `[path, type "f"|"d"|"l"|"o", size, mode, mtime_ns,
 * link target|null]`. The VM runtime's diff compares two of these.
 */
export const ManifestRequest = z.object({ id, op: z.literal('manifest'), paths: z.array(path).optional(), out: path });
/** A snapshot of the interpreter's user variables (for diff with vars=1). */
export const VarsRequest = z.object({ id, op: z.literal('vars') });

/**
 * Checkpoints held inside the sandbox (since minor 1; agent/podflare_checkpoint.py): a frozen fork
 * of the idle interpreter, named by the server's `ref`. A restore ends the live state, switches the
 * sandbox's root to `root` (an overlay of the checkpoint's files the server mounted there) and
 * makes the checkpoint the interpreter; with `keep`, a copy of it stays the checkpoint.
 * `checkpoint_drop` with `ref: null` drops every checkpoint the agent holds.
 */
const ref = z.string().min(1).max(64);
export const CheckpointRequest = z.object({ id, op: z.literal('checkpoint'), ref });
export const CheckpointDropRequest = z.object({ id, op: z.literal('checkpoint_drop'), ref: ref.nullable() });
export const CheckpointRestoreRequest = z.object({ id, op: z.literal('checkpoint_restore'), ref, root: path, keep: z.boolean() });
export const CheckpointVarsRequest = z.object({ id, op: z.literal('checkpoint_vars'), ref });

export const AgentRequest = z.discriminatedUnion('op', [
  ExecRequest, InterruptRequest, PingRequest, UploadBeginRequest, UploadChunkRequest, UploadEndRequest,
  FileReadRequest, StatRequest, ListRequest, RemoveRequest, MkdirRequest, ForkRequest, VarsRequest, RestoreRequest, SetTimeRequest, ManifestRequest,
  ProcStartRequest, ProcListRequest, ProcReadRequest, ProcWriteRequest, ProcSignalRequest, ProcResizeRequest,
  CheckpointRequest, CheckpointDropRequest, CheckpointRestoreRequest, CheckpointVarsRequest,
]);
export type AgentRequest = z.infer<typeof AgentRequest>;
export type AgentOp = AgentRequest['op'];
/** A request before the channel assigns its id. */
export type AgentRequestBody<Op extends AgentOp = AgentOp> = AgentRequest extends infer R
  ? R extends { op: Op } ? Omit<R, 'id'> : never
  : never;

// ---- what the agent sends ----------------------------------------------------------------
// The agent is inside the sandbox and so untrusted: everything it says is validated like a
// request, with bounds. A number that reaches an HTTP header or an allocation is a non-negative
// safe integer; a string the server keeps or passes on has a maximum length.

/** A size or count from the agent: an integer in [0, 2^53). */
const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
/** A pid from the agent (pids are at most 2^22 on Linux). */
const pid = z.number().int().min(1).max(4_194_304);
/** A file name, a path, a type name: what the server echoes back to the sandbox's own caller. */
const shortText = (max: number) => z.string().max(max);
const agentPath = shortText(4096);
/** Base64 of at most `bytes` bytes. */
const base64Of = (bytes: number) => z.string().max(Math.ceil(bytes / 3) * 4).regex(/^[A-Za-z0-9+/]*={0,2}$/, 'must be base64');

export const FileStat = z.object({
  name: shortText(1024),
  path: agentPath,
  type: z.enum(['file', 'dir', 'symlink', 'other']),
  size: count,
  mode: z.number().int().min(0).max(0o7777),
  mtime: z.number().finite(),
});
export type FileStat = z.infer<typeof FileStat>;

export const AgentErrorInfo = z.object({
  /** One of the codes in errors.ts (not_found, bad_request, conflict, internal, ...). */
  code: shortText(64),
  message: shortText(64 * 1024),
});

const MimeBundle = z.record(z.string(), z.unknown());

export const HelloMessage = z.object({
  type: z.literal('hello'),
  version: z.number().int(),
  pid,
  hostname: shortText(255),
});
export const OutputMessage = z.object({ id, type: z.enum(['stdout', 'stderr']), data: z.string() });
export const ResultMessage = z.object({ id, type: z.literal('result'), data: MimeBundle, is_main_result: z.boolean() });
export const ErrorMessage = z.object({
  id,
  type: z.literal('error'),
  data: z.object({ name: z.string(), value: z.string(), traceback: z.string() }),
});
export const ExitMessage = z.object({
  id,
  type: z.literal('exit'),
  code: z.number().int().min(-(2 ** 31)).max(2 ** 31),
  execution_count: count.nullable().optional(),
  state_lost: z.boolean().optional(),
  /** Set by the server (never the agent): an atomic exec failed and its effects were undone. */
  rolled_back: z.boolean().optional(),
});
/** The envelope of a success: its fields are checked against the op's reply schema (AgentReplySchemas). */
export const OkResponse = z.object({ id, ok: z.literal(true) }).passthrough();
/** `id` is missing when the agent could not read one from the request it refuses. */
export const FailResponse = z.object({ id: id.optional(), ok: z.literal(false), error: AgentErrorInfo });

export const AgentMessage = z.union([
  HelloMessage, OutputMessage, ResultMessage, ErrorMessage, ExitMessage, OkResponse, FailResponse,
]);
export type AgentMessage = z.infer<typeof AgentMessage>;
export type ExecStreamMessage =
  | z.infer<typeof OutputMessage>
  | z.infer<typeof ResultMessage>
  | z.infer<typeof ErrorMessage>
  | z.infer<typeof ExitMessage>;
export type OkResponse = z.infer<typeof OkResponse>;

const none = z.object({});
const VarInfoSchema = z.object({ type: shortText(1024), repr: shortText(1024), fp: shortText(256) });

/**
 * What each non-streaming op answers with, beyond `{id, ok: true}`: one schema per op. A reply that
 * does not match is a protocol violation (it ends that request with `agent_protocol`, 502). Unknown
 * fields are dropped. `file_read` data is checked against the length asked for by the server.
 */
export const AgentReplySchemas = {
  ping: z.object({ pid, hostname: shortText(255) }),
  interrupt: z.object({ interrupted: z.boolean() }),
  upload_begin: z.object({ handle: z.string().min(1).max(64) }),
  upload_chunk: none,
  upload_end: z.object({ size: count }),
  file_read: z.object({ data: base64Of(FILE_CHUNK_BYTES), eof: z.boolean(), size: count }),
  stat: z.object({ stat: FileStat }),
  list: z.object({ entries: z.array(FileStat).max(100_000) }),
  remove: none,
  mkdir: none,
  /** The children's pids as seen in the parent's pid namespace (the server proves they are its fork's). */
  fork: z.object({ pids: z.array(pid).max(32), error: shortText(64 * 1024).nullable().optional() }),
  vars: z.object({ vars: z.record(shortText(1024), VarInfoSchema) }),
  restore: none,
  set_time: none,
  manifest: z.object({ entries: count }),
  checkpoint: none,
  checkpoint_drop: none,
  /** `kept`: a copy of the checkpoint stays (asked with `keep`, and made). */
  checkpoint_restore: z.object({ kept: z.boolean() }),
  checkpoint_vars: z.object({ vars: z.record(shortText(1024), VarInfoSchema) }),
  ...ProcessReplySchemas,
} satisfies { [Op in Exclude<AgentOp, 'exec'>]: z.ZodType };

/** What each non-streaming op answers with, beyond `{id, ok: true}`. */
export type AgentReplies = { [Op in keyof typeof AgentReplySchemas]: z.infer<(typeof AgentReplySchemas)[Op]> };

export type VarInfo = z.infer<typeof VarInfoSchema>;
