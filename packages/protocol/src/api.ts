/**
 * REST request bodies, validated by the server with these schemas. The messages zod produces name
 * the offending field, which the server passes on in its 400 answers.
 */
import { z } from 'zod';
import { MAX_EGRESS_RULES, parseEgressRule, type EgressSetting } from './egress.js';
import type { SandboxState } from './sandbox.js';

export const MAX_CODE_BYTES = 4 * 1024 * 1024;
export const MAX_TIMEOUT_MS = 24 * 60 * 60 * 1000;
export const MAX_METADATA_ENTRIES = 64;
/** Most checkpoints a sandbox keeps in its history (create's `history`), and most it may hold by name. */
export const MAX_HISTORY = 32;
export const MAX_CHECKPOINTS = 32;
export const MAX_ENV_ENTRIES = 1024;

const name = z.string().min(1).max(64).regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]*$/, 'must be letters, digits, dot, dash or underscore');

/** ours: resource limits of one sandbox, within the server's maximums (checked by the server). */
export const LimitsBody = z.object({
  cpus: z.number().positive().max(1024).optional(),
  memory_mb: z.number().int().min(64).max(16 * 1024 * 1024).optional(),
  disk_mb: z.number().int().min(64).max(1024 * 1024 * 1024).optional(),
  processes: z.number().int().min(16).max(4 * 1024 * 1024).optional(),
}).strict();
export type LimitsBody = z.infer<typeof LimitsBody>;

/** A sandbox's limits as the API shows them. */
export interface SandboxLimitsInfo { cpus: number; memory_mb: number; disk_mb: number; processes: number }

export const CreateSandboxBody = z.object({
  template: name.optional(),
  egress: z.union([
    z.boolean(),
    z.object({
      allow: z.array(z.string().max(260).superRefine((rule, ctx) => {
        const parsed = parseEgressRule(rule);
        if (typeof parsed === 'string') ctx.addIssue({ code: 'custom', message: parsed });
      })).max(MAX_EGRESS_RULES),
    }).strict(),
  ], { error: 'must be true, false or {"allow": [rules]}' }).optional(),
  persistent: z.boolean().optional(),
  idle_timeout_seconds: z.number().int().min(1).max(7 * 24 * 3600).optional(),
  /** ours: a hard cap on the sandbox's whole life. */
  max_lifetime_seconds: z.number().int().min(1).max(30 * 24 * 3600).optional(),
  /** A runtime this server registers (its names: GET /v1/capacity `runtimes`), or `auto`; the server checks it. */
  runtime: z.string().optional(),
  limits: LimitsBody.optional(),
  metadata: z.record(z.string().max(64), z.string().max(1024))
    .refine((m) => Object.keys(m).length <= MAX_METADATA_ENTRIES, `at most ${MAX_METADATA_ENTRIES} entries`).optional(),
  /** ours: checkpoint before each exec and keep the last `history` (0: off); see rewind. */
  history: z.number().int().min(0).max(MAX_HISTORY).optional(),
}).strict();
export type CreateSandboxBody = z.infer<typeof CreateSandboxBody>;

const envName = z.string().min(1).max(256).regex(/^[^=\0]+$/, 'must not contain = or NUL');

export const ExecBody = z.object({
  code: z.string().max(MAX_CODE_BYTES),
  /** `javascript` (ours): a persistent Node REPL per sandbox (agent/podflare_js.py). */
  language: z.enum(['python', 'bash', 'javascript']).optional(),
  /** ours: interrupt after this many ms (then restart the interpreter if it does not yield). */
  timeout_ms: z.number().int().min(1).max(MAX_TIMEOUT_MS).optional(),
  env: z.record(envName, z.string().max(128 * 1024))
    .refine((e) => Object.keys(e).length <= MAX_ENV_ENTRIES, `at most ${MAX_ENV_ENTRIES} variables`).optional(),
  cwd: z.string().min(1).max(4096).regex(/^[^\0]+$/, 'must not contain NUL').optional(),
  /** ours: undo everything the call did if it fails (exit code not 0); the exit says `rolled_back`. */
  atomic: z.boolean().optional(),
}).strict();
export type ExecBody = z.infer<typeof ExecBody>;


export const CheckpointBody = z.object({ name: z.string().min(1).max(128).regex(/^[^\0]+$/, 'must not contain NUL').optional() }).strict();
export type CheckpointBody = z.infer<typeof CheckpointBody>;
export const RewindBody = z.object({ steps: z.number().int().min(1).max(MAX_HISTORY).optional() }).strict();
export type RewindBody = z.infer<typeof RewindBody>;

/** A checkpoint as the API shows it. */
export interface CheckpointInfo {
  id: string;
  /** The sandbox it belongs to (it can only be restored into that one). */
  sandbox: string;
  name: string | null;
  /** `manual`: made by checkpoint(); `history`: made before an exec (create's `history`). */
  kind: 'manual' | 'history';
  created_at: string;
  /** The history step it was taken before (the exec's code, first 200 characters), for history checkpoints. */
  before_code: string | null;
}

export const ForkBody = z.object({ n: z.number().int().min(1).max(32).optional() }).strict();
export type ForkBody = z.infer<typeof ForkBody>;

/** The public view of a sandbox (GET /v1/sandboxes/:id and list entries). */
export interface SandboxInfo {
  id: string;
  state: SandboxState;
  template: string;
  /** The runtime that runs it (a name the server registers). */
  runtime: string;
  egress: EgressSetting;
  persistent: boolean;
  parent: string | null;
  children: string[];
  created_at: string;
  last_active_at: string;
  idle_timeout_seconds: number;
  limits: SandboxLimitsInfo;
  metadata: Record<string, string>;
  /** Why it ended (deleted, idle timeout, crash, its agent's channel broke, ...); null while live. */
  end_reason: string | null;
}

export interface CreateSandboxResponse { id: string; state: 'ready' }
export interface ForkResponse { children: string[] }

/** The first message of a ZodError, as "field: problem", for a 400 answer. */
export function describeZodError(error: z.ZodError): { message: string; field?: string } {
  const issue = error.issues[0];
  if (!issue) return { message: 'invalid request body' };
  const field = issue.path.map(String).join('.');
  if (issue.code === 'unrecognized_keys') {
    const keys = (issue as { keys?: string[] }).keys ?? [];
    return { message: `unknown field${keys.length > 1 ? 's' : ''}: ${keys.join(', ')}`, field: keys[0] };
  }
  if (issue.code === 'invalid_type' && (issue as { input?: unknown }).input === undefined) {
    return { message: `${field}: required`, field };
  }
  return { message: field ? `${field}: ${issue.message}` : issue.message, field: field || undefined };
}
