/**
 * Vercel AI SDK adapter (`podflare/ai-sdk`): a `tool()` that runs the model's code in a Podflare
 * sandbox. Needs the optional peer dependencies `ai` (v6) and `zod`.
 *
 * AI SDK 7 adds an experimental sandbox-session interface (`experimental_sandbox`); ai@6, the newest
 * major that runs on Node 20, has none, so this module offers no adapter for it.
 *
 * @example
 * ```ts
 * import { generateText, stepCountIs } from 'ai';
 * import { Sandbox } from 'podflare';
 * import { podflareRunCode } from 'podflare/ai-sdk';
 *
 * await using sandbox = await Sandbox.create();
 * const { text } = await generateText({
 *   model,
 *   tools: { runCode: podflareRunCode({ sandbox }) },
 *   stopWhen: stepCountIs(5),
 *   prompt: 'What is the 50th Fibonacci number? Compute it.',
 * });
 * ```
 * @packageDocumentation
 */
import { tool } from 'ai';
import type { Tool } from 'ai';
import { z } from 'zod';
import type { ExecErrorInfo, MimeBundle } from '@podflare/protocol/events';
import type { Sandbox } from '../sandbox.js';
import type { Language } from '../types.js';
import { formatExecution } from './format.js';
import type { FormatOptions } from './format.js';
import * as processes from './process-tools.js';
import type { ExposedPort, KilledProcess, ProcessOutputRead, StartedProcess } from './process-tools.js';

export { formatExecution, truncateMiddle, DEFAULT_MAX_OUTPUT_CHARS } from './format.js';
export type { ExecutionImage, ExecutionSnapshot, FormatOptions } from './format.js';
export type { ExposedPort, KilledProcess, ProcessOutputRead, StartedProcess } from './process-tools.js';

/**
 * The sandbox a tool runs in: a Sandbox, a promise of one, or a function making one. A function is
 * called on the tool's first use only (so no sandbox is started for a conversation that never runs
 * code) and its sandbox is reused by every later call; if it fails, the next call tries again.
 * Closing the sandbox stays the caller's job.
 */
export type SandboxSource = Sandbox | PromiseLike<Sandbox> | (() => Sandbox | PromiseLike<Sandbox>);

/** Options of {@link podflareRunCode}. */
export interface PodflareRunCodeOptions extends FormatOptions {
  /** Where the code runs. */
  sandbox: SandboxSource;
  /**
   * `python` runs in the sandbox's persistent interpreter; `bash` in a fresh `bash -c` per call.
   * @default 'python'
   */
  language?: Language;
  /**
   * What the model is told about the tool.
   * @default a description of the persistent interpreter (or of bash) fit for `language`
   */
  description?: string;
  /**
   * Server-side limit on each call's run time; past it the code is interrupted and the model sees
   * exit code 124 with a note.
   * @default the server's default
   */
  timeoutMs?: number;
  /**
   * Each call is atomic: code that raises (or bash that exits non-zero) is undone — variables and
   * files back to how they were before the call — and the model is told so (`rolledBack`). A
   * failed step then never leaves half-done state behind for the next one.
   * @default false
   */
  atomic?: boolean;
}

/** The tool's input, as the model writes it. */
export interface PodflareRunCodeInput {
  code: string;
}

/**
 * What the tool's `execute` returns (and so what `toolResults`, `onStepFinish` and UI messages
 * carry): the execution as plain JSON. The model is shown a text form of it, plus the images.
 */
export interface PodflareRunCodeOutput {
  stdout: string;
  stderr: string;
  /** 0 on success, 1 on an uncaught exception, n for `SystemExit(n)`, 124 on a timeout. */
  exitCode: number;
  /** Rich outputs as MIME bundles (`text/plain`, `text/html`, `image/png` base64, …). */
  results: Array<{ isMainResult: boolean; data: MimeBundle }>;
  /** The uncaught exception, or null. */
  error: ExecErrorInfo | null;
  executionCount: number | null;
  /** True when the interpreter had to be restarted (timeout or crash): earlier variables are gone. */
  stateLost: boolean;
  /** True when the call failed and was undone (`atomic`). */
  rolledBack: boolean;
}

const PYTHON_DESCRIPTION =
  'Run Python code in a persistent interpreter (like a Jupyter notebook) inside an isolated sandbox. ' +
  'Variables, imports and files persist between calls, so build on earlier results instead of repeating work. ' +
  'Returns stdout, stderr, the value of the last expression and any exception with its traceback; ' +
  'matplotlib figures are returned as images. Run shell commands through subprocess.';

