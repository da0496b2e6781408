/**
 * The messages of the server's root host helpers, defined once (zod; types derived from the
 * schemas): the host helper (host/podflare_hostd.py) and the process spawner
 * (host/podflare_spawner.py). Both are the server's own code, so a reply that fails its schema is a
 * helper bug: the call fails with a HelperReplyError naming the op and the field, and is logged.
 *
 * Every request is `{...body, id}` on one line; every reply `{id, ok: true, ...result}` or
 * `{id, ok: false, error}` (the envelope is jsonl/rpc.ts's and helper-process.ts's).
 */
import { z } from 'zod';
import { HelperError } from './helper-process.js';

const absPath = z.string().min(1);
const pid = z.number().int().positive();
const uid = z.number().int().nonnegative();
const bind = z.object({ source: absPath, target: z.string().min(1) });
const overlayLayers = { lowers: z.array(absPath), upper: absPath, work: absPath, binds: z.array(bind).optional() };
const limitBytes = z.number().nonnegative();
/** The reply of an op that returns nothing but its success. */
const Done = z.object({});

// ---- host helper (podflare_hostd.py) ----------------------------------------------------------

/** Every host helper request, by op. */
export const HostdRequestSchemas = {
  idmap: z.object({ op: z.literal('idmap'), base: uid, count: z.number().int().positive(), layers: z.array(absPath) }),
  overlay: z.object({ op: z.literal('overlay'), pid: pid.nullable(), target: absPath, ...overlayLayers }),
  overlay_prepare: z.object({ op: z.literal('overlay_prepare'), ...overlayLayers }),
  overlay_attach: z.object({ op: z.literal('overlay_attach'), handle: z.number().int().positive(), pid, target: absPath }),
  overlay_discard: z.object({ op: z.literal('overlay_discard'), handle: z.number().int().positive() }),
  subvolume: z.object({ op: z.literal('subvolume'), path: absPath, limit_bytes: limitBytes }),
  disk_limit: z.object({ op: z.literal('disk_limit'), path: absPath, limit_bytes: limitBytes }),
  squash_layers: z.object({ op: z.literal('squash_layers'), sources: z.array(absPath).min(1), target: absPath }),
  unmount: z.object({ op: z.literal('unmount'), target: absPath }),
  tmpfs: z.object({ op: z.literal('tmpfs'), pid, target: absPath, uid: uid.optional(), gid: uid.optional() }),
  diff: z.object({
    op: z.literal('diff'), a: z.array(absPath), b: z.array(absPath),
    paths: z.array(z.string()).optional(), content: z.boolean().optional(), max_content_bytes: z.number().int().positive().optional(),
  }),
  remove_tree: z.object({ op: z.literal('remove_tree'), path: absPath }),
  template_layer: z.object({
    op: z.literal('template_layer'), source: absPath, target: absPath, base: uid, count: z.number().int().positive(),
    max_bytes: limitBytes, max_entries: z.number().int().positive(), max_depth: z.number().int().positive(),
  }),
} as const;

export type HostdOp = keyof typeof HostdRequestSchemas;
export type HostdRequest<O extends HostdOp = HostdOp> = z.infer<(typeof HostdRequestSchemas)[O]>;

/** What `diff` answers: bounded lists of changed paths, text diffs when asked for. */
export const HostdDiffReply = z.object({
  added: z.array(z.string()),
  removed: z.array(z.string()),
  modified: z.array(z.string()),
  content: z.record(z.string(), z.string()).optional(),
  binary: z.array(z.string()).optional(),
  too_large: z.array(z.string()).optional(),
  truncated: z.literal(true).optional(),
});

/** Every host helper reply (its result fields, the envelope stripped), by op. */
export const HostdReplySchemas = {
  idmap: Done,
  overlay: Done,
  overlay_prepare: z.object({ handle: z.number().int().positive() }),
  overlay_attach: Done,
  overlay_discard: Done,
  subvolume: Done,
  disk_limit: Done,
  squash_layers: Done,
  unmount: Done,
  tmpfs: Done,
  diff: HostdDiffReply,
  remove_tree: Done,
  template_layer: z.object({ bytes: z.number().nonnegative() }),
} as const satisfies Record<HostdOp, z.ZodType>;

