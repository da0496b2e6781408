/**
 * Google Gemini adapter (`podflare/gemini`), for `@google/genai`'s function calling: the function
 * declaration to offer the model, and {@link runFunctionCall}, which runs a `FunctionCall` the model
 * answers with in a Podflare sandbox and returns the `FunctionResponse` to send back. Nothing here
 * imports `@google/genai` at run time (its types only): declarations use `parametersJsonSchema`.
 *
 * @example
 * ```ts
 * import { GoogleGenAI, createPartFromFunctionResponse } from '@google/genai';
 * import { Sandbox } from 'podflare';
 * import { podflareFunctionDeclaration, runFunctionCall } from 'podflare/gemini';
 *
 * const ai = new GoogleGenAI({});
 * await using sandbox = await Sandbox.create();
 * const config = { tools: [{ functionDeclarations: [podflareFunctionDeclaration()] }] };
 * const reply = await ai.models.generateContent({ model, contents, config });
 * for (const call of reply.functionCalls ?? []) {
 *   const { id, name, response } = await runFunctionCall(call, sandbox);
 *   contents.push({ role: 'user', parts: [createPartFromFunctionResponse(id ?? '', name!, response!)] });
 * }
 * ```
 * @packageDocumentation
 */
import type { FunctionCall, FunctionDeclaration, FunctionResponse } from '@google/genai';
import type { Sandbox } from '../sandbox.js';
import { formatExecution } from './format.js';
import type { FormatOptions } from './format.js';

export type { FormatOptions } from './format.js';

/** The function's default name. */
export const PODFLARE_FUNCTION_NAME = 'run_code';

const DESCRIPTION =
  'Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the last expression and ' +
  'any error. Python (default) keeps variables, imports and files between calls, like a notebook; ' +
  'language "bash" runs a shell command in a fresh shell (files persist). Files live under /root.';

const LANGUAGES = ['python', 'bash'] as const;

/** The declaration to put in `config.tools[].functionDeclarations`. */
export function podflareFunctionDeclaration(options: { name?: string; description?: string } = {}): FunctionDeclaration {
  return {
    name: options.name ?? PODFLARE_FUNCTION_NAME,
    description: options.description ?? DESCRIPTION,
    parametersJsonSchema: {
      type: 'object',
      properties: {
        code: { type: 'string', description: 'The code to run.' },
        language: { type: 'string', enum: [...LANGUAGES], description: 'python (default) or bash.' },
      },
      required: ['code'],
      additionalProperties: false,
    },
  };
}

export interface RunFunctionCallOptions extends FormatOptions {
  /** Server-side limit on the run time; past it the model sees exit code 124. @default the server's */
  timeoutMs?: number;
  /** Cancels the call (the sandbox interrupts the code); the promise then rejects. */
  signal?: AbortSignal;
}

/**
 * Runs `call` in `sandbox`. Resolves to `{ id, name, response: { output, exit_code } }`, or
 * `{ …, response: { error } }` for arguments the model can correct. A failing sandbox rejects
 * with a PodflareError.
 */
export async function runFunctionCall(call: FunctionCall, sandbox: Sandbox, options: RunFunctionCallOptions = {}): Promise<FunctionResponse> {
  const reply: FunctionResponse = { name: call.name ?? PODFLARE_FUNCTION_NAME };
  if (call.id !== undefined) reply.id = call.id;
  const args = call.args ?? {};
  const code = args.code;
  const language = args.language ?? 'python';
  if (typeof code !== 'string') return { ...reply, response: { error: 'expected args {"code": string, "language"?: "python" | "bash"}' } };
  if (language !== 'python' && language !== 'bash') {
    return { ...reply, response: { error: `language must be python or bash, got ${JSON.stringify(language)}` } };
  }
  const ex = await sandbox.runCode({ code, language, timeoutMs: options.timeoutMs, signal: options.signal });
  const format: FormatOptions = { images: false };
  if (options.maxOutputChars !== undefined) format.maxOutputChars = options.maxOutputChars;
  return { ...reply, response: { output: formatExecution(ex, format).text, exit_code: ex.exitCode } };
}
