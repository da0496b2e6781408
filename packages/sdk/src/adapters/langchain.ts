/**
 * LangChain JS adapter (`podflare/langchain`): a LangChain tool that runs the model's code in a
 * Podflare sandbox — Python in its persistent interpreter (variables persist between calls), or
 * bash. Works wherever LangChain takes a tool: `model.bindTools([tool])`, LangGraph's agents, or
 * `tool.invoke(toolCall)` to get the `ToolMessage` back.
 *
 * @example
 * ```ts
 * import { Sandbox } from 'podflare';
 * import { podflareTool } from 'podflare/langchain';
 *
 * await using sandbox = await Sandbox.create();
 * const tool = podflareTool({ sandbox });
 * const model = chatModel.bindTools([tool]);
 * const reply = await model.invoke(messages);
 * for (const call of reply.tool_calls ?? []) messages.push(await tool.invoke(call));   // a ToolMessage
 * ```
 * @packageDocumentation
 */
import { tool } from '@langchain/core/tools';
import type { DynamicStructuredTool } from '@langchain/core/tools';
import { z } from 'zod';
import type { Sandbox } from '../sandbox.js';
import { formatExecution } from './format.js';
import type { FormatOptions } from './format.js';

export type { FormatOptions } from './format.js';

/** The tool's default name. */
export const PODFLARE_TOOL_NAME = 'podflare_code_interpreter';

export interface PodflareToolOptions extends FormatOptions {
  /** Where the code runs: a sandbox, or a promise of one (awaited on first use). */
  sandbox: Sandbox | PromiseLike<Sandbox>;
  /** @default 'podflare_code_interpreter' */
  name?: string;
  /** What the model is told about the tool. @default a description of the interpreter and bash */
  description?: string;
  /**
   * Server-side limit on each call's run time; past it the code is interrupted and the model sees
   * exit code 124 with a note.
   * @default the server's default
   */
  timeoutMs?: number;
}

const DESCRIPTION =
  'Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the last expression and ' +
  'any error. Python (default) keeps variables, imports and files between calls, like a notebook; ' +
  'language "bash" runs a shell command in a fresh shell (files persist). Files live under /root.';

const SCHEMA = z.object({
  code: z.string().describe('The code to run.'),
  language: z.enum(['python', 'bash']).optional().describe('python (default) or bash.'),
});

/** The tool's input. */
export type PodflareToolInput = z.infer<typeof SCHEMA>;

/**
 * A LangChain tool running code in `options.sandbox`. It answers with text (stdout, stderr, the
 * last expression's value, the traceback of an error, a non-zero exit code); an exception in the
 * code is an answer for the model, not a thrown error. A failing sandbox throws a PodflareError.
 */
export function podflareTool(options: PodflareToolOptions): DynamicStructuredTool<typeof SCHEMA> {
  const format: FormatOptions = { images: false };
  if (options.maxOutputChars !== undefined) format.maxOutputChars = options.maxOutputChars;
  return tool(
    async ({ code, language }, config) => {
      const sandbox = await options.sandbox;
      const ex = await sandbox.runCode({ code, language: language ?? 'python', timeoutMs: options.timeoutMs, signal: config?.signal });
      return formatExecution(ex, format).text;
    },
    { name: options.name ?? PODFLARE_TOOL_NAME, description: options.description ?? DESCRIPTION, schema: SCHEMA },
  ) as DynamicStructuredTool<typeof SCHEMA>;
}
