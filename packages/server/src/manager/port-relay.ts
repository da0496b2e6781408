/**
 * Exposed ports where the runtime cannot dial into the sandbox itself (the VM runtime: its guest
 * may have no network device at all, and QEMU's user-mode network would let other guests reach a
 * forwarded host port): one connection is one small relay process started in the sandbox through
 * the agent's background processes (podflare_processes.py), which dials the sandbox's own
 * 127.0.0.1:<port> and carries the bytes over its stdin and stdout as base64 lines. Nothing new in
 * the agent or the guest: it works wherever the agent runs processes, with egress off.
 *
 * The relay's lines (its stdout, read as the process's bounded log): `C` connected, `D <base64>`
 * data, `E` the sandbox's server closed its side. Ours (its stdin): `D <base64>`, `A <n>` (n bytes
 * consumed), `E` (we closed our side). Flow control: the relay sends at most WINDOW bytes beyond
 * what we acknowledged, and we acknowledge only what our reader took, so the process's log (which
 * drops the oldest output past its bound) never overflows; were it to lose anything anyway, the
 * connection fails rather than pass on a corrupted stream.
 *
 * Everything the relay prints is the sandbox's (hostile) output: a line that is not one of the
 * above ends the connection. The relay is visible in the sandbox's process list (it is the
 * sandbox's own process), and ends with the connection.
 */
import { Duplex } from 'node:stream';
import { SandboxError } from '@podflare/runtime';
import type { SandboxProcesses } from './processes.js';
import type { LiveSandbox } from './live-sandbox.js';

/** Bytes the relay may send beyond our acknowledgements (its log holds 4× this in base64, at least). */
const WINDOW = 256 * 1024;
const LOG_CHARS = 4 * 1024 * 1024;
/** Bytes of one stdin write (base64 grows them by a third; the agent takes 1 MiB unread). */
const WRITE_CHUNK = 192 * 1024;
const CONNECT_TIMEOUT_MS = 30_000;

const RELAY = String.raw`
import base64, socket, sys, threading
WINDOW = ${WINDOW}
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
except OSError as e:
    sys.stdout.write("F " + (e.strerror or str(e)).replace("\n", " ") + "\n"); sys.stdout.flush(); sys.exit(1)
s.settimeout(None)
out = sys.stdout
lock = threading.Condition()
unacked = [0]
out.write("C\n"); out.flush()
def pump():
    while True:
        with lock:
            while unacked[0] >= WINDOW:
                lock.wait()
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            out.write("E\n"); out.flush(); return
        with lock:
            unacked[0] += len(data)
        out.write("D " + base64.b64encode(data).decode() + "\n"); out.flush()
threading.Thread(target=pump, daemon=True).start()
for line in sys.stdin:
    kind, _, rest = line.rstrip("\n").partition(" ")
    if kind == "D":
        s.sendall(base64.b64decode(rest))
    elif kind == "A":
        with lock:
            unacked[0] -= int(rest); lock.notify()
    elif kind == "E":
        try: s.shutdown(socket.SHUT_WR)
        except OSError: pass
threading.Event().wait()
`;

