/**
 * Client of the process spawner (packages/server/host/podflare_spawner.py). Starting a child from
 * Node forks the whole server first, which blocks the event loop for milliseconds (more the bigger
 * the server); helper processes on latency paths (a fork child's slirp4netns) are started by that
 * small process instead, with posix_spawn. One spawner per server process, started on first use;
 * it dies with the server and takes its children with it.
 */
import { EventEmitter } from 'node:events';
import { HelperProcess } from './helper-process.js';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SPAWNER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../host/podflare_spawner.py');

export interface SpawnOptions {
  /** The child gets a pipe's write end at this fd; its first byte resolves `ready`. */
  readyFd?: number;
  /** The child gets a pipe's read end at this fd that stays open while the spawner lives. */
  exitFd?: number;
  /** Called with what the child writes on stderr, as it comes (else only its tail, at exit). */
  onStderr?: (text: string) => void;
  /** Scheduled as SCHED_BATCH: CPU-bound, so its wake-ups do not preempt what runs. */
  batch?: boolean;
  /** Memfds of the spawner's (createMemfd) the child gets, as [its fd (above 2), the memfd's name]. */
  fds?: Array<[number, string]>;
}

/** A memfd held by the spawner (createMemfd): its name (unique: how the spawner knows it), and where root may reopen it. */
export interface SpawnerMemfd {
  name: string;
  /** /proc/<spawner pid>/fd/<fd>: root (the server) reopens it here to fill it. */
  path: string;
}

export interface ProcessExit {
  code: number | null;
  signal: string | null;
  stderr: string;
}

export interface SpawnedProcess {
  pid: number;
  /** Resolves when the child writes to its ready fd; rejects if it exits first. */
  ready: Promise<void>;
  exited: Promise<ProcessExit>;
  /** SIGKILL, unless it has already ended. */
  kill(): void;
}

interface Watch {
  ready(): void;
  exit(e: ProcessExit): void;
  stderr?: (text: string) => void;
}

class Spawner {
  private readonly helper = new HelperProcess({
    script: SPAWNER,
    name: 'spawner',
    unref: true,
    onEvent: (msg) => this.dispatch(msg.pid as number, msg as { ev: string }),
    // Its children died with it (their exit fds closed, or killed on its way out).
    onExit: () => {
      for (const watch of [...this.watches.values()]) watch.exit({ code: null, signal: 'SIGKILL', stderr: 'the spawner exited' });
    },
  });
  private readonly watches = new Map<number, Watch>();
  /** Events that arrived before their spawn's answer was handled (never, in practice). */
  private readonly early = new Map<number, Array<{ ev: string; data?: string } & Partial<ProcessExit>>>();

  async spawn(argv: string[], opts: SpawnOptions = {}): Promise<SpawnedProcess> {
    let onReady!: () => void;
    let onNotReady!: (e: Error) => void;
    let onExit!: (e: ProcessExit) => void;
    const ready = new Promise<void>((resolve, reject) => { onReady = resolve; onNotReady = reject; });
    ready.catch(() => undefined);
    const exited = new Promise<ProcessExit>((resolve) => { onExit = resolve; });
    const pid = await this.request({ op: 'spawn', argv, ready_fd: opts.readyFd, exit_fd: opts.exitFd, stream_stderr: opts.onStderr !== undefined, batch: opts.batch === true, fds: opts.fds ?? [] });
    let ended = false;
    const watch: Watch = {
      ready: onReady,
      stderr: opts.onStderr,
      exit: (e) => {
        ended = true;
        this.watches.delete(pid);
        onNotReady(new Error(`${path.basename(argv[0]!)} exited (${e.code ?? e.signal}): ${e.stderr.trim()}`));
        onExit(e);
      },
    };
    this.watches.set(pid, watch);
    for (const ev of this.early.get(pid) ?? []) this.dispatch(pid, ev);
    this.early.delete(pid);
    return {
      pid, ready, exited,
      kill: () => { if (!ended) void this.request({ op: 'kill', pid }).catch(() => undefined); },
    };
  }

