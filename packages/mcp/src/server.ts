/**
 * The Podflare MCP server: one {@link McpServer} per MCP session, exposing sandboxes as tools. It is
 * transport-agnostic — main.ts connects it to stdio or to a Streamable HTTP session — and holds no
 * module-level state, so any number can live in one process.
 */
import { readFileSync } from 'node:fs';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { CHECKPOINT_ID_PATTERN, SANDBOX_ID_PATTERN } from '@podflare/protocol/sandbox';
import { Client } from 'podflare';
import type { Sandbox } from 'podflare';
import { z } from 'zod';
import { runBounded } from './bounded-exec.js';
import { downloadResult, errorResult, executionResult, textResult } from './format.js';
import { SandboxSession } from './session.js';
import { registerProcessTools } from './process-tools.js';

/** Options of {@link createPodflareMcpServer}. */
export interface PodflareMcpServerOptions {
  /**
   * Base URL of the Podflare server.
   * @default process.env.PODFLARE_HOST, else http://127.0.0.1:7070
   */
  host?: string;
  /**
   * API key for the Podflare server.
   * @default process.env.PODFLARE_API_KEY
   */
  apiKey?: string;
  /** A Client to share between sessions (one connection pool); `host` and `apiKey` are then ignored. */
  client?: Client;
  /**
   * Give the session a sandbox of its own, created on first use and destroyed when the session ends,
   * so tools may leave `sandbox_id` out. With false, `sandbox_id` is required.
   * @default true
   */
  sessionSandbox?: boolean;
  /**
   * Idle timeout of the sandboxes the session creates, in seconds.
   * @default the Podflare server's default (300)
   */
  idleTimeoutSeconds?: number;
  /**
   * Longest stdout, stderr or result text returned to the model, in characters; the middle of
   * longer ones is cut.
   * @default 50000
   */
  maxOutputChars?: number;
  /**
   * Largest file `download` returns, in bytes.
   * @default 8388608 (8 MiB)
   */
  maxDownloadBytes?: number;
  /**
   * Serve one stateless request (a JSON-RPC POST without an MCP session): there is no session
   * sandbox, so `sandbox_id` is required, and the sandboxes `create_sandbox` and `fork` make are
   * not destroyed when the server closes — they persist for later requests until `destroy_sandbox`
   * or the Podflare server's idle timeout. Implies `sessionSandbox: false`.
   * @default false
   */
  stateless?: boolean;
  /** Where diagnostics go. Must not be stdout under stdio (that is the protocol channel). @default stderr */
  log?: (message: string) => void;
}

const DEFAULT_MAX_OUTPUT_CHARS = 50_000;
const DEFAULT_MAX_DOWNLOAD_BYTES = 8 * 1024 * 1024;
/** As the REST API's limit on `timeout_ms`. */
const MAX_TIMEOUT_MS = 24 * 60 * 60 * 1000;

export const SERVER_NAME = 'podflare';
export const SERVER_VERSION = readVersion();

const INSTRUCTIONS = `Podflare runs code in isolated Linux sandboxes with a persistent Python interpreter.
- run_python keeps variables, imports and open files between calls; run_bash runs a fresh bash -c in the same filesystem.
- Leave sandbox_id out to use this session's own sandbox (created on first use, destroyed when the session ends).
- To try alternatives, fork a sandbox into n copies, run a different approach in each, compare them with diff, and keep the best with merge_into(parent, winner).
- Before a risky step, checkpoint the sandbox; if the step goes wrong, rewind to that checkpoint (memory and files come back in milliseconds).
- Move files with upload and download; destroy sandboxes you created with destroy_sandbox when done.`;

const sandboxId = z.string().regex(SANDBOX_ID_PATTERN, 'must be a sandbox id: "sbx_" followed by 32 hex digits');
const path = z.string().min(1).max(4096).describe('Absolute path inside the sandbox, e.g. /root/data.csv');
const timeoutMs = z
  .number()
  .int()
  .min(1)
  .max(MAX_TIMEOUT_MS)
  .optional()
  .describe('Stop the code after this many milliseconds (exit code 124). Default: no limit beyond the server\'s');

/**
 * The MCP server of one session. Closing it (or its transport closing) ends the session: its own
 * sandbox and every sandbox it created are destroyed.
 */
export class PodflareMcpServer extends McpServer {
  /** The sandboxes this session works with. */
  readonly session: SandboxSession;