/** A stream connected to `port` inside the sandbox through a relay process (see the top of this file). */
export async function relayPort(processes: SandboxProcesses, s: LiveSandbox, port: number): Promise<Duplex> {
  const proc = await processes.start(s, { cmd: `exec python3 -c '${RELAY.replace(/'/g, `'\\''`)}' ${port}`, log_chars: LOG_CHARS });
  const relay = new RelayStream(processes, s, proc.pid);
  await relay.connected(port);
  return relay;
}

class RelayStream extends Duplex {
  private pending = '';
  private unackedTaken = 0;
  private onConnect: { resolve(): void; reject(err: Error): void } | null = null;
  private state: 'connecting' | 'open' | 'failed' = 'connecting';
  private ended = false;
  private writes = Promise.resolve();
  /** Set while our reader has had enough: the next read of the relay's output waits for it. */
  private full: { promise: Promise<void>; resolve(): void } | null = null;

  constructor(private readonly processes: SandboxProcesses, private readonly s: LiveSandbox, private readonly pid: number) {
    super({ allowHalfOpen: true });
    void this.processes.output(s, pid, 0, true, (ev) => this.onEvent(ev), () => this.destroyed)
      .catch((err: Error) => this.fail(err));
  }

  connected(port: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (this.state === 'open') return resolve();
      if (this.state === 'failed') return reject(new SandboxError('unavailable', `nothing answers on port ${port} in the sandbox`));
      const timer = setTimeout(() => this.fail(new SandboxError('timeout', `connecting to port ${port} in the sandbox timed out`)), CONNECT_TIMEOUT_MS);
      this.onConnect = {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (err) => { clearTimeout(timer); reject(err); },
      };
    });
  }

  /**
   * One event of the relay's output. While our reader has had enough, the next read waits
   * (returning a promise holds processes.output): a relay that ignores the window only fills its
   * own log, whose overflow (`lost`) ends the connection; the server's memory stays bounded.
   */
  private onEvent(ev: { type: string; data: unknown }): Promise<void> | undefined {
    this.onOutput(ev);
    return this.full?.promise;
  }

  private onOutput(ev: { type: string; data: unknown }): void {
    if (ev.type === 'lost') return this.fail(new Error('the relay\'s output overflowed its log'));
    if (ev.type === 'exit') {
      if (!this.ended) this.fail(new Error('the relay ended'));
      return;
    }
    if (ev.type !== 'stdout' || typeof ev.data !== 'string') return;
    this.pending += ev.data;
    let i;
    while ((i = this.pending.indexOf('\n')) >= 0) {
      const line = this.pending.slice(0, i);
      this.pending = this.pending.slice(i + 1);
      this.onLine(line);
    }
    if (this.pending.length > 2 * WINDOW) this.fail(new Error('the relay printed an overlong line'));
  }

  private onLine(line: string): void {
    if (line === 'C' && this.state === 'connecting') {
      this.state = 'open';
      this.onConnect?.resolve();
    } else if (line.startsWith('F ') && this.state === 'connecting') {
      this.state = 'failed';
      this.onConnect?.reject(new SandboxError('unavailable', `nothing answers on that port in the sandbox (${line.slice(2, 200)})`));
      this.destroy();
    } else if (line.startsWith('D ') && this.state === 'open' && /^[A-Za-z0-9+/]*={0,2}$/.test(line.slice(2))) {
      const data = Buffer.from(line.slice(2), 'base64');
      this.unackedTaken += data.length;
      // Acknowledged once our reader wants more (push() false: later, from _read).
      if (this.push(data)) this.ack();
      else if (!this.full) {
        let resolve!: () => void;
        const promise = new Promise<void>((r) => { resolve = r; });
        this.full = { promise, resolve };
      }
    } else if (line === 'E' && this.state === 'open') {
      this.ended = true;
      this.push(null);
    } else {
      this.fail(new Error('the relay in the sandbox said something unexpected'));
    }
  }

  private ack(): void {
    if (this.unackedTaken === 0 || this.destroyed) return;
    const n = this.unackedTaken;
    this.unackedTaken = 0;
    this.send(`A ${n}\n`).catch((err: Error) => this.fail(err));
  }

  private send(text: string): Promise<void> {
    this.writes = this.writes.then(() => this.processes.writeStdin(this.s, this.pid, text, false));
    return this.writes;
  }

  /**
   * Ends our side and destroys the stream (ending the relay) once that is written: what Node's
   * HTTP client calls on a socket whose response is complete (`Connection: close`), as a
   * net.Socket has it. Without it the stream would wait for its reader to take the end forever.
   */
  destroySoon(): void {
    if (this.writableFinished) return void this.destroy();
    this.once('finish', () => this.destroy());
    this.end();
  }

  override _read(): void {
    const full = this.full;
    this.full = null;
    full?.resolve();
    this.ack();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    const parts: string[] = [];
    for (let i = 0; i < chunk.length; i += WRITE_CHUNK) parts.push(`D ${chunk.subarray(i, i + WRITE_CHUNK).toString('base64')}\n`);
    Promise.all(parts.map((p) => this.send(p))).then(() => done(), (err: Error) => done(err));
  }

  override _final(done: (err?: Error | null) => void): void {
    this.send('E\n').then(() => done(), (err: Error) => done(err));
  }

  override _destroy(err: Error | null, done: (err?: Error | null) => void): void {
    this.full?.resolve();
    void this.processes.signal(this.s, this.pid, 'SIGKILL').catch(() => undefined);
    done(err);
  }

  private fail(err: Error): void {
    if (this.state === 'connecting') {
      this.state = 'failed';
      this.onConnect?.reject(err instanceof SandboxError ? err : new SandboxError('unavailable', `cannot reach the port in the sandbox: ${err.message}`));
    }
    this.destroy(err);
  }
}
