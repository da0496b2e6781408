/**
 * Anthropic Messages API adapter (`podflare/anthropic`): tool definitions to send with
 * `messages.create`, and handlers that run the `tool_use` blocks Claude answers with in a Podflare
 * sandbox, returning `tool_result` blocks for the next user message.
 *
 * Three tools: `execute_python` (a custom tool: the sandbox's persistent interpreter), Anthropic's
 * client-side `bash` tool and its text editor (`str_replace_based_edit_tool`), both run in the same
 * sandbox. Nothing here imports `@anthropic-ai/sdk`: blocks may be the SDK's objects or plain dicts,
 * and what is returned is plain JSON that fits the SDK's `ToolResultBlockParam` and `ToolUnion`.
 *
 * Failures the model can act on (an exception in its code, a missing file, an ambiguous
 * `str_replace`) come back as `is_error: true` results; failures it cannot (the sandbox is gone,
 * the server unreachable) are thrown, as {@link PodflareError}s.
 *
 * @example
 * ```ts
 * import Anthropic from '@anthropic-ai/sdk';
 * import { Sandbox } from 'podflare';
 * import { handleToolUses, podflareTools } from 'podflare/anthropic';
 *
 * const anthropic = new Anthropic();
 * await using sandbox = await Sandbox.create();
 * const messages: Anthropic.MessageParam[] = [{ role: 'user', content: 'How many primes are below 10^6?' }];
 * while (true) {
 *   const reply = await anthropic.messages.create({ model, max_tokens: 4096, tools: podflareTools(), messages });
 *   messages.push({ role: 'assistant', content: reply.content });
 *   if (reply.stop_reason !== 'tool_use') break;
 *   messages.push({ role: 'user', content: await handleToolUses(reply.content, sandbox) });
 * }
 * ```
 * @packageDocumentation
 */
import { TIMEOUT_EXIT_CODE } from '@podflare/protocol/events';
import { BadRequestError, NotFoundError } from '../errors.js';
import type { Sandbox } from '../sandbox.js';
import type { FileStat } from '../types.js';
import { formatExecution, NO_OUTPUT, truncateMiddle, DEFAULT_MAX_OUTPUT_CHARS } from './format.js';
import type { FormatOptions } from './format.js';
import { isProcessToolName, PROCESS_TOOL_NAMES, ProcessToolInputError, runProcessTool } from './anthropic-process-tools.js';

export { PROCESS_TOOL_DESCRIPTIONS, PROCESS_TOOL_NAMES, processTools, type ProcessToolDefinition } from './anthropic-process-tools.js';

export type { FormatOptions } from './format.js';

/** Name of the custom code-execution tool. */
export const CODE_EXECUTION_TOOL_NAME = 'execute_python';
/** Name of Anthropic's bash tool (fixed by the API). */
export const BASH_TOOL_NAME = 'bash';
/** Name of Anthropic's text editor tool for Claude 4 models (fixed by the API). */
export const TEXT_EDITOR_TOOL_NAME = 'str_replace_based_edit_tool';
/** The bash tool version sent by {@link bashTool}. */
export const BASH_TOOL_TYPE = 'bash_20250124';
/** The text editor version sent by {@link textEditorTool} (Claude 4 models; it has no `undo_edit`). */
export const TEXT_EDITOR_TOOL_TYPE = 'text_editor_20250728';

// ---------------------------------------------------------------------------------------------
// Shapes (structurally compatible with @anthropic-ai/sdk's types, without depending on it)
// ---------------------------------------------------------------------------------------------

/** A `tool_use` content block: the SDK's `ToolUseBlock` or a plain dict of the same shape. */
export interface ToolUseBlockLike {
  type?: string;
  id: string;
  name: string;
  input: unknown;
}

/** A text block of a tool result. */
export type ToolResultText = { type: 'text'; text: string };
/** An image block of a tool result (a figure the code produced). */
export type ToolResultImage = {
  type: 'image';
  source: { type: 'base64'; media_type: 'image/png' | 'image/jpeg'; data: string };
};
/** What every handler resolves to; fits the SDK's `ToolResultBlockParam`. */
export type ToolResult = {
  type: 'tool_result';
  tool_use_id: string;
  content: Array<ToolResultText | ToolResultImage>;
  is_error: boolean;
};

