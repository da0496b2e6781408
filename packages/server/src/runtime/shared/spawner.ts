/**
 * Client of the process spawner (packages/server/host/podflare_spawner.py). Starting a child from
 * Node forks the whole server first, which blocks the event loop for milliseconds (more the bigger
 * the server); helper processes on latency paths (a fork child's slirp4netns) are started by that
 * small process instead, with posix_spawn. The server makes one Spawner (its runtimes share it);
 * its process starts on first use and dies with the server, taking its children with it (except
 * those started `detach`ed: a namespace sandbox's slirp4netns, which outlives the server with it).
 *
 * Its messages are host-protocol.ts's: a reply or event that does not match is a spawner bug,
 * which fails the call (a reply) or is logged and dropped (an event).
 */
import { EventEmitter } from 'node:events';
import { HelperProcess } from '../../helper-process.js';
import {
  describeIssue, parseHelperReply, SpawnerEvent, SpawnerReplySchemas, SpawnerRequestSchemas,
  type SpawnerOp, type SpawnerReply, type SpawnerRequest,
} from '../../host-protocol.js';
import type { Logger } from '../../log.js';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SPAWNER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../host/podflare_spawner.py');

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
  /** In a session of its own, and left running when the spawner (the server) ends. */
  detach?: boolean;
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

/** Starts processes through the spawner helper; one per server, shared by its runtimes. */
export class Spawner {
  private readonly helper: HelperProcess;
  private readonly watches = new Map<number, Watch>();
  /** Events that arrived before their spawn's answer was handled (never, in practice). */
  private readonly early = new Map<number, SpawnerEvent[]>();

  constructor(private readonly log?: Logger) {
    this.helper = new HelperProcess({
      script: SPAWNER,
      name: 'spawner',
      unref: true,
      onEvent: (msg) => this.onEvent(msg),
      // Its children died with it (their exit fds closed, or killed on its way out).
      onExit: () => {
        for (const watch of [...this.watches.values()]) watch.exit({ code: null, signal: 'SIGKILL', stderr: 'the spawner exited' });
      },
    });
  }

  /** Starts `argv` (argv[0] looked up on PATH); stdin/stdout are /dev/null. */
  async spawn(argv: string[], opts: SpawnOptions = {}): Promise<SpawnedProcess> {
    let onReady!: () => void;
    let onNotReady!: (e: Error) => void;
    let onExit!: (e: ProcessExit) => void;
    const ready = new Promise<void>((resolve, reject) => { onReady = resolve; onNotReady = reject; });
    ready.catch(() => undefined);
    const exited = new Promise<ProcessExit>((resolve) => { onExit = resolve; });
    const { pid } = await this.request<'spawn'>({
      op: 'spawn', argv, ready_fd: opts.readyFd, exit_fd: opts.exitFd, stream_stderr: opts.onStderr !== undefined, batch: opts.batch === true,
      fds: opts.fds ?? [], ...(opts.detach ? { detach: true } : {}),
    });
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
      kill: () => { if (!ended) void this.request<'kill'>({ op: 'kill', pid }).catch(() => undefined); },
    };
  }

  /** Kills the spawner (and so every process it started): the server is stopping. */
  close(): void {
    this.helper.close();
  }

  private onEvent(msg: Record<string, unknown>): void {
    const event = SpawnerEvent.safeParse(msg);
    if (!event.success) {
      this.log?.error('spawner bug: an event does not match its schema', { error: describeIssue(event.error), ev: String(msg.ev) });
      return;
    }
    this.dispatch(event.data.pid, event.data);
  }

  private dispatch(pid: number, msg: SpawnerEvent): void {
    const watch = this.watches.get(pid);
    if (!watch) {
      const list = this.early.get(pid) ?? [];
      list.push(msg);
      this.early.set(pid, list);
      return;
    }
    if (msg.ev === 'ready') watch.ready();
    else if (msg.ev === 'stderr') watch.stderr?.(msg.data);
    else watch.exit({ code: msg.code, signal: msg.signal, stderr: msg.stderr });
  }

  /**
   * A memfd of `size` bytes (zeros) that the spawner holds, and can pass to the children it starts
   * (SpawnOptions.fds): memory no file names, which the spawner can seal (sealMemfd). It lives until
   * closeMemfd, or the spawner's end (the server's).
   */
  async createMemfd(name: string, size: number): Promise<SpawnerMemfd> {
    const answer = await this.request<'memfd'>({ op: 'memfd', name, size });
    return { name, path: `/proc/${answer.pid}/fd/${answer.fd}` };
  }

  /**
   * Seals a memfd of the spawner's for good: nobody (root included) can write it, resize it or
   * unseal it any more; private (copy-on-write) mappings still work. Fails while anything maps it
   * shared and writable.
   */
  async sealMemfd(m: SpawnerMemfd): Promise<void> {
    await this.request<'seal'>({ op: 'seal', name: m.name });
  }

  /**
   * A unix socket listening at `socketPath` (mode 0600; its directory must be root's alone), held
   * by the spawner under `name` and passed to children like a memfd (SpawnOptions.fds); let go of
   * with closeMemfd. How an unprivileged child (a VM's QEMU) gets a socket only root can reach.
   */
  async listenUnix(name: string, socketPath: string): Promise<SpawnerMemfd> {
    await this.request<'listen'>({ op: 'listen', name, path: socketPath });
    return { name, path: socketPath };
  }

  /** The spawner lets go of a memfd (the children it was passed to keep their own). */
  async closeMemfd(m: SpawnerMemfd): Promise<void> {
    await this.request<'close'>({ op: 'close', name: m.name });
  }

  /** One call, its request and reply checked against their op's schemas. */
  private async request<O extends SpawnerOp>(req: SpawnerRequest<O>): Promise<SpawnerReply<O>> {
    const op = req.op as O;
    const checked = SpawnerRequestSchemas[op].safeParse(req);
    if (!checked.success) throw new Error(`spawner: bad ${op} request: ${describeIssue(checked.error)}`);
    const reply = await this.helper.call(checked.data as Record<string, unknown>);
    try {
      return parseHelperReply('spawner', op, SpawnerReplySchemas[op], reply) as SpawnerReply<O>;
    } catch (err) {
      this.log?.error('spawner bug: a reply does not match its schema', { op, error: (err as Error).message });
      throw err;
    }
  }
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

  static async start(spawner: Spawner, argv: string[], opts: Pick<SpawnOptions, 'batch' | 'fds' | 'detach'> = {}): Promise<SpawnedChild> {
    let child: SpawnedChild | null = null;
    const early: string[] = [];
    const handle = await spawner.spawn(argv, { ...opts, onStderr: (text) => (child ? child.emit('stderr', text) : early.push(text)) });
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
