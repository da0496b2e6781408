/**
 * Fork children's holders (holder.ts), started ahead of need. A holder is a Python process, and
 * starting one took most of a fork's time: 15 ms on a quiet host, 50–150 ms on a loaded one, for
 * every child. A few spares wait, started in the background at a low priority, each listening on
 * its control socket under a placeholder id and connected to this server; a fork takes one per
 * child (one line on that connection gives it the child's id and accept path: it renames its
 * files and its command line to the child's and answers "assigned"), and a new spare is started
 * behind it. A fork that finds none ready starts a holder as before.
 *
 * A spare has no record: a server that dies leaves its spares nothing to hold, and they exit as
 * its connections close (the next server's reconcile removes what is left of them, as for a
 * holder whose start was cut short).
 */
import { randomBytes } from 'node:crypto';
import type net from 'node:net';
import os from 'node:os';
import type { Logger } from '../../log.js';
import type { Spawner } from '../shared/spawner.js';
import { connectHolder, holderCommand, holderPaths, removeHolderFiles, waitProcessGone } from './holder.js';

export interface SpareHoldersOptions {
  stateDir: string;
  /** Host uid (and gid) of the sandboxes: the only peer a fork child's accept socket takes. */
  uid: number;
  timeoutMs: number;
  /** How many spares to keep: a fork's children beyond it get holders started for them. */
  count: number;
  /** Starts them with posix_spawn: a start from Node would stall the event loop (spawner.ts). */
  spawner: Spawner;
  /** A taken spare ends its child when this server dies (onStop 'destroy'), as `--watch-server` would. */
  watchServer: boolean;
  log: Logger;
}

/** A fork child's holder, a spare or one started for it: what the fork needs of it. */
export interface ForkHolder {
  pid: number;
  /** The connection to its control socket: the child's agent channel. */
  socket: net.Socket;
  /** SIGKILL (the fork failed before its child became a sandbox). */
  kill(): void;
}

interface Spare {
  holder: ForkHolder;
  /** Its name until taken: `spr_` and 32 hex digits, as long as a sandbox id. */
  placeholder: string;
}

/** Spares start at this niceness (a sandbox's CPU comes first); a taken one goes back to 0. */
const SPARE_NICE = 10;
/** After a spare failed to start, none is started for this long (a broken install must not spin). */
const RETRY_AFTER_MS = 2_000;
/** The fd a spare says "listening" on (the spawner's ready pipe). */
const READY_FD = 3;

export class SpareHolders {
  private readonly idle: Spare[] = [];
  private starting = 0;
  private retryAt = 0;
  private closed = false;

  constructor(private readonly o: SpareHoldersOptions) {}

  /** Starts spares in the background until `count` are ready or starting. */
  fill(): void {
    if (Date.now() < this.retryAt) return;
    while (!this.closed && this.idle.length + this.starting < this.o.count) {
      this.starting++;
      void this.startOne().finally(() => { this.starting--; });
    }
  }

  /**
   * A holder for fork child `id` (listening at `accept`, as accept mode would), or null when no
   * spare is ready (the caller starts one). The socket is left paused: the caller resumes it once
   * it reads it (an AgentChannel is attached).
   */
  async take(id: string, accept: string): Promise<ForkHolder | null> {
    const spare = this.idle.shift();
    this.fill();
    if (!spare) return null;
    try {
      await assign(spare.holder.socket, { id, accept, watch: this.o.watchServer }, this.o.timeoutMs);
      try { os.setPriority(spare.holder.pid, 0); } catch { /* it ended: the fork finds out */ }
      return spare.holder;
    } catch (err) {
      this.o.log.warn('a spare fork holder could not be used; starting one', { error: (err as Error).message });
      await this.discard(spare, id);
      return null;
    }
  }

  /** Ends the spares not taken. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.idle.splice(0).map((s) => this.discard(s)));
  }

  private async startOne(): Promise<void> {
    const placeholder = `spr_${randomBytes(16).toString('hex')}`;
    let spare: Spare;
    try {
      spare = { holder: await this.startSpare(placeholder), placeholder };
    } catch (err) {
      if (!this.closed) this.o.log.warn('a spare fork holder did not start', { error: (err as Error).message });
      this.retryAt = Date.now() + RETRY_AFTER_MS;
      await removeHolderFiles(this.o.stateDir, placeholder);
      return;
    }
    if (this.closed) return void (await this.discard(spare));
    // One that ends while idle (killed from outside) is not handed out.
    spare.holder.socket.once('close', () => {
      const at = this.idle.indexOf(spare);
      if (at >= 0) {
        this.idle.splice(at, 1);
        void removeHolderFiles(this.o.stateDir, placeholder);
      }
    });
    this.idle.push(spare);
  }

  private async startSpare(placeholder: string): Promise<ForkHolder> {
    const argv = holderCommand({ stateDir: this.o.stateDir, id: placeholder, uid: this.o.uid, spare: true, readyFd: READY_FD });
    // In a session of its own (as every holder): it may come to hold a sandbox that outlives us.
    const proc = await this.o.spawner.spawn(argv, { readyFd: READY_FD, detach: true });
    try { os.setPriority(proc.pid, SPARE_NICE); } catch { /* ended: found out below */ }
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([proc.ready, new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error('the spare holder did not start in time')), this.o.timeoutMs);
      })]);
      const socket = await connectHolder(holderPaths(this.o.stateDir, placeholder).socket, this.o.timeoutMs);
      return { pid: proc.pid, socket, kill: () => proc.kill() };
    } catch (err) {
      proc.kill();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Kills a spare (under its placeholder, or the id it was being given) and removes its files. */
  private async discard(spare: Spare, id?: string): Promise<void> {
    spare.holder.socket.destroy();
    spare.holder.kill();
    await waitProcessGone(spare.holder.pid, 5_000);
    await Promise.all([spare.placeholder, id].map((n) => (n ? removeHolderFiles(this.o.stateDir, n) : undefined)));
  }
}

/** Gives a spare its fork child: one line out, "assigned" back. Leaves the socket paused. */
function assign(socket: net.Socket, assignment: { id: string; accept: string; watch: boolean }, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = '';
    const done = (err: Error | null) => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      // Nothing else comes before the child connects; what does waits for the agent channel.
      socket.pause();
      if (err) reject(err);
      else resolve();
    };
    const onData = (d: Buffer) => {
      got += d.toString();
      const end = got.indexOf('\n');
      if (end < 0) return;
      const line = got.slice(0, end);
      done(line === 'assigned' ? null : new Error(`the spare holder said: ${line.slice(0, 200)}`));
      if (end + 1 < got.length) socket.unshift(Buffer.from(got.slice(end + 1)));
    };
    const onClose = () => done(new Error('the spare holder ended'));
    const timer = setTimeout(() => done(new Error('the spare holder did not answer')), timeoutMs);
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.write(JSON.stringify(assignment) + '\n');
  });
}
