/**
 * A long-lived Python helper of the server (packages/server/host/*.py) speaking JSON lines on its
 * stdin/stdout: a request carries an `id` and is answered `{id, ok, error?, ...}`; a line without
 * an `id` is an event. Started on first use, and again on the next call after it has exited.
 */
import { spawn, type ChildProcess } from 'node:child_process';

export interface HelperProcessOptions {
  /** The helper's script (run by the system's python3, isolated mode). */
  script: string;
  /** How errors name it: "<name>: <error>", "<name> exited". */
  name: string;
  /** Lines without an `id`. */
  onEvent?: (msg: Record<string, unknown>) => void;
  /** After it has exited and every pending call has been failed. */
  onExit?: () => void;
  /** Idle, it does not keep the server's process alive (a caller waiting on it has its own timer). */
  unref?: boolean;
}

export class HelperProcess {
  private child: ChildProcess | null = null;
  private nextId = 1;
  private buffer = '';
  private readonly pending = new Map<number, { resolve(v: Record<string, unknown>): void; reject(e: Error): void }>();

  constructor(private readonly o: HelperProcessOptions) {}

  call(req: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.child ??= this.start();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.child!.stdin!.write(JSON.stringify({ ...req, id }) + '\n');
    });
  }

  close(): void {
    this.child?.kill('SIGKILL');
    this.child = null;
  }

  private start(): ChildProcess {
    const child = spawn('/usr/bin/python3', ['-I', this.o.script], { stdio: ['pipe', 'pipe', 'inherit'] });
    if (this.o.unref) {
      child.unref();
      (child.stdin as unknown as { unref?: () => void }).unref?.();
      (child.stdout as unknown as { unref?: () => void }).unref?.();
    }
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      this.buffer += d;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) !== -1) {
        const msg = JSON.parse(this.buffer.slice(0, nl)) as Record<string, unknown> & { id?: number; ok?: boolean; error?: string };
        this.buffer = this.buffer.slice(nl + 1);
        if (msg.id === undefined || msg.id === null) {
          this.o.onEvent?.(msg);
          continue;
        }
        const p = this.pending.get(msg.id);
        if (!p) continue;
        this.pending.delete(msg.id);
        if (msg.ok) p.resolve(msg);
        else p.reject(new Error(`${this.o.name}: ${msg.error}`));
      }
    });
    child.once('exit', () => {
      if (this.child === child) this.child = null;
      for (const p of this.pending.values()) p.reject(new Error(`${this.o.name} exited`));
      this.pending.clear();
      this.buffer = '';
      this.o.onExit?.();
    });
    return child;
  }
}
