/**
 * The background-process tools of `podflare/anthropic` (`start_process`, `read_process_output`,
 * `expose_port`, `kill_process`): custom tool definitions for the Messages API and the handler for
 * their `tool_use` blocks. What they do and say comes from the shared process-tools module, so they
 * read the same as the AI SDK's, the OpenAI Agents SDK's and the MCP server's.
 */
import type { Sandbox } from '../sandbox.js';
import { DEFAULT_MAX_OUTPUT_CHARS } from './format.js';
import * as processes from './process-tools.js';

export { PROCESS_TOOL_DESCRIPTIONS } from './process-tools.js';

/** The background-process tools' names as the model sees them (the same as the MCP server's). */
export const PROCESS_TOOL_NAMES = {
  startProcess: 'start_process',
  readProcessOutput: 'read_process_output',
  exposePort: 'expose_port',
  killProcess: 'kill_process',
} as const;

/** A custom tool's definition; fits the SDK's `Tool`. */
export type ProcessToolDefinition = {
  name: string;
  description: string;
  input_schema: { type: 'object'; properties: Record<string, Record<string, unknown>>; required: string[] };
};

const PID_PROPERTY = {
  type: 'integer', minimum: 1, maximum: processes.MAX_PID, description: 'The process id returned by start_process.',
};

/**
 * The four background-process tools' definitions, to pass in `tools` next to {@link podflareTools}'s.
 *
 * @example
 * ```ts
 * await anthropic.messages.create({ model, max_tokens: 4096, tools: [...podflareTools(), ...processTools()], messages });
 * ```
 */
export function processTools(): ProcessToolDefinition[] {
  const d = processes.PROCESS_TOOL_DESCRIPTIONS;
  return [
    {
      name: PROCESS_TOOL_NAMES.startProcess,
      description: d.startProcess,
      input_schema: {
        type: 'object',
        properties: {
          command: { type: 'string', description: 'The command line, run with bash -c, e.g. "python3 -m http.server 8000".' },
          cwd: { type: 'string', description: 'Working directory. Default: /root' },
        },
        required: ['command'],
      },
    },
    {
      name: PROCESS_TOOL_NAMES.readProcessOutput,
      description: d.readProcessOutput,
      input_schema: {
        type: 'object',
        properties: {
          pid: PID_PROPERTY,
          offset: {
            type: 'integer', minimum: 0, description: 'Where to start reading: the nextOffset of the previous read. Default: 0',
          },
        },
        required: ['pid'],
      },
    },
    {
      name: PROCESS_TOOL_NAMES.exposePort,
      description: d.exposePort,
      input_schema: {
        type: 'object',
        properties: {
          port: {
            type: 'integer', minimum: 1, maximum: 65535,
            description: 'The port the server listens on inside the sandbox (on 127.0.0.1 or 0.0.0.0).',
          },
          expires_in_seconds: {
            type: 'integer', minimum: 1, maximum: processes.MAX_EXPOSE_SECONDS, description: 'How long the URL works. Default: 3600',
          },
        },
        required: ['port'],
      },
    },
    {
      name: PROCESS_TOOL_NAMES.killProcess,
      description: d.killProcess,
      input_schema: { type: 'object', properties: { pid: PID_PROPERTY }, required: ['pid'] },
    },
  ];
}

/** Whether `name` is one of the background-process tools. */
export function isProcessToolName(name: string): boolean {
  return (Object.values(PROCESS_TOOL_NAMES) as string[]).includes(name);
}

/** A mistake in a process tool's input: told to the model as an `is_error` result. */
export class ProcessToolInputError extends Error {}

function integerIn(input: Record<string, unknown>, key: string, min: number, max: number, optional: boolean): number | undefined {
  const value = input[key];
  if (value === undefined || value === null) {
    if (optional) return undefined;
    throw new ProcessToolInputError(`"${key}" is required: an integer from ${min} to ${max}.`);
  }
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new ProcessToolInputError(`"${key}" must be an integer from ${min} to ${max}, got ${JSON.stringify(value)}.`);
  }
  return value;
}

/**
 * Runs one background-process tool use (by name) and returns the text the model is shown. Bad input
 * throws {@link ProcessToolInputError}; server errors (an unknown pid: NotFoundError) are thrown as they come.
 */
export async function runProcessTool(
  name: string, input: Record<string, unknown>, sandbox: Sandbox, maxOutputChars = DEFAULT_MAX_OUTPUT_CHARS,
): Promise<string> {
  switch (name) {
    case PROCESS_TOOL_NAMES.startProcess: {
      if (typeof input.command !== 'string' || input.command === '') {
        throw new ProcessToolInputError('start_process needs a non-empty string "command" input.');
      }
      const cwd = input.cwd ?? undefined;
      if (cwd !== undefined && typeof cwd !== 'string') throw new ProcessToolInputError('"cwd" must be a string.');
      return JSON.stringify(await processes.startProcess(sandbox, input.command, cwd));
    }
    case PROCESS_TOOL_NAMES.readProcessOutput: {
      const pid = integerIn(input, 'pid', 1, processes.MAX_PID, false)!;
      const offset = integerIn(input, 'offset', 0, Number.MAX_SAFE_INTEGER, true) ?? 0;
      return processes.formatProcessOutput(await processes.readProcessOutput(sandbox, pid, offset, maxOutputChars));
    }
    case PROCESS_TOOL_NAMES.exposePort: {
      const port = integerIn(input, 'port', 1, 65535, false)!;
      const seconds = integerIn(input, 'expires_in_seconds', 1, processes.MAX_EXPOSE_SECONDS, true);
      return JSON.stringify(await processes.exposePort(sandbox, port, seconds));
    }
    case PROCESS_TOOL_NAMES.killProcess:
      return processes.formatKilled(await processes.killProcess(sandbox, integerIn(input, 'pid', 1, processes.MAX_PID, false)!));
    default:
      throw new ProcessToolInputError(`Unknown process tool "${name}".`);
  }
}
