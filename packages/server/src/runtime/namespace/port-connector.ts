/**
 * Connections into a namespace sandbox's ports, from the server (exposed ports). Node cannot enter a
 * network namespace itself, so one long-lived Node child per sandbox that uses ports sits in the
 * sandbox's network namespace only (nsenter --net; no other namespace, no sandbox code) and dials
 * 127.0.0.1:<port> there on request, passing each connected socket back over its IPC channel. It
 * only ever dials the sandbox's own loopback: one sandbox's connector cannot reach another's ports,
 * and the server's API (on the host's loopback) is not in that namespace.
 *
 * Works with egress off: nothing goes through the sandbox's outbound network.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type net from 'node:net';
import { fileURLToPath } from 'node:url';
import { SandboxError } from '@podflare/runtime';

const CHILD = fileURLToPath(new URL('./port-connector-child.js', import.meta.url));
const START_TIMEOUT_MS = 10_000;
const CONNECT_TIMEOUT_MS = 10_000;

interface Pending {
  resolve(socket: net.Socket): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

export class PortConnector {
  private child: ChildProcess | null = null;
  private starting: Promise<ChildProcess> | null = null;
  private readonly pending = new Map<number, Pending>();
  private next = 0;
  private closed = false;

  /** `netnsPid`: any process in the sandbox's network namespace (its PID 1). */
  constructor(private readonly netnsPid: number) {}

  /** A socket connected to 127.0.0.1:port inside the sandbox; 502-style `unavailable` when nothing listens. */
  async connect(port: number): Promise<net.Socket> {
    const child = await this.start();
    const n = this.next++;
    return new Promise<net.Socket>((resolve, reject) => {
      const timer = setTimeout(() => this.settle(n, new SandboxError('timeout', `connecting to port ${port} in the sandbox timed out`)), CONNECT_TIMEOUT_MS);
      this.pending.set(n, { resolve, reject, timer });
      child.send({ n, port });
    });
  }

  /** Ends the child (the sandbox is gone); pending connects fail. */
  close(): void {
    this.closed = true;
    this.child?.kill('SIGKILL');
    this.child = null;
    for (const n of [...this.pending.keys()]) this.settle(n, new SandboxError('sandbox_gone', 'the sandbox is gone'));
  }

  private settle(n: number, result: net.Socket | Error): void {
    const p = this.pending.get(n);
    if (!p) {
      if (!(result instanceof Error)) result.destroy();
      return;
    }
    this.pending.delete(n);
    clearTimeout(p.timer);
    if (result instanceof Error) p.reject(result);
    else p.resolve(result);
  }

  private start(): Promise<ChildProcess> {
    if (this.closed) return Promise.reject(new SandboxError('sandbox_gone', 'the sandbox is gone'));
    if (this.child) return Promise.resolve(this.child);
    this.starting ??= new Promise<ChildProcess>((resolve, reject) => {
      const child = spawn('nsenter', [`--net=/proc/${this.netnsPid}/ns/net`, '--', process.execPath, CHILD], {
        stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      });
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-2000); });
      const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error('the port connector did not start in time')); }, START_TIMEOUT_MS);
      child.on('message', (msg: unknown, handle: unknown) => {
        const m = (msg ?? {}) as { ready?: boolean; n?: number; error?: string };
        if (m.ready) {
          clearTimeout(timer);
          this.child = child;
          resolve(child);
          return;
        }
        if (typeof m.n !== 'number') return;
        if (m.error) this.settle(m.n, new SandboxError('unavailable', `nothing answers on that port in the sandbox (${m.error})`));
        else if (handle) this.settle(m.n, handle as net.Socket);
      });
      child.once('error', (err) => { clearTimeout(timer); reject(new Error(`cannot start nsenter: ${err.message}`)); });
      child.once('exit', (code) => {
        clearTimeout(timer);
        if (this.child === child) this.child = null;
        this.starting = null;
        reject(new Error(`the port connector exited (${code}): ${stderr.trim()}`));
        for (const n of [...this.pending.keys()]) this.settle(n, new SandboxError('unavailable', 'the port connector exited'));
      });
    }).finally(() => { if (!this.child) this.starting = null; });
    return this.starting;
  }
}