/** The custom code-execution tool's definition; fits the SDK's `Tool`. */
export type CodeExecutionToolDefinition = {
  name: string;
  description: string;
  input_schema: {
    type: 'object';
    properties: { code: { type: 'string'; description: string } };
    required: ['code'];
  };
};
/** Anthropic's bash tool; fits the SDK's `ToolBash20250124`. */
export type BashToolDefinition = { type: typeof BASH_TOOL_TYPE; name: typeof BASH_TOOL_NAME };
/** Anthropic's text editor; fits the SDK's `ToolTextEditor20250728`. */
export type TextEditorToolDefinition = {
  type: typeof TEXT_EDITOR_TOOL_TYPE;
  name: typeof TEXT_EDITOR_TOOL_NAME;
  max_characters?: number;
};
export type PodflareToolDefinition = CodeExecutionToolDefinition | BashToolDefinition | TextEditorToolDefinition;

/** Options of the handlers. Each reads the ones that concern it. */
export interface ToolUseOptions extends FormatOptions {
  /**
   * Server-side limit on the run time of each `execute_python` and `bash` call; past it the code is
   * interrupted and the model sees exit code 124.
   * @default the server's default
   */
  timeoutMs?: number;
  /**
   * `execute_python` calls are atomic: code that raises is undone — variables and files back to how
   * they were before the call — and the model is told so.
   * @default false
   */
  atomic?: boolean;
  /** Cancels the call (the sandbox interrupts the code); the handler then rejects. */
  signal?: AbortSignal;
  /**
   * The text editor's `view` shows at most this many characters of a file (send the same number as
   * `max_characters` in {@link textEditorTool}).
   * @default no limit
   */
  maxCharacters?: number;
  /**
   * The name the code-execution tool was defined with, for {@link handleToolUse}.
   * @default 'execute_python'
   */
  codeToolName?: string;
}

// ---------------------------------------------------------------------------------------------
// Tool definitions
// ---------------------------------------------------------------------------------------------

const CODE_DESCRIPTION =
  'Run Python code in a persistent interpreter (like a Jupyter notebook) inside an isolated sandbox. ' +
  'Variables, imports and files persist between calls, so build on earlier results instead of repeating work. ' +
  'Returns stdout, stderr, the value of the last expression and any exception with its traceback; ' +
  'matplotlib figures are returned as images. The bash and text editor tools, when offered, act on the same machine.';

/**
 * The custom tool that runs Python in the sandbox's persistent interpreter.
 *
 * @example
 * ```ts
 * const tools = [codeExecutionTool({ name: 'python' })];   // then handleToolUse(block, sandbox, { codeToolName: 'python' })
 * ```
 */
export function codeExecutionTool(options: { name?: string; description?: string } = {}): CodeExecutionToolDefinition {
  return {
    name: options.name ?? CODE_EXECUTION_TOOL_NAME,
    description: options.description ?? CODE_DESCRIPTION,
    input_schema: {
      type: 'object',
      properties: { code: { type: 'string', description: 'The Python code to run.' } },
      required: ['code'],
    },
  };
}

/** Anthropic's client-side bash tool (schema built into the model), run by {@link handleBashToolUse}. */
export function bashTool(): BashToolDefinition {
  return { type: BASH_TOOL_TYPE, name: BASH_TOOL_NAME };
}

/** Anthropic's text editor tool (schema built into the model), run by {@link handleTextEditorToolUse}. */
export function textEditorTool(options: { maxCharacters?: number } = {}): TextEditorToolDefinition {
  const def: TextEditorToolDefinition = { type: TEXT_EDITOR_TOOL_TYPE, name: TEXT_EDITOR_TOOL_NAME };
  if (options.maxCharacters !== undefined) def.max_characters = options.maxCharacters;
  return def;
}