const BASH_DESCRIPTION =
  'Run a bash script inside an isolated sandbox. Each call starts a fresh shell: files persist between calls, ' +
  'shell variables and the working directory do not. Returns stdout, stderr and the exit code.';

const INPUT_SCHEMA = z.object({
  code: z.string().describe('The code to run.'),
});

/**
 * An AI SDK tool that runs the model's code in a Podflare sandbox. Errors in the code (an exception,
 * a non-zero exit code) are results the model sees and can fix; only failures to reach the sandbox
 * (e.g. {@link SandboxGoneError}) make the tool call fail. The AI SDK's abort signal cancels the run.
 *
 * @example
 * ```ts
 * let sandbox: Sandbox | undefined;
 * const result = streamText({
 *   model,
 *   tools: { python: podflareRunCode({ sandbox: async () => (sandbox = await Sandbox.create()) }) },
 *   stopWhen: stepCountIs(10),
 *   prompt: 'Plot y = x² for x in [-3, 3] and describe the curve.',
 * });
 * for await (const part of result.fullStream) if (part.type === 'tool-result') console.log(part.output.stdout);
 * await sandbox?.close();
 * ```
 */
export function podflareRunCode(options: PodflareRunCodeOptions): Tool<PodflareRunCodeInput, PodflareRunCodeOutput> {
  const language = options.language ?? 'python';
  const getSandbox = lazySandbox(options.sandbox);
  const format: FormatOptions = {};
  if (options.maxOutputChars !== undefined) format.maxOutputChars = options.maxOutputChars;
  if (options.images !== undefined) format.images = options.images;

  return tool({
    description: options.description ?? (language === 'bash' ? BASH_DESCRIPTION : PYTHON_DESCRIPTION),
    inputSchema: INPUT_SCHEMA,
    execute: async ({ code }, { abortSignal }): Promise<PodflareRunCodeOutput> => {
      const sandbox = await getSandbox();
      const ex = await sandbox.runCode({ code, language, timeoutMs: options.timeoutMs, signal: abortSignal, atomic: options.atomic });
      return {
        stdout: ex.stdout,
        stderr: ex.stderr,
        exitCode: ex.exitCode,
        results: ex.results.map((r) => ({ isMainResult: r.isMainResult, data: r.data })),
        error: ex.error ?? null,
        executionCount: ex.executionCount,
        stateLost: ex.stateLost,
        rolledBack: ex.rolledBack,
      };
    },
    toModelOutput: ({ output }) => {
      const { text, images } = formatExecution(output, format);
      if (images.length === 0) return { type: 'text', value: text };
      return {
        type: 'content',
        value: [
          { type: 'text', text },
          ...images.map((image) => ({ type: 'image-data' as const, data: image.data, mediaType: image.mediaType })),
        ],
      };
    },
  });
}

/** Options of {@link podflareRewind}. */
export interface PodflareRewindOptions {
  /** The sandbox to rewind: one created with `history` (the last n calls can be undone). */
  sandbox: SandboxSource;
  /**
   * What the model is told about the tool.
   * @default a description of undoing the last calls
   */
  description?: string;
}

/** What {@link podflareRewind}'s `execute` returns. */
export interface PodflareRewindOutput {
  /** How many calls were undone. */
  rewound: number;
}

const REWIND_DESCRIPTION =
  'Undo the last code-running calls: the sandbox (variables, files, working directory) goes back to how it was ' +
  'before them. Use it when a step broke or destroyed state you need. `steps` is how many calls to undo (default 1).';

/**
 * An AI SDK tool that lets the model undo its own last steps: the sandbox goes back to how it was
 * before them (`Sandbox.rewind`). The sandbox must keep a history (`Sandbox.create({ history: n })`);
 * asking for more steps than it keeps is an error the model sees.
 *
 * @example
 * ```ts
 * await using sandbox = await Sandbox.create({ history: 10 });
 * const tools = { python: podflareRunCode({ sandbox }), undo: podflareRewind({ sandbox }) };
 * ```
 */
export function podflareRewind(options: PodflareRewindOptions): Tool<{ steps?: number | undefined }, PodflareRewindOutput> {
  const getSandbox = lazySandbox(options.sandbox);
  return tool({
    description: options.description ?? REWIND_DESCRIPTION,
    inputSchema: z.object({ steps: z.number().int().min(1).optional().describe('How many calls to undo (default 1).') }),
    execute: async ({ steps }): Promise<PodflareRewindOutput> => {
      const sandbox = await getSandbox();
      await sandbox.rewind(steps ?? 1);
      return { rewound: steps ?? 1 };
    },
    toModelOutput: ({ output }) => ({ type: 'text', value: `Undid the last ${output.rewound} call(s): the sandbox is as it was before them.` }),
  });
}

