/**
 * An interactive terminal over a WebSocket: `GET /v1/sandboxes/:id/pty?cols=&rows=` (upgrade) starts
 * `bash -l` on a pseudo-terminal in the sandbox (a background process with a PTY, see
 * sandbox-processes.ts) and carries it; `?pid=N` attaches to a PTY process started earlier instead
 * (then closing the socket leaves it running; `offset` says where its output resumes).
 *
 * Messages are JSON text frames. Client → server: `{"type":"input","data"}`,
 * `{"type":"resize","cols","rows"}`. Server → client: `{"type":"started","pid"}`, then
 * `{"type":"output","data","offset"}` as the terminal writes, and `{"type":"exit","code"}` when the
 * shell ends (the socket closes after it). Closing the socket kills a shell it started.
 * The key comes in the Authorization header or, from a browser, as a subprotocol (ws-key-protocol.ts).
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { SANDBOX_ID_PATTERN, TerminalSize } from '@podflare/protocol';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import { ApiError, toApiError } from './api-error.js';
import type { Logger } from '../log.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { bearerKey, type KeyRing } from './auth.js';
import { keyFromProtocols, offeredProtocols, PTY_PROTOCOL } from './ws-key-protocol.js';
import type { BrowserGuard } from './browser-guard.js';
import { ServerWebSocket } from './websocket.js';

const PTY_PATH = new RegExp(`^/v1/sandboxes/(${SANDBOX_ID_SOURCE})/pty/?(\\?.*)?$`);
const DEFAULT_SHELL = 'exec bash -l';

/** The sandbox id of a PTY upgrade target, or null. */
export function matchPtyTarget(target: string | undefined): { sandboxId: string; query: URLSearchParams } | null {
  const m = target ? PTY_PATH.exec(target) : null;
  if (!m || !SANDBOX_ID_PATTERN.test(m[1]!)) return null;
  return { sandboxId: m[1]!, query: new URLSearchParams(m[2]?.slice(1) ?? '') };
}

function intParam(query: URLSearchParams, name: string, fallback: number, max: number): number {
  const text = query.get(name);
  if (text === null) return fallback;
  if (!/^\d{1,15}$/.test(text) || Number(text) > max) throw new ApiError('bad_request', `${name}: must be an integer up to ${max}`, name);
  return Number(text);
}

export class PtySockets {
  constructor(
    private readonly manager: SandboxManager,
    private readonly keys: KeyRing,
    private readonly guard: BrowserGuard,
    private readonly log: Logger,
  ) {}

  async handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, target: { sandboxId: string; query: URLSearchParams }): Promise<void> {
    let s, pid: number, offset: number, owned: boolean;
    try {
      this.guard.checkUpgrade(req);
      const offeredKey = bearerKey(req) === undefined ? keyFromProtocols(req) : undefined;
      const owner = offeredKey !== undefined ? this.keys.authenticateKey(offeredKey) : this.keys.authenticate(req);
      s = await this.manager.get(target.sandboxId, owner || undefined);
      const size = TerminalSize.parse({ cols: intParam(target.query, 'cols', 80, 1000) || 80, rows: intParam(target.query, 'rows', 24, 1000) || 24 });
      const attach = target.query.get('pid');
      offset = intParam(target.query, 'offset', 0, Number.MAX_SAFE_INTEGER);
      if (attach !== null) {
        pid = intParam(target.query, 'pid', 0, 4_194_304);
        const info = await this.manager.processes.info(s, pid);
        if (!info.tty) throw new ApiError('conflict', `process ${pid} has no terminal`);
        await this.manager.processes.resize(s, pid, size);
        owned = false;
      } else {
        pid = (await this.manager.processes.start(s, { cmd: DEFAULT_SHELL, pty: size })).pid;
        owned = true;
      }
    } catch (err) {
      return refuse(socket, err, this.log);
    }
    const sandbox = s;
    let chain = Promise.resolve();
    const ws = ServerWebSocket.accept(req, socket, head, {
      protocol: offeredProtocols(req).includes(PTY_PROTOCOL) ? PTY_PROTOCOL : undefined,
      onMessage: (text) => {
        let msg: { type?: unknown; data?: unknown; cols?: unknown; rows?: unknown };
        try {
          msg = JSON.parse(text) as typeof msg;
        } catch {
          return ws.close(1003, 'messages are JSON');
        }
        // In order: keystrokes must reach the terminal in the order they were typed.
        chain = chain.then(async () => {
          if (msg.type === 'input' && typeof msg.data === 'string') await this.manager.processes.writeStdin(sandbox, pid, msg.data, false);
          else if (msg.type === 'resize') {
            const size = TerminalSize.safeParse({ cols: msg.cols, rows: msg.rows });
            if (size.success) await this.manager.processes.resize(sandbox, pid, size.data);
          }
        }).catch((err: unknown) => this.log.debug('pty input failed', { error: String(err) }));
      },
      onClose: () => {
        if (owned) void this.manager.processes.signal(sandbox, pid, 'SIGKILL').catch(() => undefined);
      },
    });
    void ws.send(JSON.stringify({ type: 'started', pid }));
    try {
      await this.manager.processes.output(sandbox, pid, offset, true, async (ev) => {
        if (ev.type === 'stdout' || ev.type === 'stderr') await ws.send(JSON.stringify({ type: 'output', data: ev.data, offset: ev.offset }));
        else if (ev.type === 'exit') await ws.send(JSON.stringify({ type: 'exit', code: ev.data }));
      }, () => ws.isClosed);
    } catch (err) {
      this.log.debug('pty output ended', { error: String(err) });
    }
    ws.close();
  }
}

function refuse(socket: Duplex, err: unknown, log: Logger): void {
  const apiError = toApiError(err) ?? new ApiError('internal', `internal error: ${(err as Error)?.message ?? String(err)}`);
  if (!toApiError(err)) log.error('pty upgrade failed', { error: (err as Error)?.stack ?? String(err) });
  const body = JSON.stringify(apiError.toBody());
  socket.end(`HTTP/1.1 ${apiError.status} Error\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}
