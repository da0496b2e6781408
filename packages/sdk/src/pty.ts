/**
 * Interactive terminals: `bash -l` on a pseudo-terminal in the sandbox, over a WebSocket
 * (`GET /v1/sandboxes/:id/pty`). Shaped like E2B's `sandbox.pty`.
 */
import type { Client } from './client.js';
import { ClientWebSocket } from './websocket.js';

/** Options of {@link Pty.create}. */
export interface PtyCreateOptions {
  /** @default 80 */
  cols?: number;
  /** @default 24 */
  rows?: number;
  /** Called with the terminal's output as it arrives (escape sequences included). */
  onData: (data: string) => void;
}

/** A terminal session: type into it, resize it, end it. */
export class PtyHandle {
  /** The shell's pid inside the sandbox (a background process with a terminal: see `sandbox.commands`). */
  readonly pid: number;
  readonly #ws: ClientWebSocket;
  readonly #exit: Promise<number | null>;

  /** @internal */
  constructor(pid: number, ws: ClientWebSocket, exit: Promise<number | null>) {
    this.pid = pid;
    this.#ws = ws;
    this.#exit = exit;
  }

  /** Types into the terminal (`'ls\r'` runs ls). */
  sendInput(data: string): void {
    this.#ws.send(JSON.stringify({ type: 'input', data }));
  }

  /** Tells the terminal its new size (programs get SIGWINCH). */
  resize(size: { cols: number; rows: number }): void {
    this.#ws.send(JSON.stringify({ type: 'resize', cols: size.cols, rows: size.rows }));
  }

  /** Resolves with the shell's exit code when it ends (null if the connection closed first). */
  wait(): Promise<number | null> {
    return this.#exit;
  }

  /** Closes the connection, which ends the shell. */
  kill(): void {
    this.#ws.close();
  }
}

/**
 * Terminals of one sandbox, reached as `sandbox.pty`.
 *
 * @example
 * ```ts
 * const term = await sandbox.pty.create({ cols: 120, rows: 30, onData: (d) => process.stdout.write(d) });
 * term.sendInput('echo hi\r');
 * term.resize({ cols: 100, rows: 40 });
 * term.kill();
 * ```
 */
export class Pty {
  readonly #client: Client;
  readonly #path: string;

  /** @internal Made by the Sandbox; use `sandbox.pty`. */
  constructor(client: Client, sandboxId: string) {
    this.#client = client;
    this.#path = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/pty`;
  }

  /** Starts `bash -l` on a new terminal; resolves once it runs. */
  async create(options: PtyCreateOptions): Promise<PtyHandle> {
    const { socket, head } = await this.#client.upgrade(this.#path, { cols: options.cols ?? 80, rows: options.rows ?? 24 });
    return new Promise<PtyHandle>((resolve, reject) => {
      let started: PtyHandle | undefined;
      let settleExit!: (code: number | null) => void;
      const exit = new Promise<number | null>((r) => { settleExit = r; });
      const ws = new ClientWebSocket(socket, head, (text) => {
        let msg: { type?: string; pid?: number; data?: string; code?: number };
        try {
          msg = JSON.parse(text) as typeof msg;
        } catch {
          return;
        }
        if (msg.type === 'started' && typeof msg.pid === 'number' && !started) {
          started = new PtyHandle(msg.pid, ws, exit);
          resolve(started);
        } else if (msg.type === 'output' && typeof msg.data === 'string') options.onData(msg.data);
        else if (msg.type === 'exit') settleExit(typeof msg.code === 'number' ? msg.code : null);
      }, () => {
        settleExit(null);
        if (!started) reject(new Error('the terminal connection closed before the shell started'));
      });
    });
  }
}
