/**
 * A QEMU Machine Protocol client over a unix socket: JSON lines, one command at a time in
 * order (QEMU answers in order), asynchronous events kept for whoever waits on them.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { LineFramer, LineTooLongError } from '../../jsonl/line-framer.js';

export class QmpError extends Error {}

/**
 * Longest QMP line kept (QEMU's answers here are small: a status, a migration's progress): a QEMU
 * gone rogue (a guest escape) must not make the server buffer without end.
 */
const MAX_QMP_LINE = 16 * 1024 * 1024;

interface Waiting { resolve(v: unknown): void; reject(e: Error): void }

export class Qmp extends EventEmitter {
  private readonly framer = new LineFramer(MAX_QMP_LINE);
  private readonly waiting: Waiting[] = [];
  private closedReason: string | null = null;

  private constructor(private readonly socket: net.Socket) {
    super();
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (e) => this.fail(`QMP socket error: ${e.message}`));
    socket.on('close', () => this.fail('QMP socket closed'));
  }

  /** Connects (retrying while QEMU has not created or opened the socket yet) and negotiates. */
  static async connect(socketPath: string, timeoutMs: number): Promise<Qmp> {
    const socket = await connectUnix(socketPath, timeoutMs);
    const qmp = new Qmp(socket);
    await qmp.greeting(timeoutMs);
    await qmp.command('qmp_capabilities');
    return qmp;
  }

  command<T = unknown>(execute: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedReason) return Promise.reject(new QmpError(this.closedReason));
    return new Promise<T>((resolve, reject) => {
      this.waiting.push({ resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    });
  }

  close(): void {
    this.fail('closed');
    this.socket.destroy();
  }

  private greetingResolve: (() => void) | null = null;

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new QmpError('QEMU did not greet on its QMP socket')), timeoutMs);
      this.greetingResolve = () => { clearTimeout(timer); resolve(); };
      this.once('closed', (reason: string) => { clearTimeout(timer); reject(new QmpError(reason)); });
    });
  }

  /**
   * QEMU answers commands in order and without ids (one command at a time), so replies are matched
   * by order here rather than by the shared RPC's ids; only the framing is shared.
   */
  private onData(chunk: Buffer): void {
    if (this.closedReason) return;
    try {
      this.framer.push(chunk, (line) => this.onLine(line));
    } catch (err) {
      if (!(err instanceof LineTooLongError)) throw err;
      this.fail(`QMP sent a line longer than ${MAX_QMP_LINE} bytes`);
      this.socket.destroy();
    }
  }

  private onLine(text: string): void {
    const line = text.trim();
    if (!line) return;
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    if ('QMP' in msg) {
      this.greetingResolve?.();
      this.greetingResolve = null;
    } else if ('event' in msg) {
      this.emit('event', msg.event as string, msg.data);
    } else if ('return' in msg) {
      this.waiting.shift()?.resolve(msg.return);
    } else if ('error' in msg) {
      const err = msg.error as { class?: string; desc?: string };
      this.waiting.shift()?.reject(new QmpError(`${err.class ?? 'Error'}: ${err.desc ?? 'QMP command failed'}`));
    }
  }

  private fail(reason: string): void {
    if (this.closedReason) return;
    this.closedReason = reason;
    for (const w of this.waiting.splice(0)) w.reject(new QmpError(reason));
    this.emit('closed', reason);
  }
}

/** Connects to a unix socket that a starting process is about to create and listen on. */
export async function connectUnix(socketPath: string, timeoutMs: number, alive: () => boolean = () => true): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(socketPath);
        s.once('connect', () => { s.removeAllListeners('error'); resolve(s); });
        s.once('error', reject);
      });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline || !alive()) throw err;
      await new Promise((r) => setTimeout(r, 2)); // QEMU starts in ~15 ms: a short step costs little
    }
  }
}