  constructor(options: PodflareMcpServerOptions = {}) {
    super({ name: SERVER_NAME, version: SERVER_VERSION }, { instructions: INSTRUCTIONS, capabilities: { tools: {} } });
    const log = options.log ?? ((message: string) => process.stderr.write(`podflare-mcp: ${message}\n`));
    const client = options.client ?? new Client({ host: options.host, apiKey: options.apiKey });
    const stateless = options.stateless === true;
    const sessionSandbox = !stateless && (options.sessionSandbox ?? true);
    this.session = new SandboxSession({
      client,
      sessionSandbox,
      keepSandboxes: stateless,
      idleTimeoutSeconds: options.idleTimeoutSeconds,
      log,
    });
    registerTools(this, this.session, {
      sessionSandbox,
      stateless,
      maxOutputChars: options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS,
      maxDownloadBytes: options.maxDownloadBytes ?? DEFAULT_MAX_DOWNLOAD_BYTES,
    });
    // The transport closing from the other side (stdin closed, HTTP session deleted) ends the session.
    this.server.onclose = () => {
      void this.session.dispose();
    };
    this.server.onerror = (err) => log(`protocol error: ${err.message}`);
  }

  /** Closes the transport, then destroys the session's sandboxes (resolving once they are gone). */
  override async close(): Promise<void> {
    try {
      await super.close();
    } finally {
      await this.session.dispose();
    }
  }
}

/**
 * Makes the MCP server of one session, with the tools `create_sandbox`, `run_python`, `run_bash`,
 * `fork`, `diff`, `merge_into`, `checkpoint`, `rewind`, `upload`, `download` and `destroy_sandbox`. Connect it to a transport
 * with `connect()`; one server serves one session.
 *
 * @example
 * ```ts
 * import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
 * import { createPodflareMcpServer } from '@podflare/mcp';
 *
 * const server = createPodflareMcpServer({ host: 'http://127.0.0.1:7070' });
 * await server.connect(new StdioServerTransport());
 * // later: await server.close();  // destroys the session's sandboxes
 * ```
 */
export function createPodflareMcpServer(options: PodflareMcpServerOptions = {}): PodflareMcpServer {
  return new PodflareMcpServer(options);
}

interface ToolSettings {
  sessionSandbox: boolean;
  stateless: boolean;
  maxOutputChars: number;
  maxDownloadBytes: number;
}

