/**
 * A sandbox's identity and life cycle as the API shows them: its id's form and its states. Free of
 * runtime dependencies so the SDK, the dashboard bundle and the CLI can import it as is; the Python
 * SDK reads the same values from the generated protocol JSON.
 */

/** The form of a sandbox id, unanchored: for building other patterns (URL paths, environments). */
export const SANDBOX_ID_SOURCE = 'sbx_[0-9a-f]{32}';

/** A whole sandbox id: `sbx_` followed by 32 lowercase hex digits. */
export const SANDBOX_ID_PATTERN = new RegExp(`^${SANDBOX_ID_SOURCE}$`);

/** Whether `value` is a well-formed sandbox id. */
export function isSandboxId(value: unknown): value is string {
  return typeof value === 'string' && SANDBOX_ID_PATTERN.test(value);
}

/**
 * Every state of a sandbox: `starting`, `ready` (idle), `running` (an exec in flight), `stopped`
 * (destroyed), `error` (crashed), `merged` (retired by a merge), `frozen`, `lost` (the server was
 * killed while it ran, and after the restart its agent no longer answered, so everything it left was
 * cleaned up).
 */
export const SANDBOX_STATES = ['starting', 'ready', 'running', 'stopped', 'error', 'merged', 'frozen', 'lost'] as const;
export type SandboxState = (typeof SANDBOX_STATES)[number];

/** The states a sandbox never leaves: it is over, and only its record remains. */
export const ENDED_SANDBOX_STATES = ['stopped', 'error', 'merged', 'lost'] as const satisfies readonly SandboxState[];
export type EndedSandboxState = (typeof ENDED_SANDBOX_STATES)[number];

/** Whether a sandbox in `state` is over (stopped, crashed, merged away or lost). */
export function isEndedState(state: string): state is EndedSandboxState {
  return (ENDED_SANDBOX_STATES as readonly string[]).includes(state);
}

/** Whether `value` names a sandbox state. */
export function isSandboxState(value: unknown): value is SandboxState {
  return typeof value === 'string' && (SANDBOX_STATES as readonly string[]).includes(value);
}

/** Checkpoint ids: `ckpt_` and 24 hex digits. */
export const CHECKPOINT_ID_PATTERN = /^ckpt_[0-9a-f]{24}$/;
