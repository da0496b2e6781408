/**
 * OpenAI Agents SDK adapter (`podflare/openai-agents`): function tools that run the model's code in
 * a Podflare sandbox. Needs the optional peer dependencies `@openai/agents` (≥ 0.20) and `zod`.
 *
 * - {@link podflareCodeInterpreter}: `run_code({code, language})` in one persistent sandbox, so
 *   variables, imports and files carry over between the agent's turns (the Python twin is
 *   `podflare.integrations.openai_agents.podflare_code_interpreter`).
 * - {@link podflareForkTool}: `run_forked({snippets, language})` forks that sandbox into one copy per
 *   snippet, runs them in parallel and reports every branch; a merge policy may keep one branch.
 *
 * Without a `sandbox` option a tool creates its sandbox on its first call (not at construction, so
 * building an Agent costs nothing) and keeps it; the tool object itself is the handle to it:
 * `tool.sandbox()`, `tool.currentSandbox`, `tool.close()`, `await using`.
 *
 * - {@link podflareProcessTools}: `start_process`, `read_process_output`, `expose_port`,
 *   `kill_process` for background processes (a dev server, a watcher) in that sandbox.
 *
 * @example
 * ```ts
 * import { Agent, run } from '@openai/agents';
 * import { podflareCodeInterpreter } from 'podflare/openai-agents';
 *
 * await using runCode = podflareCodeInterpreter();   // PODFLARE_HOST / PODFLARE_API_KEY
 * const agent = new Agent({ name: 'analyst', instructions: 'Use run_code to compute.', tools: [runCode] });
 * const result = await run(agent, 'What is the 50th Fibonacci number?');
 * console.log(result.finalOutput);
 * ```
 * @packageDocumentation
 */
import { ModelBehaviorError, tool } from '@openai/agents';
import type { FunctionTool, ToolOutputImage, ToolOutputText } from '@openai/agents';
import { z } from 'zod';
import { NotFoundError, PodflareError, SandboxGoneError } from '../errors.js';
import type { Execution } from '../execution.js';
import { Sandbox } from '../sandbox.js';
import type { Language, SandboxCreateOptions } from '../types.js';
import { DEFAULT_MAX_OUTPUT_CHARS, formatExecution } from './format.js';
import type { ExecutionImage } from './format.js';
import * as processes from './process-tools.js';

/** The code tool's name as the model sees it (the same as the Python twin's). */
export const CODE_TOOL_NAME = 'run_code';
/** The fork tool's name as the model sees it. */
export const FORK_TOOL_NAME = 'run_forked';
/** The server's bound on `fork(n)`. */
const MAX_FORK = 32;

const CODE_DESCRIPTION =
  'Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the last ' +
  'expression and any error. Python (default) keeps variables, imports and files between calls, ' +
  'like a notebook; pandas, numpy and matplotlib are installed. language="bash" runs a shell ' +
  'command. Files live under /root.';

// `nullish` rather than `optional`: OpenAI's strict mode requires every property to be listed as
// required, so the schema sent says `"language": {"anyOf": [enum, null]}` and a strict model sends
// null for "the default", while a missing key (a non-strict model) still parses.
const languageParameter = z
  .enum(['python', 'bash'])
  .nullish()
  .describe('python (the default, persistent interpreter) or bash (a fresh shell per call).');

/** The code tool's input schema: `{code, language}`. */
export const codeToolParameters = z.object({
  code: z.string().describe('The code to run.'),
  language: languageParameter,
});

/** The fork tool's input schema: `{snippets, language}`. */
export const forkToolParameters = z.object({
  snippets: z
    .array(z.string())
    .describe('One snippet per branch; each runs in its own copy of the sandbox, all in parallel.'),
  language: languageParameter,
});

/** What the tools return to the model: the output as text, then the PNG/JPEG images (when enabled). */
export type PodflareToolOutput = string | Array<ToolOutputText | ToolOutputImage>;

/** A Podflare function tool, with the handle to its sandbox. */
export type PodflareCodeInterpreterTool = FunctionTool<unknown, typeof codeToolParameters, PodflareToolOutput> & PodflareSandboxHandle;
/** The fork tool, with the handle to its (parent) sandbox. */
export type PodflareForkTool = FunctionTool<unknown, typeof forkToolParameters, PodflareToolOutput> & PodflareSandboxHandle;