/**
 * The definitions to pass as `tools` to `messages.create`: code execution, bash and the text editor
 * (leave any out with `false`).
 *
 * @example
 * ```ts
 * await anthropic.messages.create({ model, max_tokens: 4096, tools: podflareTools({ bash: false }), messages });
 * ```
 */
export function podflareTools(
  options: { codeExecution?: boolean; bash?: boolean; textEditor?: boolean; codeToolName?: string; maxCharacters?: number } = {},
): PodflareToolDefinition[] {
  const tools: PodflareToolDefinition[] = [];
  if (options.codeExecution !== false) tools.push(codeExecutionTool(options.codeToolName ? { name: options.codeToolName } : {}));
  if (options.bash !== false) tools.push(bashTool());
  if (options.textEditor !== false) {
    tools.push(textEditorTool(options.maxCharacters !== undefined ? { maxCharacters: options.maxCharacters } : {}));
  }
  return tools;
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/**
 * Runs an `execute_python` tool use in the sandbox's interpreter. The text block holds stdout,
 * stderr, the cell's value and the exception with its traceback; each PNG/JPEG the code produced
 * follows as an image block. `is_error` is `exitCode !== 0`.
 *
 * @example
 * ```ts
 * const result = await handleCodeExecutionToolUse(
 *   { type: 'tool_use', id: 'toolu_01', name: 'execute_python', input: { code: 'print(6 * 7)' } },
 *   sandbox,
 * );
 * // { type: 'tool_result', tool_use_id: 'toolu_01', content: [{ type: 'text', text: '42' }], is_error: false }
 * ```
 */
export async function handleCodeExecutionToolUse(block: ToolUseBlockLike, sandbox: Sandbox, options: ToolUseOptions = {}): Promise<ToolResult> {
  const { id, input } = checkToolUse(block);
  if (typeof input.code !== 'string') return errorResult(id, `${block.name} needs a string "code" input.`);
  const ex = await sandbox.runCode({ code: input.code, timeoutMs: options.timeoutMs, signal: options.signal, atomic: options.atomic });
  const { text, images } = formatExecution(ex, options);
  return {
    type: 'tool_result',
    tool_use_id: id,
    content: [
      { type: 'text', text },
      ...images.map((image): ToolResultImage => ({
        type: 'image',
        source: { type: 'base64', media_type: image.mediaType, data: image.data },
      })),
    ],
    is_error: ex.exitCode !== 0,
  };
}

/** Where the bash tool keeps its session between calls, inside the sandbox (fork children inherit it). */
const BASH_STATE = '/tmp/.podflare-bash-session';

// Podflare runs each bash call in a fresh `bash -c`, while Claude's bash tool assumes one long-lived
// shell. The wrapper restores the working directory and exported variables the previous call left,
// runs the command (passed through the environment, so no quoting can break it) and saves them again,
// even on `exit`. PODFLARE_* variables are the sandbox's own (its id differs in a fork child), never
// saved. It is one line so the line numbers in bash's error messages are the command's own.
const BASH_WRAPPER = [
  `__pf_state=${BASH_STATE}`,
  'if [ -r "$__pf_state" ]; then . "$__pf_state" 2>/dev/null; fi',
  `__pf_save() { __pf_rc=$?; { export -p | grep -v '^declare -x PODFLARE_'; printf 'cd -- %q\\n' "$PWD"; } >"$__pf_state.tmp" 2>/dev/null && mv -f -- "$__pf_state.tmp" "$__pf_state" 2>/dev/null; exit "$__pf_rc"; }`,
  'trap __pf_save EXIT',
  '__pf_cmd=$PODFLARE_BASH_COMMAND',
  'unset PODFLARE_BASH_COMMAND',
  'eval "$__pf_cmd"',
].join('; ');

/**
 * Runs a `bash` tool use in the sandbox. The session emulates one long-lived shell: the working
 * directory and exported variables carry over between calls (plain shell variables, functions and
 * background jobs do not); `restart: true` resets it. The text interleaves stdout and stderr as they
 * came; `is_error` is `exitCode !== 0`.
 *
 * @example
 * ```ts
 * await handleBashToolUse({ type: 'tool_use', id: 'toolu_02', name: 'bash', input: { command: 'cd /tmp && ls' } }, sandbox);
 * ```
 */
export async function handleBashToolUse(block: ToolUseBlockLike, sandbox: Sandbox, options: ToolUseOptions = {}): Promise<ToolResult> {
  const { id, input } = checkToolUse(block);
  const restart = input.restart === true;
  if (restart) {
    await sandbox.runCode({ code: `rm -f ${BASH_STATE}`, language: 'bash', signal: options.signal });
    if (input.command === undefined) {
      return textResult(id, 'The bash session was restarted: working directory and environment are back to their defaults.', false);
    }
  }
  if (typeof input.command !== 'string') return errorResult(id, 'bash needs a string "command" input (or "restart": true).');
  const output: string[] = [];
  const ex = await sandbox.runCode({
    code: BASH_WRAPPER,
    language: 'bash',
    env: { PODFLARE_BASH_COMMAND: input.command },
    timeoutMs: options.timeoutMs,
    signal: options.signal,
    onStdout: (text) => void output.push(text),
    onStderr: (text) => void output.push(text),
  });
  const parts = [output.join('').replace(/\n+$/, '')].filter((p) => p !== '');
  if (ex.exitCode === TIMEOUT_EXIT_CODE) parts.push(`[Timed out: the command was interrupted (exit code ${TIMEOUT_EXIT_CODE}).]`);
  else if (ex.exitCode !== 0) parts.push(`[exit code ${ex.exitCode}]`);
  const text = truncateMiddle(parts.join('\n') || NO_OUTPUT, options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS);
  return textResult(id, text, ex.exitCode !== 0);
}

/**
 * Runs a text editor (`str_replace_based_edit_tool`) tool use on the sandbox's files, through the
 * SDK's file API: `view` (a file with line numbers, optionally a `view_range`; a directory two levels
 * deep), `create`, `str_replace` (the `old_str` must occur exactly once) and `insert` (after line
 * `insert_line`, 0 for the top). Mistakes come back as `is_error` results saying what to fix.
 *
 * @example
 * ```ts
 * await handleTextEditorToolUse({
 *   type: 'tool_use', id: 'toolu_03', name: 'str_replace_based_edit_tool',
 *   input: { command: 'create', path: '/root/app.py', file_text: 'print("hi")\n' },
 * }, sandbox);
 * ```
 */
export async function handleTextEditorToolUse(block: ToolUseBlockLike, sandbox: Sandbox, options: ToolUseOptions = {}): Promise<ToolResult> {
  const { id, input } = checkToolUse(block);
  try {
    return textResult(id, await runEditorCommand(input, sandbox, options), false);
  } catch (err) {
    if (err instanceof EditorError) return errorResult(id, err.message);
    // The server's own answers about a path (missing, a directory, not a file) are the model's to fix.
    if (err instanceof NotFoundError) return errorResult(id, `The path ${String(input.path)} does not exist.`);
    if (err instanceof BadRequestError) return errorResult(id, err.message);
    throw err;
  }
}

/**
 * Runs a background-process tool use (`start_process`, `read_process_output`, `expose_port`,
 * `kill_process`, defined by {@link processTools}). Bad input and an unknown pid come back as
 * `is_error` results; `read_process_output` is cut in the middle past `maxOutputChars`.
 *
 * @example
 * ```ts
 * await handleProcessToolUse({ type: 'tool_use', id: 'toolu_04', name: 'start_process', input: { command: 'python3 -m http.server' } }, sandbox);
 * // content: [{ type: 'text', text: '{"pid":42}' }]
 * ```
 */
export async function handleProcessToolUse(block: ToolUseBlockLike, sandbox: Sandbox, options: ToolUseOptions = {}): Promise<ToolResult> {
  const { id, input } = checkToolUse(block);
  try {
    return textResult(id, await runProcessTool(block.name, input, sandbox, options.maxOutputChars), false);
  } catch (err) {
    if (err instanceof ProcessToolInputError) return errorResult(id, err.message);
    if (err instanceof NotFoundError) return errorResult(id, `No background process with pid ${String(input.pid)} in this sandbox.`);
    throw err;
  }
}

/**
 * Runs any of the tools (the three of {@link podflareTools}, the four of {@link processTools}), chosen
 * by `block.name`. A tool use for another tool gets an
 * `is_error` result (check {@link isPodflareToolUse} first when the conversation has tools of yours).
 *
 * @example
 * ```ts
 * for (const block of reply.content) if (block.type === 'tool_use') results.push(await handleToolUse(block, sandbox));
 * ```
 */
export async function handleToolUse(block: ToolUseBlockLike, sandbox: Sandbox, options: ToolUseOptions = {}): Promise<ToolResult> {
  switch (toolKind(block.name, options)) {
    case 'code':
      return handleCodeExecutionToolUse(block, sandbox, options);
    case 'bash':
      return handleBashToolUse(block, sandbox, options);
    case 'editor':
      return handleTextEditorToolUse(block, sandbox, options);
    case 'process':
      return handleProcessToolUse(block, sandbox, options);
    default:
      return errorResult(
        checkToolUse(block).id,
        `Unknown tool "${block.name}": the available tools are ${options.codeToolName ?? CODE_EXECUTION_TOOL_NAME}, ${BASH_TOOL_NAME}, ` +
          `${TEXT_EDITOR_TOOL_NAME} and ${Object.values(PROCESS_TOOL_NAMES).join(', ')}.`,
      );
  }
}

/**
 * Answers every `tool_use` block of an assistant message's content, in order (one sandbox runs one
 * call at a time anyway): the content of the next user message.
 *
 * @example
 * ```ts
 * if (reply.stop_reason === 'tool_use') messages.push({ role: 'user', content: await handleToolUses(reply.content, sandbox) });
 * ```
 */
export async function handleToolUses(
  content: ReadonlyArray<{ type: string }>,
  sandbox: Sandbox,
  options: ToolUseOptions = {},
): Promise<ToolResult[]> {
  const results: ToolResult[] = [];
  for (const block of content) {
    if (block.type === 'tool_use') results.push(await handleToolUse(block as ToolUseBlockLike, sandbox, options));
  }
  return results;
}

/** Whether a `tool_use` block is for one of the tools these handlers run. */
export function isPodflareToolUse(block: { name: string }, options: Pick<ToolUseOptions, 'codeToolName'> = {}): boolean {
  return toolKind(block.name, options) !== undefined;
}

function toolKind(name: string, options: Pick<ToolUseOptions, 'codeToolName'>): 'code' | 'bash' | 'editor' | 'process' | undefined {
  if (name === (options.codeToolName ?? CODE_EXECUTION_TOOL_NAME)) return 'code';
  if (name === BASH_TOOL_NAME) return 'bash';
  // str_replace_editor: the same editor's name for Claude 3.7 (text_editor_20250124).
  if (name === TEXT_EDITOR_TOOL_NAME || name === 'str_replace_editor') return 'editor';
  if (isProcessToolName(name)) return 'process';
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// The text editor
// ---------------------------------------------------------------------------------------------

/** A mistake in an editor command: reported to the model, never thrown to the caller. */
class EditorError extends Error {}

const SNIPPET_CONTEXT_LINES = 4;

async function runEditorCommand(input: Record<string, unknown>, sandbox: Sandbox, options: ToolUseOptions): Promise<string> {
  const command = input.command;
  const path = input.path;
  if (typeof path !== 'string' || path === '') throw new EditorError('The "path" input is required (an absolute path, e.g. /root/app.py).');
  const fileOptions = options.signal ? { signal: options.signal } : {};
  switch (command) {
    case 'view': {
      const stat = await sandbox.files.stat(path, fileOptions);
      if (stat.type === 'dir') {
        if (input.view_range !== undefined) throw new EditorError(`${path} is a directory: view_range only applies to files.`);
        return viewDirectory(sandbox, path, fileOptions);
      }
      const lines = splitLines(await readText(sandbox, path, fileOptions));
      let first = 1;
      let last = lines.length;
      if (input.view_range !== undefined) [first, last] = checkViewRange(input.view_range, lines.length);
      let shown = numberLines(lines.slice(first - 1, last), first);
      if (options.maxCharacters !== undefined && shown.length > options.maxCharacters) {
        shown = `${shown.slice(0, options.maxCharacters)}\n[… output truncated at ${options.maxCharacters} characters: use view_range to see the rest]`;
      }
      return `Here's the result of running \`cat -n\` on ${path}:\n${shown}`;
    }
    case 'create': {
      if (typeof input.file_text !== 'string') throw new EditorError('create needs a string "file_text" input.');
      const existed = await sandbox.files.exists(path, fileOptions);
      await sandbox.files.upload(path, input.file_text, fileOptions);
      return existed ? `File overwritten: ${path}` : `File created successfully at: ${path}`;
    }
    case 'str_replace': {
      if (typeof input.old_str !== 'string' || input.old_str === '') throw new EditorError('str_replace needs a non-empty string "old_str" input.');
      if (input.new_str !== undefined && typeof input.new_str !== 'string') throw new EditorError('"new_str" must be a string.');
      const oldStr = input.old_str;
      const newStr = input.new_str ?? '';
      const content = await readText(sandbox, path, fileOptions);
      const at = occurrences(content, oldStr);
      if (at.length === 0) {
        throw new EditorError(
          `No replacement was performed: old_str does not appear verbatim in ${path}. ` +
            'Check whitespace and indentation (view the file first).',
        );
      }
      if (at.length > 1) {
        const lines = at.map((i) => lineOf(content, i)).join(', ');
        throw new EditorError(
          `No replacement was performed: old_str occurs ${at.length} times in ${path} (at lines ${lines}). ` +
            'Include more surrounding lines in old_str so that it matches exactly one place.',
        );
      }
      const start = at[0]!;
      const updated = content.slice(0, start) + newStr + content.slice(start + oldStr.length);
      await sandbox.files.upload(path, updated, fileOptions);
      const firstLine = lineOf(updated, start);
      return editedMessage(path, updated, firstLine, firstLine + countNewlines(newStr));
    }
    case 'insert': {
      const text = input.insert_text ?? input.new_str; // new_str: the field's name in older editor versions
      if (typeof text !== 'string') throw new EditorError('insert needs a string "insert_text" input.');
      const content = await readText(sandbox, path, fileOptions);
      const lines = splitLines(content);
      const after = input.insert_line;
      if (typeof after !== 'number' || !Number.isInteger(after) || after < 0 || after > lines.length) {
        throw new EditorError(`Invalid insert_line ${JSON.stringify(after)}: it must be an integer from 0 (the top) to ${lines.length} (the end of ${path}).`);
      }
      const inserted = splitLines(text);
      if (inserted.length === 0) inserted.push('');
      lines.splice(after, 0, ...inserted);
      // Keep the file's final newline (or its absence; an empty file gets one).
      const updated = lines.join('\n') + (content === '' || content.endsWith('\n') ? '\n' : '');
      await sandbox.files.upload(path, updated, fileOptions);
      return editedMessage(path, updated, after + 1, after + inserted.length);
    }
    case 'undo_edit':
      throw new EditorError(`undo_edit is not supported by ${TEXT_EDITOR_TOOL_TYPE}: make the reverse edit with str_replace.`);
    default:
      throw new EditorError(`Unknown command ${JSON.stringify(command)}: use view, create, str_replace or insert.`);
  }
}

async function readText(sandbox: Sandbox, path: string, fileOptions: { signal?: AbortSignal }): Promise<string> {
  const bytes = await sandbox.files.download(path, fileOptions);
  if (bytes.subarray(0, 8192).includes(0)) throw new EditorError(`${path} is a binary file; the text editor only handles text (use bash or execute_python).`);
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new EditorError(`${path} is not valid UTF-8 text; the text editor only handles UTF-8 (use bash or execute_python).`);
  }
}

/** Non-hidden entries two levels deep, directories marked with a trailing slash. */
async function viewDirectory(sandbox: Sandbox, path: string, fileOptions: { signal?: AbortSignal }): Promise<string> {
  const out: string[] = [];
  const visible = (entries: FileStat[]) =>
    entries.filter((e) => !e.name.startsWith('.')).sort((a, b) => a.name.localeCompare(b.name));
  for (const entry of visible(await sandbox.files.list(path, fileOptions))) {
    out.push(entry.type === 'dir' ? `${entry.path}/` : entry.path);
    if (entry.type !== 'dir') continue;
    try {
      for (const child of visible(await sandbox.files.list(entry.path, fileOptions))) out.push(child.type === 'dir' ? `${child.path}/` : child.path);
    } catch (err) {
      if (!(err instanceof NotFoundError || err instanceof BadRequestError)) throw err; // unreadable: skip
    }
  }
  return `Here are the files and directories up to 2 levels deep in ${path}, excluding hidden items:\n${out.join('\n') || '(empty)'}`;
}

function checkViewRange(range: unknown, lineCount: number): [number, number] {
  if (!Array.isArray(range) || range.length !== 2 || !range.every((n) => Number.isInteger(n))) {
    throw new EditorError('view_range must be two integers [start_line, end_line] (end_line -1 for the end of the file).');
  }
  const [start, end] = range as [number, number];
  if (start < 1 || start > Math.max(lineCount, 1)) {
    throw new EditorError(`Invalid view_range ${JSON.stringify(range)}: start_line must be from 1 to ${lineCount} (the file has ${lineCount} lines).`);
  }
  if (end !== -1 && end < start) throw new EditorError(`Invalid view_range ${JSON.stringify(range)}: end_line must be -1 or at least start_line.`);
  return [start, end === -1 ? lineCount : Math.min(end, lineCount)];
}

function editedMessage(path: string, content: string, firstLine: number, lastLine: number): string {
  const lines = splitLines(content);
  const from = Math.max(1, firstLine - SNIPPET_CONTEXT_LINES);
  const to = Math.min(lines.length, lastLine + SNIPPET_CONTEXT_LINES);
  return (
    `The file ${path} has been edited. Here's the result of running \`cat -n\` on a snippet of ${path}:\n` +
    `${numberLines(lines.slice(from - 1, to), from)}\n` +
    'Review the changes and make sure they are as expected. Edit the file again if necessary.'
  );
}

/** Lines without their terminators; a final newline does not start another line. */
function splitLines(text: string): string[] {
  if (text === '') return [];
  return (text.endsWith('\n') ? text.slice(0, -1) : text).split('\n');
}

function numberLines(lines: string[], first: number): string {
  return lines.map((line, i) => `${String(first + i).padStart(6)}\t${line}`).join('\n');
}

function occurrences(text: string, needle: string): number[] {
  const at: number[] = [];
  for (let i = text.indexOf(needle); i !== -1; i = text.indexOf(needle, i + needle.length)) at.push(i);
  return at;
}

/** 1-based line number of a character offset. */
function lineOf(text: string, offset: number): number {
  return countNewlines(text.slice(0, offset)) + 1;
}

function countNewlines(text: string): number {
  let n = 0;
  for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) n++;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

function checkToolUse(block: ToolUseBlockLike): { id: string; input: Record<string, unknown> } {
  if (block === null || typeof block !== 'object' || (block.type !== undefined && block.type !== 'tool_use')) {
    throw new TypeError(`expected a tool_use block, got ${block === null ? 'null' : typeof block === 'object' ? `a ${String(block.type)} block` : typeof block}`);
  }
  if (typeof block.id !== 'string' || block.id === '') throw new TypeError('the tool_use block has no id');
  const input = block.input !== null && typeof block.input === 'object' && !Array.isArray(block.input) ? (block.input as Record<string, unknown>) : {};
  return { id: block.id, input };
}

function textResult(id: string, text: string, isError: boolean): ToolResult {
  return { type: 'tool_result', tool_use_id: id, content: [{ type: 'text', text: text === '' ? NO_OUTPUT : text }], is_error: isError };
}

function errorResult(id: string, message: string): ToolResult {
  return textResult(id, message, true);
}
