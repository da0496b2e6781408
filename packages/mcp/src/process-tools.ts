/**
 * MCP tools for background processes: start one (a dev server, a watcher), read its output from an
 * offset (so an agent polls without missing or repeating anything kept), and stop it.
 */
import type { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { z } from 'zod';
import { clip, errorResult, textResult } from './format.js';
import type { SandboxSession } from './session.js';

/** What the tool registry hands over: the session, the sandbox_id schema and its description suffix. */
export interface ProcessToolContext {
  session: SandboxSession;
  target: z.ZodOptional<z.ZodString>;
  own: string;
  maxOutputChars: number;
}

const pid = z.number().int().min(1).max(4_194_304).describe('The process id returned by start_process');

export function registerProcessTools(server: McpServer, ctx: ProcessToolContext): void {
  const { session, target, own, maxOutputChars } = ctx;
  const guard = async (body: () => Promise<ReturnType<typeof textResult>>) => {
    try {
      return await body();
    } catch (err) {
      return errorResult(err);
    }
  };

  server.registerTool(
    'start_process',
    {
      title: 'Start background process',
      description:
        'Start a shell command in the background (a dev server, a test watcher, a long build) and return its pid at once. ' +
        'It keeps running beside run_python/run_bash; read its output with read_process_output, stop it with kill_process. ' +
        'Forked sandboxes do not get it.' + own,
      inputSchema: {
        sandbox_id: target,
        command: z.string().min(1).max(1024 * 1024).describe('The command line, run with bash -c, e.g. "python3 -m http.server 8000"'),
        cwd: z.string().min(1).max(4096).optional().describe('Working directory. Default: /root'),
      },
      annotations: { readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: true },
    },
    async ({ sandbox_id, command, cwd }) =>
      guard(async () => {
        const { value } = await session.withSandbox(sandbox_id, (s) => s.commands.run(command, { background: true, cwd }));
        value.disconnect();
        return textResult(JSON.stringify({ pid: value.pid }));
      }),
  );

  server.registerTool(
    'read_process_output',
    {
      title: 'Read process output',
      description:
        'Read what a background process wrote (stdout and stderr in order) from an offset: pass the next_offset of the ' +
        'previous call to get only what is new. Says whether it is still running and its exit code.' + own,
      inputSchema: {
        sandbox_id: target,
        pid,
        offset: z.number().int().min(0).optional().describe('Where to start reading. Default: 0 (everything still kept)'),
      },
      annotations: { readOnlyHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, pid: processId, offset }) =>
      guard(async () => {
        const { value } = await session.withSandbox(sandbox_id, async (s) => {
          let text = '';
          let next = offset ?? 0;
          let lost = 0;
          for await (const ev of s.commands.output(processId, { offset: next })) {
            if (ev.type === 'stdout' || ev.type === 'stderr') {
              text += ev.data;
              next = ev.offset + ev.data.length;
            } else if (ev.type === 'lost') lost += ev.data;
          }
          const info = await s.commands.get(processId);
          return { text, next, lost, info };
        });
        const head = JSON.stringify({
          pid: processId, running: value.info.running, exit_code: value.info.exitCode, next_offset: value.next,
          ...(value.lost ? { dropped_chars: value.lost } : {}),
        });
        return textResult(`${head}\n${clip(value.text, maxOutputChars)}`);
      }),
  );

  server.registerTool(
    'expose_port',
    {
      title: 'Expose port',
      description:
        'Get a URL through which a person (or a browser) reaches a server listening on a port inside the sandbox, e.g. a ' +
        'dev server started with start_process. Anyone with the URL reaches that port only, until it expires.' + own,
      inputSchema: {
        sandbox_id: target,
        port: z.number().int().min(1).max(65535).describe('The port the server listens on inside the sandbox (on 127.0.0.1 or 0.0.0.0)'),
        expires_in_seconds: z.number().int().min(1).max(7 * 24 * 3600).optional().describe('How long the URL works. Default: 3600'),
      },
      annotations: { readOnlyHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, port, expires_in_seconds }) =>
      guard(async () => {
        const { value } = await session.withSandbox(sandbox_id, (s) => s.getPortUrl(port, { expiresInSeconds: expires_in_seconds }));
        return textResult(JSON.stringify({ url: value.url, expires_at: value.expiresAt.toISOString() }));
      }),
  );

  server.registerTool(
    'kill_process',
    {
      title: 'Kill process',
      description: 'Stop a background process and everything it started.' + own,
      inputSchema: { sandbox_id: target, pid },
      annotations: { readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    async ({ sandbox_id, pid: processId }) =>
      guard(async () => {
        const { value } = await session.withSandbox(sandbox_id, (s) => s.commands.kill(processId));
        return textResult(value ? `Killed process ${processId}.` : `Process ${processId} had already ended.`);
      }),
  );
}