/**
 * The sandbox behind a Podflare tool, as the tool object exposes it. Tools that share a sandbox
 * (one passed as the other's `sandbox` option) share this lifecycle: closing either closes it.
 */
export interface PodflareSandboxHandle {
  /**
   * The sandbox the tool runs code in, created now when it does not exist yet (e.g. to upload
   * files before the run).
   */
  sandbox(): Promise<Sandbox>;
  /** The sandbox in use, or `undefined` while none was created (before the first call, after {@link close}). */
  readonly currentSandbox: Sandbox | undefined;
  /**
   * Destroys the sandbox the tool created; a sandbox passed in as `sandbox` is left to its owner.
   * A later call creates a new sandbox (without the old state). Idempotent.
   */
  close(): Promise<void>;
  /** Calls {@link close}, for `await using tool = podflareCodeInterpreter()`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** Options shared by both tools. The {@link SandboxCreateOptions} apply to a lazily created sandbox. */
export interface PodflareToolOptions extends SandboxCreateOptions {
  /**
   * Where code runs: a {@link Sandbox} you own (used as is, never closed by the tool), or another
   * Podflare tool, whose sandbox (lazily created or not) this tool then shares.
   * @default a sandbox created on the first call from the other options and kept for later calls
   */
  sandbox?: Sandbox | PodflareSandboxHandle;
  /**
   * The language of code the model sends without naming one.
   * @default 'python'
   */
  language?: Language;
  /** Bound on each run's time, in ms: past it the code is interrupted (exit code 124; state is kept). */
  timeoutMs?: number;
  /**
   * Code tool calls are atomic: code that raises (or bash that exits non-zero) is undone — variables
   * and files back to how they were before the call — and the model is told so.
   * @default false
   */
  atomic?: boolean;
  /**
   * The model sees at most this many characters of output per call (cut in the middle, keeping the
   * head and the tail); for the fork tool, per call shared among the branches.
   * @default 20000
   */
  maxOutputChars?: number;
  /**
   * Return PNG/JPEG results (matplotlib figures, `display(Image)`) to the model as images after the
   * text. The Responses API passes them on; Chat Completions models get the text only.
   * @default true
   */
  includeImages?: boolean;
  /** The tool's name for the model. */
  name?: string;
  /** The tool's description for the model. */
  description?: string;
}

/** Options of {@link podflareCodeInterpreter}. */
export type PodflareCodeInterpreterOptions = PodflareToolOptions;

/** One branch of a {@link podflareForkTool} call, as a custom merge policy sees it. */
export interface ForkBranch {
  /** The branch's position in the model's `snippets`. */
  index: number;
  /** The snippet it ran. */
  code: string;
  /** Its outcome, unless the call itself failed (then see {@link ForkBranch.error}). */
  execution?: Execution;
  /** The error of a run that could not complete (e.g. the branch's sandbox died). */
  error?: unknown;
}

/**
 * Which branch (if any) becomes the session sandbox's state after a fork call: `'none'` keeps the
 * session unchanged; `'first-success'` keeps the first branch, in snippet order, that exited with
 * code 0; a function returns the index to keep, or `undefined` for none.
 */
export type ForkMergePolicy = 'none' | 'first-success' | ((branches: ForkBranch[]) => number | undefined | Promise<number | undefined>);

/** Options of {@link podflareForkTool}. */
export interface PodflareForkToolOptions extends PodflareToolOptions {
  /**
   * The most snippets the model may send in one call (1–32, the server's fork bound).
   * @default 8
   */
  maxBranches?: number;
  /**
   * Whether a branch is merged back into the session sandbox (see {@link ForkMergePolicy}); the tool
   * description tells the model which policy applies.
   * @default 'none'
   */
  merge?: ForkMergePolicy;
}

/**
 * An OpenAI Agents SDK function tool, `run_code({code, language})`, that runs code in a Podflare
 * sandbox and returns its stdout, stderr, the last expression's value, the error's traceback and a
 * non-zero exit code as text (plus any images). The sandbox is created on the first call unless one
 * is given, and kept: Python state persists across the agent's turns and runs. The returned tool is
 * also the {@link PodflareSandboxHandle}: close it when done.
 *
 * A non-zero exit code or an exception is a normal result the model reads. A sandbox created by the
 * tool that has gone (idle timeout, destroyed elsewhere) is replaced once, transparently, with a note
 * that earlier state is lost; other Podflare failures reach the model as `Podflare error (code): …`.
 *
 * @example
 * ```ts
 * const runCode = podflareCodeInterpreter({ host: 'http://10.0.0.5:7070', timeoutMs: 60_000 });
 * const agent = new Agent({ name: 'analyst', tools: [runCode] });
 * try {
 *   await run(agent, 'Load /root/data.csv and plot column b');
 * } finally {
 *   await runCode.close();
 * }
 * ```
 */
export function podflareCodeInterpreter(options: PodflareCodeInterpreterOptions = {}): PodflareCodeInterpreterTool {
  const session = sessionFor(options);
  const defaultLanguage = options.language ?? 'python';
  const maxChars = options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS;
  const includeImages = options.includeImages ?? true;
  const functionTool = tool({
    name: options.name ?? CODE_TOOL_NAME,
    description: options.description ?? CODE_DESCRIPTION,
    parameters: codeToolParameters,
    strict: true,
    errorFunction: (_context, error) => toolErrorText(error, '{"code": string, "language": "python" | "bash" | null}'),
    async execute(input, _context, details): Promise<PodflareToolOutput> {
      const language = input.language ?? defaultLanguage;
      const run = (sandbox: Sandbox): Promise<Execution> =>
        sandbox.runCode(input.code, { language, timeoutMs: options.timeoutMs, signal: details?.signal, atomic: options.atomic });
      const { value: execution, note } = await session.withSandbox(run);
      const formatted = formatExecution(execution, { maxOutputChars: maxChars });
      return toolOutput(note ? `${formatted.text}\n${note}` : formatted.text, includeImages ? formatted.images : []);
    },
  });
  return withHandle(functionTool, session);
}

/**
 * An OpenAI Agents SDK function tool, `run_forked({snippets, language})`, for trying alternatives
 * side by side: it forks the session sandbox into one copy per snippet (each starts with the
 * session's variables and files as of the call), runs the snippets in parallel and returns every
 * branch's output. Then, per `merge`, one branch may become the session's new state
 * (`sandbox.mergeInto(branch)`); the other branches are destroyed. The session sandbox itself never
 * runs the snippets.
 *
 * Pass a {@link podflareCodeInterpreter} as `sandbox` so both tools work on the same sandbox.
 *
 * @example
 * ```ts
 * const runCode = podflareCodeInterpreter();
 * const tryAll = podflareForkTool({ sandbox: runCode, merge: 'first-success' });
 * const agent = new Agent({ name: 'explorer', tools: [runCode, tryAll] });
 * ```
 */
export function podflareForkTool(options: PodflareForkToolOptions = {}): PodflareForkTool {
  const session = sessionFor(options);
  const defaultLanguage = options.language ?? 'python';
  const maxChars = options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS;
  const maxBranches = options.maxBranches ?? 8;
  if (!Number.isInteger(maxBranches) || maxBranches < 1 || maxBranches > MAX_FORK) {
    throw new RangeError(`maxBranches must be an integer from 1 to ${MAX_FORK}, got ${String(maxBranches)}`);
  }
  const merge = options.merge ?? 'none';
  const includeImages = options.includeImages ?? true;
  const functionTool = tool({
    name: options.name ?? FORK_TOOL_NAME,
    description: options.description ?? forkDescription(merge, maxBranches),
    parameters: forkToolParameters,
    strict: true,
    errorFunction: (_context, error) => toolErrorText(error, '{"snippets": string[], "language": "python" | "bash" | null}'),
    async execute(input, _context, details): Promise<PodflareToolOutput> {
      const { snippets } = input;
      if (snippets.length < 1 || snippets.length > maxBranches) {
        return `invalid arguments: send 1 to ${maxBranches} snippets, got ${snippets.length}`;
      }
      const language = input.language ?? defaultLanguage;
      const perBranch = Math.max(200, Math.floor(maxChars / snippets.length));
      const { value: report, note } = await session.withSandbox(async (parent) => {
        const children = await parent.fork(snippets.length);
        try {
          const branches = await Promise.all(
            children.map(async (child, index): Promise<ForkBranch> => {
              const code = snippets[index]!;
              try {
                const execution = await child.runCode(code, { language, timeoutMs: options.timeoutMs, signal: details?.signal });
                return { index, code, execution };
              } catch (error) {
                return { index, code, error };
              }
            }),
          );
          const sections: string[] = [];
          const images: ExecutionImage[] = [];
          for (const branch of branches) {
            if (branch.execution) {
              const formatted = formatExecution(branch.execution, { maxOutputChars: perBranch });
              sections.push(`--- branch ${branch.index} (exit code ${branch.execution.exitCode}) ---\n${formatted.text}`);
              images.push(...formatted.images);
            } else {
              const reason = branch.error instanceof PodflareError ? `: ${toolErrorText(branch.error)}` : '';
              sections.push(`--- branch ${branch.index} ---\n[the branch could not run${reason}]`);
            }
          }
          const winner = await pickWinner(merge, branches);
          if (winner !== undefined) {
            await parent.mergeInto(children[winner]!);
            sections.push(`[kept branch ${winner}: its variables and files are now the sandbox's state; the other branches were discarded]`);
          } else {
            sections.push("[no branch kept: the sandbox's state is as before this call]");
          }
          if (images.length > 0) sections.push('[images are attached in branch order]');
          return { text: sections.join('\n'), images };
        } finally {
          // The merged winner's close() is a no-op; a failed close must not hide the report.
          await Promise.allSettled(children.map((c) => c.close()));
        }
      });
      return toolOutput(note ? `${report.text}\n${note}` : report.text, includeImages ? report.images : []);
    },
  });
  return withHandle(functionTool, session);
}

/** The background-process tools' names as the model sees them (the same as the MCP server's). */
export const PROCESS_TOOL_NAMES = {
  startProcess: 'start_process',
  readProcessOutput: 'read_process_output',
  exposePort: 'expose_port',
  killProcess: 'kill_process',
} as const;

const pidParameter = z.number().int().min(1).max(processes.MAX_PID).describe('The process id returned by start_process.');

/** `start_process`'s input schema. */
export const startProcessParameters = z.object({
  command: z.string().describe('The command line, run with bash -c, e.g. "python3 -m http.server 8000".'),
  cwd: z.string().nullish().describe('Working directory. Default: /root'),
});
/** `read_process_output`'s input schema. */
export const readProcessOutputParameters = z.object({
  pid: pidParameter,
  offset: z.number().int().min(0).nullish().describe('Where to start reading: the nextOffset of the previous read. Default: 0'),
});
/** `expose_port`'s input schema. */
export const exposePortParameters = z.object({
  port: z.number().int().min(1).max(65535).describe('The port the server listens on inside the sandbox (on 127.0.0.1 or 0.0.0.0).'),
  expires_in_seconds: z.number().int().min(1).max(processes.MAX_EXPOSE_SECONDS).nullish().describe('How long the URL works. Default: 3600'),
});
/** `kill_process`'s input schema. */
export const killProcessParameters = z.object({ pid: pidParameter });

/** The tools {@link podflareProcessTools} returns, each with the handle to their (shared) sandbox. */
export type PodflareProcessTools = [
  startProcess: FunctionTool<unknown, typeof startProcessParameters, string> & PodflareSandboxHandle,
  readProcessOutput: FunctionTool<unknown, typeof readProcessOutputParameters, string> & PodflareSandboxHandle,
  exposePort: FunctionTool<unknown, typeof exposePortParameters, string> & PodflareSandboxHandle,
  killProcess: FunctionTool<unknown, typeof killProcessParameters, string> & PodflareSandboxHandle,
];

/** Options of {@link podflareProcessTools}: the sandbox, its create options, `maxOutputChars` (per read). */
export type PodflareProcessToolsOptions = Omit<PodflareToolOptions, 'language' | 'timeoutMs' | 'atomic' | 'includeImages' | 'name' | 'description'>;

/**
 * OpenAI Agents SDK function tools for background processes: `start_process` (returns its pid at
 * once), `read_process_output` (from an offset, so polling repeats nothing; says whether it still
 * runs and its exit code; cut in the middle past `maxOutputChars`), `expose_port` (a signed URL a
 * person or a browser opens) and `kill_process`. Pass a {@link podflareCodeInterpreter} as `sandbox`
 * so they work in the code tool's sandbox. Unlike the code tool they never replace a sandbox that
 * has gone: its processes went with it, so the model is told the error instead.
 *
 * @example
 * ```ts
 * const runCode = podflareCodeInterpreter();
 * const agent = new Agent({ name: 'dev', tools: [runCode, ...podflareProcessTools({ sandbox: runCode })] });
 * ```
 */
export function podflareProcessTools(options: PodflareProcessToolsOptions = {}): PodflareProcessTools {
  const session = sessionFor(options);
  const maxChars = options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS;
  const errorFunction = (expected: string) => (_context: unknown, error: unknown) => toolErrorText(error, expected);
  const startTool = tool({
    name: PROCESS_TOOL_NAMES.startProcess,
    description: processes.PROCESS_TOOL_DESCRIPTIONS.startProcess,
    parameters: startProcessParameters,
    strict: true,
    errorFunction: errorFunction('{"command": string, "cwd": string | null}'),
    async execute({ command, cwd }): Promise<string> {
      return JSON.stringify(await processes.startProcess(await session.get(), command, cwd ?? undefined));
    },
  });
  const readTool = tool({
    name: PROCESS_TOOL_NAMES.readProcessOutput,
    description: processes.PROCESS_TOOL_DESCRIPTIONS.readProcessOutput,
    parameters: readProcessOutputParameters,
    strict: true,
    errorFunction: errorFunction('{"pid": integer, "offset": integer | null}'),
    async execute({ pid, offset }): Promise<string> {
      return processes.formatProcessOutput(await processes.readProcessOutput(await session.get(), pid, offset ?? 0, maxChars));
    },
  });
  const exposeTool = tool({
    name: PROCESS_TOOL_NAMES.exposePort,
    description: processes.PROCESS_TOOL_DESCRIPTIONS.exposePort,
    parameters: exposePortParameters,
    strict: true,
    errorFunction: errorFunction('{"port": integer, "expires_in_seconds": integer | null}'),
    async execute({ port, expires_in_seconds }): Promise<string> {
      return JSON.stringify(await processes.exposePort(await session.get(), port, expires_in_seconds ?? undefined));
    },
  });
  const killTool = tool({
    name: PROCESS_TOOL_NAMES.killProcess,
    description: processes.PROCESS_TOOL_DESCRIPTIONS.killProcess,
    parameters: killProcessParameters,
    strict: true,
    errorFunction: errorFunction('{"pid": integer}'),
    async execute({ pid }): Promise<string> {
      return processes.formatKilled(await processes.killProcess(await session.get(), pid));
    },
  });
  return [withHandle(startTool, session), withHandle(readTool, session), withHandle(exposeTool, session), withHandle(killTool, session)];
}

// ---------------------------------------------------------------------------------------------

/** Where a tool's handle lives on the tool object, so another tool can share it. */
const SESSION = Symbol('podflare.sandboxSession');

type ToolWithSession = PodflareSandboxHandle & { [SESSION]: SandboxSession };

/**
 * The sandbox behind one or more tools: a given one, or one created on demand and owned here. Kept
 * per tool object (no module state), so independent agents never share a sandbox by accident.
 */
class SandboxSession {
  readonly #given: Sandbox | undefined;
  readonly #createOptions: SandboxCreateOptions;
  #owned: Sandbox | undefined;
  #creating: Promise<Sandbox> | undefined;

