/**
 * Commands: shell commands that run beside the interpreter, in the foreground (wait for the result)
 * or in the background (a handle: stream output, write stdin, kill, reconnect by pid later). Shaped
 * like E2B's `sandbox.commands`.
 *
 * Output is kept in a bounded log per process in the sandbox (1 MiB of characters by default), each
 * character at an offset: {@link Commands.connect} from another process or after a restart reads
 * from offset 0 and gets everything still kept. A fork's children do not get their parent's
 * processes.
 */
import type { Client, RequestSpec } from './client.js';
import { parseNdjson } from './ndjson.js';

/** A background process as the server describes it. */
export interface ProcessInfo {
  pid: number;
  cmd: string;
  cwd: string;
  running: boolean;
  /** The exit code once it ended (128 + signal when killed). */
  exitCode: number | null;
  startedAt: Date;
  endedAt: Date | null;
  /** Offsets of the oldest character still kept, and just past the newest. */
  logStart: number;
  logEnd: number;
}

/** What a finished command produced. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  /** Characters the sandbox's log had dropped before they were read (0 unless the reader fell far behind). */
  lost: number;
}

/** Options of {@link Commands.run}. */
export interface CommandStartOptions {
  /** Working directory. @default the interpreter's current directory (`/root` at first) */
  cwd?: string;
  /** Extra environment variables. */
  envs?: Record<string, string>;
  /** Called with each piece of stdout as it arrives. */
  onStdout?: (data: string) => void;
  /** Called with each piece of stderr as it arrives. */
  onStderr?: (data: string) => void;
  /** Characters of output the sandbox keeps for this process. @default 1048576 */
  logChars?: number;
  /** Send SIGKILL to the process if it runs longer (foreground only). */
  timeoutMs?: number;
}

/** Options of {@link Commands.connect}. */
export interface CommandConnectOptions {
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  /** Start reading at this offset. @default 0 (everything still kept) */
  offset?: number;
}

/** One event of a process's output stream. */
export type ProcessOutputEvent =
  | { type: 'stdout' | 'stderr'; data: string; offset: number }
  | { type: 'lost'; data: number; offset: number }
  | { type: 'exit'; data: number; offset: number };

interface WireProcessInfo {
  pid: number; cmd: string; cwd: string; running: boolean; exit_code: number | null;
  started_at: number; ended_at: number | null; log_start: number; log_end: number;
}

function toProcessInfo(w: WireProcessInfo): ProcessInfo {
  return {
    pid: w.pid, cmd: w.cmd, cwd: w.cwd, running: w.running, exitCode: w.exit_code,
    startedAt: new Date(w.started_at * 1000), endedAt: w.ended_at === null ? null : new Date(w.ended_at * 1000),
    logStart: w.log_start, logEnd: w.log_end,
  };
}

/**
 * A running (or finished) background process. Its output is collected as it streams in; `wait()`
 * resolves when it has ended.
 */
export class CommandHandle {
  /** The process id inside the sandbox: pass it to {@link Commands.connect} to reattach later. */
  readonly pid: number;
  #stdout = '';
  #stderr = '';
  #lost = 0;
  readonly #commands: Commands;
  readonly #done: Promise<CommandResult>;
  readonly #abort = new AbortController();

