/**
 * What the framework adapters' background-process tools do (start a process, read its output from an
 * offset, stop it, expose a port) and what the model is told about them, shared so every adapter
 * behaves and reads the same as the MCP server's `start_process`/`read_process_output`/… tools. Kept
 * free of any framework import so every adapter can use it without pulling in another's peer dependency.
 */
import type { Sandbox } from '../sandbox.js';
import { DEFAULT_MAX_OUTPUT_CHARS, NO_OUTPUT, truncateMiddle } from './format.js';

/** What the model is told about each tool (the same wording as the MCP server's). */
export const PROCESS_TOOL_DESCRIPTIONS = {
  startProcess:
    'Start a shell command in the background (a dev server, a test watcher, a long build) and return its pid at once. ' +
    'It keeps running beside the code-running tool; read its output with the read-process-output tool, stop it with ' +
    'the kill-process tool.',
  readProcessOutput:
    'Read what a background process wrote (stdout and stderr in order) from an offset: pass the nextOffset of the ' +
    'previous call to get only what is new. Says whether it is still running and its exit code.',
  exposePort:
    'Get a URL through which a person (or a browser) reaches a server listening on a port inside the sandbox, e.g. a ' +
    'dev server started in the background. Anyone with the URL reaches that port only, until it expires.',
  killProcess: 'Stop a background process and everything it started.',
} as const;

/** The largest pid a Linux kernel hands out: the bound of the tools' `pid` input. */
export const MAX_PID = 4_194_304;
/** The longest an exposed URL may work: the server's bound. */
export const MAX_EXPOSE_SECONDS = 7 * 24 * 3600;

/** What starting a background process returns. */
export interface StartedProcess {
  pid: number;
}

/** What reading a background process's output returns. */
export interface ProcessOutputRead {
  pid: number;
  /** Stdout and stderr in the order written, cut in the middle past the bound (see {@link readProcessOutput}). */
  output: string;
  /** Pass it as the next call's offset to get only what is new. */
  nextOffset: number;
  running: boolean;
  /** The exit code once it ended (128 + signal when killed), else null. */
  exitCode: number | null;
  /** Characters the sandbox's log had already dropped before the offset asked for (0 usually). */
  droppedChars: number;
}

/** What exposing a port returns. */
export interface ExposedPort {
  url: string;
  /** ISO 8601. */
  expiresAt: string;
}

/** What killing a background process returns. */
export interface KilledProcess {
  pid: number;
  /** False when it had already ended. */
  killed: boolean;
}

/** Starts `command` with `bash -c` in the background and returns its pid without waiting. */
export async function startProcess(sandbox: Sandbox, command: string, cwd?: string): Promise<StartedProcess> {
  const handle = await sandbox.commands.run(command, { background: true, cwd });
  // The process keeps running in the sandbox; only this client's output stream is let go.
  handle.disconnect();
  return { pid: handle.pid };
}

/**
 * Reads what the process wrote from `offset` (what is kept now, without waiting for more), its
 * state, and the offset to read from next. Past `maxChars` the output is cut in the middle, like an
 * execution's; `nextOffset` still points past everything read, so nothing is shown twice.
 */
export async function readProcessOutput(
  sandbox: Sandbox, pid: number, offset = 0, maxChars = DEFAULT_MAX_OUTPUT_CHARS,
): Promise<ProcessOutputRead> {
  let output = '';
  let nextOffset = offset;
  let droppedChars = 0;
  for await (const ev of sandbox.commands.output(pid, { offset })) {
    if (ev.type === 'stdout' || ev.type === 'stderr') {
      output += ev.data;
      nextOffset = ev.offset + ev.data.length;
    } else if (ev.type === 'lost') {
      droppedChars += ev.data;
    }
  }
  const info = await sandbox.commands.get(pid);
  return { pid, output: truncateMiddle(output, maxChars), nextOffset, running: info.running, exitCode: info.exitCode, droppedChars };
}

/** A signed URL to `port` in the sandbox (no API key needed to use it), valid for `expiresInSeconds`. */
export async function exposePort(sandbox: Sandbox, port: number, expiresInSeconds?: number): Promise<ExposedPort> {
  const { url, expiresAt } = await sandbox.getPortUrl(port, { expiresInSeconds });
  return { url, expiresAt: expiresAt.toISOString() };
}

/** Stops the process and everything it started. */
export async function killProcess(sandbox: Sandbox, pid: number): Promise<KilledProcess> {
  return { pid, killed: await sandbox.commands.kill(pid) };
}

/** The text a model is shown of a {@link readProcessOutput}: a JSON head line, then the output. */
export function formatProcessOutput(read: ProcessOutputRead): string {
  const head = JSON.stringify({
    pid: read.pid, running: read.running, exitCode: read.exitCode, nextOffset: read.nextOffset,
    ...(read.droppedChars ? { droppedChars: read.droppedChars } : {}),
  });
  return `${head}\n${read.output === '' ? NO_OUTPUT : read.output}`;
}

/** The text a model is shown of a {@link killProcess}. */
export function formatKilled(killed: KilledProcess): string {
  return killed.killed ? `Killed process ${killed.pid}.` : `Process ${killed.pid} had already ended.`;
}
