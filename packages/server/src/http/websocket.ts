/**
 * The server side of a WebSocket (RFC 6455), small on purpose: the handshake, text messages out,
 * text/binary messages in (masked, fragmented or not), ping/pong and close. Used for the PTY; the
 * exposed-port proxy passes WebSocket bytes through without decoding them.
 *
 * Everything from the client is bounded: a message over `maxMessageBytes` closes the socket (1009).
 */
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { ApiError } from './api-error.js';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

export interface ServerWebSocketOptions {
  maxMessageBytes?: number;
  /** The subprotocol to answer with (one the client offered). */
  protocol?: string;
  onMessage(text: string): void;
  onClose(): void;
}

export class ServerWebSocket {
  private buf: Buffer = Buffer.alloc(0);
  private fragments: Buffer[] = [];
  private fragmentBytes = 0;
  private closed = false;
  private readonly max: number;

  private constructor(private readonly socket: Duplex, private readonly opts: ServerWebSocketOptions) {
    this.max = opts.maxMessageBytes ?? 1024 * 1024;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => this.destroy());
    socket.on('close', () => this.destroy());
  }

  /** Completes the handshake (throws a 400 ApiError for a request that is not a WebSocket one). */
  static accept(req: IncomingMessage, socket: Duplex, head: Buffer, opts: ServerWebSocketOptions): ServerWebSocket {
    const key = req.headers['sec-websocket-key'];
    if (req.headers.upgrade?.toLowerCase() !== 'websocket' || typeof key !== 'string' || !/^[A-Za-z0-9+/]{22}==$/.test(key)) {
      throw new ApiError('bad_request', 'not a WebSocket handshake (Upgrade: websocket and a Sec-WebSocket-Key are required)');
    }
    const accept = createHash('sha1').update(key + GUID).digest('base64');
    // A subprotocol is named only when the caller picked one the client offered (a browser fails the connection otherwise).
    const protocol = opts.protocol && /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(opts.protocol) ? `Sec-WebSocket-Protocol: ${opts.protocol}\r\n` : '';
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n${protocol}\r\n`);
    const ws = new ServerWebSocket(socket, opts);
    if (head.length) ws.onData(head);
    return ws;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Sends one text message; resolves when the socket has taken it (backpressure). */
  send(text: string): Promise<void> {
    if (this.closed) return Promise.resolve();
    const data = Buffer.from(text, 'utf8');
    const ok = this.socket.write(Buffer.concat([frameHead(0x1, data.length), data]));
    if (ok) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { this.socket.off('drain', done); this.socket.off('close', done); resolve(); };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  /** A close frame with `code`, then the end of the connection. */
  close(code = 1000, reason = ''): void {
    if (this.closed) return;
    const payload = Buffer.concat([Buffer.from([code >> 8, code & 0xff]), Buffer.from(reason.slice(0, 100))]);
    this.socket.end(Buffer.concat([frameHead(0x8, payload.length), payload]));
    this.destroy();
  }

  private destroy(): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    this.opts.onClose();
  }

  private onData(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    while (!this.closed && this.buf.length >= 2) {
      const fin = (this.buf[0]! & 0x80) !== 0;
      const opcode = this.buf[0]! & 0x0f;
      const masked = (this.buf[1]! & 0x80) !== 0;
      let len = this.buf[1]! & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        const big = this.buf.readBigUInt64BE(2);
        if (big > BigInt(this.max)) return this.close(1009, 'message too big');
        len = Number(big);
        off = 10;
      }
      if (!masked) return this.close(1002, 'client frames must be masked');
      if (len > this.max || this.fragmentBytes + len > this.max) return this.close(1009, 'message too big');
      if (this.buf.length < off + 4 + len) return;
      const mask = this.buf.subarray(off, off + 4);
      const payload = Buffer.from(this.buf.subarray(off + 4, off + 4 + len));
      for (let i = 0; i < payload.length; i++) payload[i]! ^= mask[i % 4]!;
      this.buf = this.buf.subarray(off + 4 + len);
      if (opcode === 0x8) return this.close();
      if (opcode === 0x9) {
        this.socket.write(Buffer.concat([frameHead(0xa, payload.length), payload]));
        continue;
      }
      if (opcode === 0xa) continue;
      if (opcode !== 0x0 && opcode !== 0x1 && opcode !== 0x2) return this.close(1002, 'unknown opcode');
      this.fragments.push(payload);
      this.fragmentBytes += payload.length;
      if (!fin) continue;
      const message = Buffer.concat(this.fragments).toString('utf8');
      this.fragments = [];
      this.fragmentBytes = 0;
      this.opts.onMessage(message);
    }
  }
}

function frameHead(opcode: number, length: number): Buffer {
  if (length < 126) return Buffer.from([0x80 | opcode, length]);
  if (length < 65536) return Buffer.from([0x80 | opcode, 126, length >> 8, length & 0xff]);
  const head = Buffer.alloc(10);
  head[0] = 0x80 | opcode;
  head[1] = 127;
  head.writeBigUInt64BE(BigInt(length), 2);
  return head;
}