  /** @internal Made by {@link Commands.run} and {@link Commands.connect}. */
  constructor(commands: Commands, pid: number, opts: CommandConnectOptions) {
    this.#commands = commands;
    this.pid = pid;
    this.#done = (async () => {
      let exitCode = -1;
      for await (const ev of commands.output(pid, { offset: opts.offset ?? 0, follow: true, signal: this.#abort.signal })) {
        if (ev.type === 'stdout') { this.#stdout += ev.data; opts.onStdout?.(ev.data); }
        else if (ev.type === 'stderr') { this.#stderr += ev.data; opts.onStderr?.(ev.data); }
        else if (ev.type === 'lost') this.#lost += ev.data;
        else exitCode = ev.data as number;
      }
      return { stdout: this.#stdout, stderr: this.#stderr, exitCode, lost: this.#lost };
    })();
    // A handle nobody waits on must not produce an unhandled rejection.
    this.#done.catch(() => undefined);
  }

  /** stdout so far. */
  get stdout(): string { return this.#stdout; }
  /** stderr so far. */
  get stderr(): string { return this.#stderr; }

  /**
   * Resolves once the process has ended and all its output was read.
   * @example
   * ```ts
   * const server = await sandbox.commands.run('python3 -m http.server 8000', { background: true });
   * await server.kill();
   * const { exitCode } = await server.wait();   // 137
   * ```
   */
  wait(): Promise<CommandResult> {
    return this.#done;
  }

  /** Kills the process and everything it started (SIGKILL to its process group). */
  kill(): Promise<boolean> {
    return this.#commands.kill(this.pid);
  }

  /** Writes to the process's stdin. */
  sendStdin(data: string): Promise<void> {
    return this.#commands.sendStdin(this.pid, data);
  }

  /** Stops following the output here (the process keeps running). */
  disconnect(): void {
    this.#abort.abort();
  }
}

/**
 * Shell commands in one sandbox, reached as `sandbox.commands`.
 *
 * @example
 * ```ts
 * const { stdout } = await sandbox.commands.run('ls /');
 * const dev = await sandbox.commands.run('npm run dev', { background: true, cwd: '/root/app', onStdout: console.log });
 * for (const p of await sandbox.commands.list()) console.log(p.pid, p.cmd, p.running);
 * await dev.kill();
 * ```
 */
export class Commands {
  readonly #client: Client;
  readonly #base: string;

  /** @internal Made by the Sandbox; use `sandbox.commands`. */
  constructor(client: Client, sandboxId: string) {
    this.#client = client;
    this.#base = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/processes`;
  }

  /**
   * Starts `cmd` (run by `bash -c`). With `background: true` resolves at once with a
   * {@link CommandHandle}; otherwise waits for it to end and resolves with its output and exit code.
   */
  run(cmd: string, options: CommandStartOptions & { background: true }): Promise<CommandHandle>;
  run(cmd: string, options?: CommandStartOptions & { background?: false }): Promise<CommandResult>;
  async run(cmd: string, options: CommandStartOptions & { background?: boolean } = {}): Promise<CommandHandle | CommandResult> {
    const body: Record<string, unknown> = { cmd };
    if (options.cwd !== undefined) body.cwd = options.cwd;
    if (options.envs !== undefined) body.env = options.envs;
    if (options.logChars !== undefined) body.log_chars = options.logChars;
    const info = await this.#client.json<WireProcessInfo>({ method: 'POST', path: this.#base, json: body });
    const handle = new CommandHandle(this, info.pid, options);
    if (options.background) return handle;
    const timer = options.timeoutMs === undefined ? undefined : setTimeout(() => void handle.kill().catch(() => undefined), options.timeoutMs);
    try {
      return await handle.wait();
    } finally {
      clearTimeout(timer);
    }
  }

  /** The sandbox's background processes, running and recently ended. */
  async list(): Promise<ProcessInfo[]> {
    const answer = await this.#client.json<{ processes: WireProcessInfo[] }>({ method: 'GET', path: this.#base });
    return answer.processes.map(toProcessInfo);
  }

  /** One process. @throws {NotFoundError} for an unknown pid. */
  async get(pid: number): Promise<ProcessInfo> {
    return toProcessInfo(await this.#client.json<WireProcessInfo>({ method: 'GET', path: `${this.#base}/${pid}` }));
  }

  /** Reattaches to a background process (its output from `offset`, 0 by default). */
  async connect(pid: number, options: CommandConnectOptions = {}): Promise<CommandHandle> {
    await this.get(pid);
    return new CommandHandle(this, pid, options);
  }

  /** Kills a process and its process group (SIGKILL); false if it had already ended. */
  async kill(pid: number): Promise<boolean> {
    return this.signal(pid, 'SIGKILL');
  }

  /** Sends a signal to a process's group; false if it had already ended. */
  async signal(pid: number, signal: string = 'SIGTERM'): Promise<boolean> {
    const answer = await this.#client.json<{ delivered: boolean }>({ method: 'POST', path: `${this.#base}/${pid}/signal`, json: { signal } });
    return answer.delivered;
  }

  /** Writes text to a process's stdin; `eof: true` closes it afterwards. */
  async sendStdin(pid: number, data: string, options: { eof?: boolean } = {}): Promise<void> {
    await this.#client.empty({ method: 'POST', path: `${this.#base}/${pid}/stdin`, json: { data, eof: options.eof ?? false } });
  }

  /** Closes a process's stdin (after what was written so far). */
  async closeStdin(pid: number): Promise<void> {
    await this.sendStdin(pid, '', { eof: true });
  }

  /**
   * A process's output as events from `offset`; with `follow`, until it ends (then an `exit`
   * event), else what is kept now.
   */
  async *output(pid: number, options: { offset?: number; follow?: boolean; signal?: AbortSignal } = {}): AsyncGenerator<ProcessOutputEvent, void, undefined> {
    const spec: RequestSpec = {
      method: 'GET', path: `${this.#base}/${pid}/output`,
      query: { offset: options.offset ?? 0, follow: options.follow ?? false },
      signal: options.signal, timeoutScope: 'connect',
    };
    const res = await this.#client.request(spec);
    try {
      for await (const ev of parseNdjson<ProcessOutputEvent>(res)) yield ev;
    } catch (err) {
      if (options.signal?.aborted) return;
      throw this.#client.wrapError(err, spec);
    } finally {
      if (!res.complete) res.destroy();
    }
  }
}
