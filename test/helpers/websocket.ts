/**
 * A minimal WebSocket client for tests (Node 20 has none built in): the RFC 6455 handshake over a
 * plain socket, masked text frames out, unmasked frames in. Enough to check that frames pass a proxy.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';

export interface TestWebSocket {
  /** The status line and headers of the server's answer to the handshake. */
  response: string;
  send(text: string): void;
  /** The next text frame's payload. */
  next(timeoutMs?: number): Promise<string>;
  close(): void;
}

/** Opens a WebSocket to `http://host:port` + `path`; rejects with the answer when it is not a 101. */
export function openWebSocket(port: number, path: string, headers: Record<string, string> = {}, host = '127.0.0.1'): Promise<TestWebSocket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    let buf = Buffer.alloc(0);
    let response: string | null = null;
    const frames: string[] = [];
    const waiters: Array<(s: string) => void> = [];
    socket.once('error', reject);
    socket.on('connect', () => {
      const lines = [`GET ${path} HTTP/1.1`, `Host: ${headers.Host ?? `127.0.0.1:${port}`}`, 'Upgrade: websocket', 'Connection: Upgrade',
        `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`, 'Sec-WebSocket-Version: 13'];
      for (const [k, v] of Object.entries(headers)) if (k !== 'Host') lines.push(`${k}: ${v}`);
      socket.write(lines.join('\r\n') + '\r\n\r\n');
    });
    const parseFrames = () => {
      while (buf.length >= 2) {
        let len = buf[1]! & 0x7f;
        let off = 2;
        if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
        else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
        if (buf.length < off + len) return;
        const payload = buf.subarray(off, off + len).toString('utf8');
        const opcode = buf[0]! & 0x0f;
        buf = buf.subarray(off + len);
        if (opcode === 1 || opcode === 2) {
          const w = waiters.shift();
          if (w) w(payload); else frames.push(payload);
        }
      }
    };
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      if (response === null) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        response = buf.subarray(0, end).toString('latin1');
        buf = buf.subarray(end + 4);
        if (!/^HTTP\/1\.1 101/.test(response)) {
          socket.on('end', () => reject(Object.assign(new Error(`handshake refused: ${response}`), { response: response + '\r\n\r\n' + buf.toString() })));
          socket.resume();
          return;
        }
        resolve({
          response,
          send(text: string) {
            const data = Buffer.from(text);
            const mask = randomBytes(4);
            const head = data.length < 126 ? Buffer.from([0x81, 0x80 | data.length])
              : Buffer.from([0x81, 0x80 | 126, data.length >> 8, data.length & 0xff]);
            const masked = Buffer.from(data.map((b, i) => b ^ mask[i % 4]!));
            socket.write(Buffer.concat([head, mask, masked]));
          },
          next(timeoutMs = 20_000) {
            const ready = frames.shift();
            if (ready !== undefined) return Promise.resolve(ready);
            return new Promise((res, rej) => {
              const timer = setTimeout(() => rej(new Error('no WebSocket frame in time')), timeoutMs);
              waiters.push((s) => { clearTimeout(timer); res(s); });
            });
          },
          close() { socket.destroy(); },
        });
      }
      parseFrames();
    });
  });
}