  constructor(given: Sandbox | undefined, createOptions: SandboxCreateOptions) {
    this.#given = given;
    this.#createOptions = createOptions;
  }

  get current(): Sandbox | undefined {
    return this.#given ?? this.#owned;
  }

  /** The sandbox, creating it on first use; concurrent first calls (parallel tool calls) share one creation. */
  get(): Promise<Sandbox> {
    const existing = this.current;
    if (existing) return Promise.resolve(existing);
    this.#creating ??= Sandbox.create(this.#createOptions).then(
      (sandbox) => {
        this.#owned = sandbox;
        this.#creating = undefined;
        return sandbox;
      },
      (err: unknown) => {
        this.#creating = undefined;
        throw err;
      },
    );
    return this.#creating;
  }

  /**
   * Runs `fn` on the sandbox. When a sandbox this session created turns out to be gone (the server's
   * idle timeout reaped it, or someone destroyed it), runs `fn` once more on a fresh one and says so.
   */
  async withSandbox<T>(fn: (sandbox: Sandbox) => Promise<T>): Promise<{ value: T; note?: string }> {
    const sandbox = await this.get();
    try {
      return { value: await fn(sandbox) };
    } catch (err) {
      if (!isGone(err) || sandbox !== this.#owned) throw err;
      this.#owned = undefined;
      const value = await fn(await this.get());
      return { value, note: '[the previous sandbox had expired; this ran in a new one: earlier variables and files are gone]' };
    }
  }

  async close(): Promise<void> {
    const creating = this.#creating;
    if (creating) await creating.catch(() => undefined);
    const owned = this.#owned;
    this.#owned = undefined;
    await owned?.close();
  }
}

function sessionFor(options: PodflareToolOptions): SandboxSession {
  const { sandbox } = options;
  // Sandbox.create reads only the create options it knows, so the tool options can go along.
  if (sandbox === undefined) return new SandboxSession(undefined, options);
  if (SESSION in sandbox) return (sandbox as ToolWithSession)[SESSION];
  if (typeof (sandbox as Sandbox).runCode !== 'function' || typeof (sandbox as Sandbox).fork !== 'function') {
    throw new TypeError('the sandbox option must be a podflare Sandbox or a tool made by podflare/openai-agents');
  }
  return new SandboxSession(sandbox as Sandbox, {});
}

/** Makes the tool object its sandbox's handle (non-enumerable, so the SDK's copies stay plain). */
function withHandle<T extends object>(functionTool: T, session: SandboxSession): T & PodflareSandboxHandle {
  const close = (): Promise<void> => session.close();
  Object.defineProperties(functionTool, {
    [SESSION]: { value: session },
    sandbox: { value: () => session.get() },
    currentSandbox: { get: () => session.current },
    close: { value: close },
    [Symbol.asyncDispose]: { value: close },
  });
  return functionTool as T & PodflareSandboxHandle;
}

function isGone(err: unknown): boolean {
  return err instanceof SandboxGoneError || err instanceof NotFoundError;
}

/**
 * What the model sees when a call fails outside the code: the expected input for arguments that do
 * not match the schema, Podflare's own message for its errors, else the SDK's generic text.
 */
function toolErrorText(error: unknown, expectedInput?: string): string {
  // The SDK's InvalidToolInputError (not exported) is a ModelBehaviorError: the model's arguments.
  if (expectedInput && error instanceof ModelBehaviorError) {
    return `invalid arguments: expected ${expectedInput}`;
  }
  if (error instanceof PodflareError) {
    const hint = error.retryable ? ' (temporary: try again)' : '';
    return `Podflare error (${error.code})${hint}: ${error.message}`;
  }
  return 'An error occurred while running the tool. Please try again.';
}

async function pickWinner(policy: ForkMergePolicy, branches: ForkBranch[]): Promise<number | undefined> {
  if (policy === 'none') return undefined;
  if (policy === 'first-success') return branches.find((b) => b.execution?.exitCode === 0)?.index;
  const chosen = await policy(branches);
  if (chosen === undefined) return undefined;
  const branch = branches[chosen];
  if (!Number.isInteger(chosen) || !branch || branch.execution === undefined) {
    throw new RangeError(`the fork merge policy chose branch ${String(chosen)}, which is not a finished branch`);
  }
  return chosen;
}

function forkDescription(merge: ForkMergePolicy, maxBranches: number): string {
  const base =
    `Try up to ${maxBranches} alternative snippets side by side. Each snippet runs in its own copy of the ` +
    'code sandbox (the one run_code uses), starting from its current variables and files; they run in parallel ' +
    'and you get every branch\'s output. ';
  if (merge === 'none') return base + 'Branches are discarded afterwards: the sandbox itself is unchanged.';
  if (merge === 'first-success') {
    return base + 'The first branch (in snippet order) that succeeds (exit code 0) is kept: its variables and ' +
      'files become the sandbox\'s state; the others are discarded. The output says which branch was kept.';
  }
  return base + 'One branch may be kept as the sandbox\'s new state; the output says which.';
}

/** The tool's return value: the text alone, or the text followed by the images. */
function toolOutput(text: string, images: ExecutionImage[]): PodflareToolOutput {
  if (images.length === 0) return text;
  return [{ type: 'text', text }, ...images.map((img): ToolOutputImage => ({ type: 'image', image: { data: img.data, mediaType: img.mediaType } }))];
}