/** Options of {@link podflareProcessTools}. */
export interface PodflareProcessToolsOptions {
  /** Where the processes run (the same source as the code tool's, to work on one sandbox). */
  sandbox: SandboxSource;
  /**
   * A process's output is cut in the middle past this many characters per read (the head and the
   * tail are kept); the next offset still skips it all.
   * @default 20000
   */
  maxOutputChars?: number;
}

/** The tools {@link podflareProcessTools} returns. */
export interface PodflareProcessTools {
  startProcess: Tool<{ command: string; cwd?: string | undefined }, StartedProcess>;
  readProcessOutput: Tool<{ pid: number; offset?: number | undefined }, ProcessOutputRead>;
  exposePort: Tool<{ port: number; expiresInSeconds?: number | undefined }, ExposedPort>;
  killProcess: Tool<{ pid: number }, KilledProcess>;
}

const PID_SCHEMA = z.number().int().min(1).max(processes.MAX_PID).describe('The process id returned by startProcess.');

/**
 * AI SDK tools for background processes, where an agent needs them: `startProcess` (a dev server, a
 * watcher; returns its pid at once), `readProcessOutput` (from an offset, so polling never repeats
 * itself; says whether it still runs and its exit code), `exposePort` (a signed URL a person or a
 * browser opens) and `killProcess`. Spread them next to {@link podflareRunCode} on the same sandbox.
 *
 * @example
 * ```ts
 * await using sandbox = await Sandbox.create();
 * const tools = { runCode: podflareRunCode({ sandbox }), ...podflareProcessTools({ sandbox }) };
 * ```
 */
export function podflareProcessTools(options: PodflareProcessToolsOptions): PodflareProcessTools {
  const getSandbox = lazySandbox(options.sandbox);
  const maxChars = options.maxOutputChars;
  const text = (value: string) => ({ type: 'text' as const, value });
  return {
    startProcess: tool({
      description: processes.PROCESS_TOOL_DESCRIPTIONS.startProcess,
      inputSchema: z.object({
        command: z.string().min(1).max(1024 * 1024).describe('The command line, run with bash -c, e.g. "python3 -m http.server 8000".'),
        cwd: z.string().min(1).max(4096).optional().describe('Working directory. Default: /root'),
      }),
      execute: async ({ command, cwd }) => processes.startProcess(await getSandbox(), command, cwd),
      toModelOutput: ({ output }) => text(JSON.stringify(output)),
    }),
    readProcessOutput: tool({
      description: processes.PROCESS_TOOL_DESCRIPTIONS.readProcessOutput,
      inputSchema: z.object({
        pid: PID_SCHEMA,
        offset: z.number().int().min(0).optional().describe('Where to start reading. Default: 0 (everything still kept)'),
      }),
      execute: async ({ pid, offset }) => processes.readProcessOutput(await getSandbox(), pid, offset, maxChars),
      toModelOutput: ({ output }) => text(processes.formatProcessOutput(output)),
    }),
    exposePort: tool({
      description: processes.PROCESS_TOOL_DESCRIPTIONS.exposePort,
      inputSchema: z.object({
        port: z.number().int().min(1).max(65535).describe('The port the server listens on inside the sandbox (on 127.0.0.1 or 0.0.0.0).'),
        expiresInSeconds: z.number().int().min(1).max(processes.MAX_EXPOSE_SECONDS).optional().describe('How long the URL works. Default: 3600'),
      }),
      execute: async ({ port, expiresInSeconds }) => processes.exposePort(await getSandbox(), port, expiresInSeconds),
      toModelOutput: ({ output }) => text(JSON.stringify(output)),
    }),
    killProcess: tool({
      description: processes.PROCESS_TOOL_DESCRIPTIONS.killProcess,
      inputSchema: z.object({ pid: PID_SCHEMA }),
      execute: async ({ pid }) => processes.killProcess(await getSandbox(), pid),
      toModelOutput: ({ output }) => text(processes.formatKilled(output)),
    }),
  };
}

/** Resolves a {@link SandboxSource} once, on first use; a failed factory call is retried next time. */
function lazySandbox(source: SandboxSource): () => Promise<Sandbox> {
  if (typeof source !== 'function') {
    const ready = Promise.resolve(source);
    return () => ready;
  }
  let pending: Promise<Sandbox> | undefined;
  return () =>
    (pending ??= Promise.resolve()
      .then(source)
      .catch((err: unknown) => {
        pending = undefined;
        throw err;
      }));
}