export type HostdReply<O extends HostdOp = HostdOp> = z.infer<(typeof HostdReplySchemas)[O]>;

// ---- spawner (podflare_spawner.py) ------------------------------------------------------------

/** A memfd's name: what /proc/<pid>/maps shows of it (`/memfd:<name>`), so a plain file name. */
const memfdName = z.string().regex(/^[A-Za-z0-9._-]{1,200}$/);

export const SpawnerRequestSchemas = {
  spawn: z.object({
    op: z.literal('spawn'), argv: z.array(z.string()).min(1),
    ready_fd: z.number().int().nonnegative().optional(), exit_fd: z.number().int().nonnegative().optional(),
    stream_stderr: z.boolean(), batch: z.boolean(),
    /** A session of its own, and left running when the spawner ends (it outlives the server). */
    detach: z.boolean().optional(),
    /** Memfds of the spawner's the child gets: [its fd (above 2), the memfd's name]. */
    fds: z.array(z.tuple([z.number().int().min(3).max(1023), memfdName])).max(8),
  }),
  kill: z.object({ op: z.literal('kill'), pid }),
  memfd: z.object({ op: z.literal('memfd'), name: memfdName, size: z.number().int().positive() }),
  seal: z.object({ op: z.literal('seal'), name: memfdName }),
  /** A unix socket listening at an absolute path, held (and passed to children) like a memfd. */
  listen: z.object({ op: z.literal('listen'), name: memfdName, path: z.string().regex(/^\//).max(107) }),
  close: z.object({ op: z.literal('close'), name: memfdName }),
} as const;

export type SpawnerOp = keyof typeof SpawnerRequestSchemas;
export type SpawnerRequest<O extends SpawnerOp = SpawnerOp> = z.infer<(typeof SpawnerRequestSchemas)[O]>;

export const SpawnerReplySchemas = {
  spawn: z.object({ pid }),
  kill: Done,
  memfd: z.object({ fd: z.number().int().nonnegative(), pid }),
  seal: Done,
  listen: Done,
  close: Done,
} as const satisfies Record<SpawnerOp, z.ZodType>;

export type SpawnerReply<O extends SpawnerOp = SpawnerOp> = z.infer<(typeof SpawnerReplySchemas)[O]>;

/** What the spawner says about a child it started (lines without an id). */
export const SpawnerEvent = z.discriminatedUnion('ev', [
  z.object({ ev: z.literal('ready'), pid }),
  z.object({ ev: z.literal('stderr'), pid, data: z.string() }),
  z.object({ ev: z.literal('exit'), pid, code: z.number().int().nullable(), signal: z.string().nullable(), stderr: z.string() }),
]);
export type SpawnerEvent = z.infer<typeof SpawnerEvent>;

// ---- checking ----------------------------------------------------------------------------------

/** A helper answered `ok` with a reply its op's schema refuses: a bug in that helper. */
export class HelperReplyError extends HelperError {
  override name = 'HelperReplyError';
  constructor(helper: string, readonly op: string, readonly problem: string) {
    super(`${helper}: ${op} reply does not match its schema (a helper bug): ${problem}`);
  }
}

/** "field: problem" of the first issue. */
export function describeIssue(error: z.ZodError): string {
  const issue = error.issues[0];
  if (!issue) return 'invalid';
  const field = issue.path.map(String).join('.');
  return field ? `${field}: ${issue.message}` : issue.message;
}

/** The reply's result fields (envelope stripped), checked against `schema`; throws HelperReplyError. */
export function parseHelperReply<S extends z.ZodType>(helper: string, op: string, schema: S, reply: Record<string, unknown>): z.infer<S> {
  const { id: _id, ok: _ok, ...result } = reply;
  const parsed = schema.safeParse(result);
  if (!parsed.success) throw new HelperReplyError(helper, op, describeIssue(parsed.error));
  return parsed.data;
}
