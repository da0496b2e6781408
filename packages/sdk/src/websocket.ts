/**
 * The client side of a WebSocket, small on purpose (Node 20 has no WebSocket built in): masked text
 * frames out, text frames in, ping answered, close. Used for the PTY.
 */
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';

export class ClientWebSocket {
  #buf: Buffer = Buffer.alloc(0);
  #fragments: Buffer[] = [];
  #closed = false;

  /** @internal */
  constructor(private readonly socket: Duplex, head: Buffer, private readonly onMessage: (text: string) => void, private readonly onClose: () => void) {
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('close', () => this.#end());
    socket.on('error', () => this.#end());
    // Deferred: the caller has not got this object yet when the first message is already here.
    if (head.length) queueMicrotask(() => this.#onData(head));
  }

  get closed(): boolean {
    return this.#closed;
  }

  send(text: string): void {
    if (this.#closed) return;
    this.#frame(0x1, Buffer.from(text, 'utf8'));
  }

  close(): void {
    if (this.#closed) return;
    this.#frame(0x8, Buffer.from([0x03, 0xe8]));
    this.socket.end();
    this.#end();
  }

  #frame(opcode: number, data: Buffer): void {
    const mask = randomBytes(4);
    const len = data.length;
    const head = len < 126 ? Buffer.from([0x80 | opcode, 0x80 | len])
      : len < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, len >> 8, len & 0xff])
        : Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(len)); return b; })()]);
    const masked = Buffer.alloc(len);
    for (let i = 0; i < len; i++) masked[i] = data[i]! ^ mask[i % 4]!;
    this.socket.write(Buffer.concat([head, mask, masked]));
  }

  #end(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.socket.destroy();
    this.onClose();
  }

  #onData(chunk: Buffer): void {
    this.#buf = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : chunk;
    while (this.#buf.length >= 2) {
      const fin = (this.#buf[0]! & 0x80) !== 0;
      const opcode = this.#buf[0]! & 0x0f;
      let len = this.#buf[1]! & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.#buf.length < 4) return;
        len = this.#buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.#buf.length < 10) return;
        len = Number(this.#buf.readBigUInt64BE(2));
        off = 10;
      }
      if (this.#buf.length < off + len) return;
      const payload = this.#buf.subarray(off, off + len);
      this.#buf = this.#buf.subarray(off + len);
      if (opcode === 0x8) return this.#end();
      if (opcode === 0x9) { this.#frame(0xa, Buffer.from(payload)); continue; }
      if (opcode === 0xa) continue;
      this.#fragments.push(Buffer.from(payload));
      if (!fin) continue;
      const text = Buffer.concat(this.#fragments).toString('utf8');
      this.#fragments = [];
      this.onMessage(text);
    }
  }
}