  private dispatch(pid: number, msg: { ev: string; data?: string } & Partial<ProcessExit>): void {
    const watch = this.watches.get(pid);
    if (!watch) {
      const list = this.early.get(pid) ?? [];
      list.push(msg);
      this.early.set(pid, list);
      return;
    }
    if (msg.ev === 'ready') watch.ready();
    else if (msg.ev === 'stderr') watch.stderr?.(msg.data ?? '');
    else if (msg.ev === 'exit') watch.exit({ code: msg.code ?? null, signal: msg.signal ?? null, stderr: msg.stderr ?? '' });
  }

  async memfd(name: string, size: number): Promise<SpawnerMemfd> {
    const answer = await this.helper.call({ op: 'memfd', name, size });
    return { name, path: `/proc/${answer.pid as number}/fd/${answer.fd as number}` };
  }

  async memfdOp(op: 'seal' | 'close', name: string): Promise<void> {
    await this.helper.call({ op, name });
  }

  private request(req: Record<string, unknown>): Promise<number> {
    return this.helper.call(req).then((answer) => (answer.pid as number | undefined) ?? 0);
  }
}

let shared: Spawner | null = null;

/** Starts `argv` (argv[0] looked up on PATH) from the spawner; stdin/stdout are /dev/null. */
export function spawnProcess(argv: string[], opts: SpawnOptions = {}): Promise<SpawnedProcess> {
  shared ??= new Spawner();
  return shared.spawn(argv, opts);
}

/**
 * A memfd of `size` bytes (zeros) that the spawner holds, and can pass to the children it starts
 * (SpawnOptions.fds): memory no file names, which the spawner can seal (sealMemfd). It lives until
 * closeMemfd, or the spawner's end (the server's).
 */
export function createMemfd(name: string, size: number): Promise<SpawnerMemfd> {
  shared ??= new Spawner();
  return shared.memfd(name, size);
}

/**
 * Seals a memfd of the spawner's for good: nobody (root included) can write it, resize it or
 * unseal it any more; private (copy-on-write) mappings still work. Fails while anything maps it
 * shared and writable.
 */
export function sealMemfd(m: SpawnerMemfd): Promise<void> {
  shared ??= new Spawner();
  return shared.memfdOp('seal', m.name);
}

/** The spawner lets go of a memfd (the children it was passed to keep their own). */
export function closeMemfd(m: SpawnerMemfd): Promise<void> {
  shared ??= new Spawner();
  return shared.memfdOp('close', m.name);
}

/**
 * The parts of a ChildProcess a long-lived helper's owner uses (pid, exit state and event, kill),
 * for a process started by the spawner; `stderr` events carry what it writes there.
 */
export class SpawnedChild extends EventEmitter {
  exitCode: number | null = null;
  signalCode: NodeJS.Signals | null = null;

  private constructor(readonly pid: number, private readonly handle: SpawnedProcess) {
    super();
    void handle.exited.then((e) => {
      this.exitCode = e.code;
      this.signalCode = (e.signal as NodeJS.Signals | null) ?? null;
      // On a later turn: whoever just got this handle has attached its listeners by then.
      setImmediate(() => this.emit('exit', this.exitCode, this.signalCode));
    });
  }

  static async start(argv: string[], opts: Pick<SpawnOptions, 'batch' | 'fds'> = {}): Promise<SpawnedChild> {
    let child: SpawnedChild | null = null;
    const early: string[] = [];
    const handle = await spawnProcess(argv, { ...opts, onStderr: (text) => (child ? child.emit('stderr', text) : early.push(text)) });
    child = new SpawnedChild(handle.pid, handle);
    for (const text of early) child.emit('stderr', text);
    return child;
  }

  kill(_signal: 'SIGKILL' = 'SIGKILL'): boolean {
    if (this.exitCode !== null || this.signalCode !== null) return false;
    this.handle.kill();
    return true;
  }
}