function registerTools(server: McpServer, session: SandboxSession, settings: ToolSettings): void {
  const { sessionSandbox, maxOutputChars } = settings;
  // With a session sandbox the id may be left out; without one the schema says it is required. (The
  // cast only merges the two types; handlers treat a missing id either way.)
  const target = (
    sessionSandbox
      ? sandboxId.optional().describe("The sandbox to use. Leave out to use this session's own sandbox (created on first use).")
      : sandboxId.describe('The sandbox to use (from create_sandbox or fork).')
  ) as z.ZodOptional<typeof sandboxId>;
  const own = sessionSandbox ? ' Without sandbox_id, uses this session\'s own sandbox.' : '';

  server.registerTool(
    'create_sandbox',
    {
      title: 'Create sandbox',
      description:
        'Start a new sandbox (a Linux machine with Python and bash) and return its id. ' +
        (settings.stateless
          ? 'It lives until destroy_sandbox, or until it has been idle for the server\'s idle timeout: pass its id to later calls.'
          : 'It is destroyed when this session ends, or with destroy_sandbox.') +
        (sessionSandbox ? " Not needed for a single workspace: tools without sandbox_id use this session's own sandbox." : ''),
      inputSchema: {
        template: z.string().min(1).max(64).optional().describe('Image template to start from. Default: the server\'s default template'),
        egress: z.boolean().optional().describe('Allow outbound network access. Default: true'),
        allow_hosts: z.array(z.string().min(1).max(260)).max(256).optional().describe(
          'Restrict outbound network to these hosts only, through the server\'s policy proxy: "example.com", ' +
          '"*.example.com" or an address/CIDR such as "10.0.0.0/8". Denied attempts are recorded by the server.',
        ),
      },
      annotations: { readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },
    },
    async ({ template, egress, allow_hosts }) =>
      guard(async () => {
        if (allow_hosts && egress === false) throw new Error('allow_hosts needs network access: leave egress out or set it to true');
        const sandbox = await session.create({ template, egress: allow_hosts ? { allow: allow_hosts } : egress });
        return textResult(JSON.stringify({ sandbox_id: sandbox.id }));
      }),
  );

  server.registerTool(
    'run_python',
    {
      title: 'Run Python',
      description:
        'Run Python code in a persistent interpreter: variables, imports, open files and the working directory ' +
        'persist between calls. Returns stdout, stderr, the value of the last expression, figures (matplotlib) as ' +
        'images, and the exit code; an exception or non-zero exit is reported as a tool error.' +
        own,
      inputSchema: {
        sandbox_id: target,
        code: z.string().max(4 * 1024 * 1024).describe('Python source to run, as in a notebook cell'),
        timeout_ms: timeoutMs,
      },
      annotations: { readOnlyHint: false, destructiveHint: false, openWorldHint: true },
    },
    async ({ sandbox_id, code, timeout_ms }, extra) =>
      guard(async () => {
        const { value, note } = await session.withSandbox(sandbox_id, (s) =>
          runBounded(s, { code, language: 'python', timeoutMs: timeout_ms, signal: extra.signal }, maxOutputChars),
        );
        return executionResult(value.execution, { maxOutputChars, note, cut: value.cut, droppedResults: value.droppedResults });
      }),
  );

  server.registerTool(
    'run_bash',
    {
      title: 'Run bash',
      description:
        'Run a shell command with bash -c in the sandbox (a fresh shell each call; files persist). Returns stdout, ' +
        'stderr and the exit code; a non-zero exit is reported as a tool error.' +
        own,
      inputSchema: {
        sandbox_id: target,
        command: z.string().max(4 * 1024 * 1024).describe('The command line, e.g. "pip install requests && ls -la /root"'),
        timeout_ms: timeoutMs,
      },
      annotations: { readOnlyHint: false, destructiveHint: false, openWorldHint: true },
    },
    async ({ sandbox_id, command, timeout_ms }, extra) =>
      guard(async () => {
        const { value, note } = await session.withSandbox(sandbox_id, (s) =>
          runBounded(s, { code: command, language: 'bash', timeoutMs: timeout_ms, signal: extra.signal }, maxOutputChars),
        );
        return executionResult(value.execution, { maxOutputChars, note, cut: value.cut, droppedResults: value.droppedResults });
      }),
  );

  server.registerTool(
    'fork',
    {
      title: 'Fork sandbox',
      description:
        'Copy a sandbox n times: each child starts with the interpreter memory (variables, imports) and files the ' +
        'sandbox has now, then evolves on its own. Returns the children\'s ids. Use it to try alternatives in ' +
        'parallel, then diff and merge_into the best.' +
        own,
      inputSchema: {
        sandbox_id: target,
        n: z.number().int().min(1).max(32).default(1).describe('How many children, 1 to 32. Default: 1'),
      },
      annotations: { readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },
    },
    async ({ sandbox_id, n }) =>
      guard(async () => {
        const { value: children, note } = await session.withSandbox(sandbox_id, async (s) => {
          const made = await s.fork(n);
          session.adoptAll(made);
          return { parent: s.id, children: made.map((c) => c.id) };
        });
        return withNote(textResult(JSON.stringify(children)), note);
      }),
  );

  server.registerTool(
    'diff',
    {
      title: 'Diff sandboxes',
      description:
        'Compare two sandboxes (typically a parent and a fork child): files added, removed and modified in other_id ' +
        'relative to sandbox_id, optionally unified diffs of changed text files and the interpreter variables that differ.' +
        own,
      inputSchema: {
        sandbox_id: target,
        other_id: sandboxId.describe('The sandbox to compare with'),
        paths: z
          .array(z.string().min(1).max(4096))
          .max(1000)
          .optional()
          .describe('Compare only under these absolute paths, e.g. ["/root"]. Default: everything'),
        content: z.boolean().optional().describe('Include a unified diff of each modified text file. Default: false'),
        vars: z.boolean().optional().describe('Include the Python variables that differ. Default: false'),
      },
      annotations: { readOnlyHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, other_id, paths, content, vars }) =>
      guard(async () => {
        const { value, note } = await session.withSandbox(sandbox_id, (s) =>
          s.diff(other_id, { paths, content: content === true, vars: vars === true }),
        );
        return withNote(textResult(JSON.stringify(value, null, 2)), note);
      }),
  );

  server.registerTool(
    'merge_into',
    {
      title: 'Merge a fork back',
      description:
        'Make parent take over winner\'s state (winner must be a fork descendant of parent): parent\'s id then runs ' +
        'winner\'s interpreter and files, and winner\'s id is retired. With paths, only those files are copied and ' +
        'both keep their interpreters.' +
        (sessionSandbox ? ' Without parent, uses this session\'s own sandbox.' : ''),
      inputSchema: {
        parent: (sessionSandbox
          ? sandboxId.optional().describe("The sandbox to merge into. Leave out for this session's own sandbox.")
          : sandboxId.describe('The sandbox to merge into')) as z.ZodOptional<typeof sandboxId>,
        winner: sandboxId.describe('The fork (child or deeper descendant of parent) whose state to keep'),
        paths: z
          .array(z.string().min(1).max(4096))
          .min(1)
          .max(1000)
          .optional()
          .describe('Copy only these absolute paths from winner (selective merge). Default: the whole state'),
      },
      annotations: { readOnlyHint: false, destructiveHint: true, idempotentHint: false, openWorldHint: false },
    },
    async ({ parent, winner, paths }) =>
      guard(async () => {
        const { value: parentId, note } = await session.withSandbox(parent, async (s) => {
          // A handle on the winner is not needed: the call names it by id, and a bad one is the server's 404.
          await s.mergeInto(winner, paths ? { paths } : {});
          return s.id;
        });
        if (paths) {
          return withNote(textResult(`Copied ${paths.join(', ')} from ${winner} into ${parentId}; both sandboxes live on.`), note);
        }
        session.retire(winner);
        return withNote(textResult(`${parentId} now has ${winner}'s state (interpreter and files); the id ${winner} is retired.`), note);
      }),
  );

  server.registerTool(
    'upload',
    {
      title: 'Upload file',
      description:
        'Write a file into the sandbox (parent directories are created): pass text as content, or bytes as ' +
        'content_base64.' +
        own,
      inputSchema: {
        sandbox_id: target,
        path,
        content: z.string().optional().describe('The file\'s text (written as UTF-8)'),
        content_base64: z.string().optional().describe('The file\'s bytes, base64 encoded (for binary files)'),
      },
      annotations: { readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, path: filePath, content, content_base64 }) =>
      guard(async () => {
        if ((content === undefined) === (content_base64 === undefined)) {
          return textResult('Pass exactly one of content (text) and content_base64 (bytes).', true);
        }
        let data: string | Buffer;
        if (content_base64 !== undefined) {
          const compact = content_base64.replace(/\s+/g, '');
          if (!/^[A-Za-z0-9+/_-]*={0,2}$/.test(compact)) return textResult('content_base64 is not valid base64.', true);
          data = Buffer.from(compact, compact.includes('-') || compact.includes('_') ? 'base64url' : 'base64');
        } else {
          data = content as string;
        }
        const { value, note } = await session.withSandbox(sandbox_id, (s) => s.upload(filePath, data));
        return withNote(textResult(`Wrote ${value.size} byte${value.size === 1 ? '' : 's'} to ${value.path}.`), note);
      }),
  );

  server.registerTool(
    'download',
    {
      title: 'Download file',
      description:
        'Read a file from the sandbox: text files come back as text, images as images, other binary files as ' +
        `base64. Files over ${formatBytes(settings.maxDownloadBytes)} are refused (read parts with run_bash).` +
        own,
      inputSchema: { sandbox_id: target, path },
      annotations: { readOnlyHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, path: filePath }) =>
      guard(async () => {
        const { value, note } = await session.withSandbox(sandbox_id, async (s) => readCapped(s, filePath, settings.maxDownloadBytes));
        return withNote(typeof value === 'string' ? textResult(value, true) : downloadResult(filePath, value), note);
      }),
  );

  server.registerTool(
    'checkpoint',
    {
      title: 'Checkpoint sandbox',
      description:
        'Save the sandbox\'s whole state now (interpreter variables, files, working directory, environment) in ' +
        'milliseconds, copy-on-write. Returns a checkpoint id: rewind with it to undo everything done since, as often ' +
        'as needed. Take one before a risky step (overwriting data, deleting files, installing packages).' +
        own,
      inputSchema: {
        sandbox_id: target,
        name: z.string().min(1).max(128).optional().describe('A label for the checkpoint, e.g. "before cleanup"'),
      },
      annotations: { readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },
    },
    async ({ sandbox_id, name }) =>
      guard(async () => {
        const { value, note } = await session.withSandbox(sandbox_id, async (s) => ({ sandbox_id: s.id, checkpoint_id: (await s.checkpoint(name)).id }));
        return withNote(textResult(JSON.stringify(value)), note);
      }),
  );

  server.registerTool(
    'rewind',
    {
      title: 'Rewind sandbox',
      description:
        'Undo: put the sandbox (same id) back to a checkpoint\'s state; the checkpoint stays, so it can be used again. ' +
        'Everything done since is undone: variables, files, working directory; sockets opened since are closed. ' +
        'Without checkpoint_id, undoes the last `steps` calls of a sandbox that keeps a history.' +
        own,
      inputSchema: {
        sandbox_id: target,
        checkpoint_id: z.string().regex(CHECKPOINT_ID_PATTERN, 'must be a checkpoint id from the checkpoint tool').optional()
          .describe('The checkpoint to go back to (from the checkpoint tool)'),
        steps: z.number().int().min(1).max(32).optional().describe('Without checkpoint_id: how many calls to undo. Default: 1'),
      },
      annotations: { readOnlyHint: false, destructiveHint: true, idempotentHint: false, openWorldHint: false },
    },
    async ({ sandbox_id, checkpoint_id, steps }) =>
      guard(async () => {
        if (checkpoint_id && steps !== undefined) throw new Error('give either checkpoint_id or steps, not both');
        const { value, note } = await session.withSandbox(sandbox_id, async (s) => {
          if (checkpoint_id) await s.restore(checkpoint_id);
          else await s.rewind(steps ?? 1);
          return s.id;
        });
        const what = checkpoint_id ? `checkpoint ${checkpoint_id}` : `its state ${steps ?? 1} call(s) ago`;
        return withNote(textResult(`${value} is back to ${what}.`), note);
      }),
  );

  server.registerTool(
    'destroy_sandbox',
    {
      title: 'Destroy sandbox',
      description: 'Destroy a sandbox and everything in it. Destroying one that is already gone is not an error.',
      inputSchema: { sandbox_id: sandboxId.describe('The sandbox to destroy') },
      annotations: { readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    async ({ sandbox_id }) =>
      guard(async () => {
        const destroyed = await session.destroy(sandbox_id);
        return textResult(destroyed ? `Destroyed ${sandbox_id}.` : `${sandbox_id} was already destroyed.`);
      }),
  );

  registerProcessTools(server, { session, target, own, maxOutputChars });
}

/** Runs a tool body, turning anything it throws into a tool error rather than a protocol error. */
async function guard(body: () => Promise<CallToolResult>): Promise<CallToolResult> {
  try {
    return await body();
  } catch (err) {
    return errorResult(err);
  }
}

function withNote(result: CallToolResult, note: string | undefined): CallToolResult {
  if (note) result.content.unshift({ type: 'text', text: `note: ${note}` });
  return result;
}

/** The file's bytes, or (as a string) why it was not read. */
async function readCapped(sandbox: Sandbox, filePath: string, maxBytes: number): Promise<Buffer | string> {
  const stat = await sandbox.files.stat(filePath);
  if (stat.type === 'dir') return `${filePath} is a directory: list it with run_bash (ls -la ${filePath}).`;
  if (stat.size > maxBytes) {
    return (
      `${filePath} is ${formatBytes(stat.size)}, over the ${formatBytes(maxBytes)} download limit: read part of it ` +
      `with run_bash (e.g. head -c 100000 ${filePath}) or summarise it with run_python.`
    );
  }
  // Read as a stream and stopped at the limit: the file may grow meanwhile (or its size be a lie).
  const stream = await sandbox.files.downloadStream(filePath);
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > maxBytes) return `${filePath} grew past the ${formatBytes(maxBytes)} download limit while being read.`;
      chunks.push(chunk);
    }
  } finally {
    stream.destroy();
  }
  return Buffer.concat(chunks);
}

function formatBytes(n: number): string {
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(n % (1024 * 1024) === 0 ? 0 : 1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(n % 1024 === 0 ? 0 : 1)} KiB`;
  return `${n} bytes`;
}

function readVersion(): string {
  try {
    return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return '0.0.0';
  }
}
