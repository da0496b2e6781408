/**
 * The server side of a SOCKS5 handshake (RFC 1928), no authentication, CONNECT only: enough for
 * `ALL_PROXY=socks5h://…` clients. The policy decision and the relay are the caller's.
 */
import type net from 'node:net';

export const SOCKS_REPLY = { succeeded: 0, failure: 1, notAllowed: 2, hostUnreachable: 4, refused: 5, commandNotSupported: 7, addressNotSupported: 8 } as const;

/** Reads exactly the bytes asked for from a socket in flowing mode, keeping what comes after. */
class ByteReader {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private ended = false;
  private readonly onData = (d: Buffer) => { this.buf = Buffer.concat([this.buf, d]); this.wake(); };
  private readonly onEnd = () => { this.ended = true; this.wake(); };

  constructor(private readonly socket: net.Socket) {
    socket.on('data', this.onData);
    socket.once('end', this.onEnd);
    socket.once('close', this.onEnd);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended || this.buf.length > 1024) throw new Error('the SOCKS client went away or sent too much');
      await new Promise<void>((resolve) => { this.waiter = resolve; });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Stops reading; returns what was received beyond the handshake. */
  release(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.pause();
    return this.buf;
  }
}

export interface SocksRequest {
  host: string;
  port: number;
  /** Bytes the client sent after its request (to forward first). */
  rest: Buffer;
}

/** Runs the handshake; null when the client asked for something we do not do (already answered). */
export async function socksHandshake(socket: net.Socket): Promise<SocksRequest | null> {
  const reader = new ByteReader(socket);
  try {
    const [version, nMethods] = await reader.read(2);
    if (version !== 5) return fail(socket, reader, null);
    const methods = await reader.read(nMethods!);
    if (!methods.includes(0)) {
      socket.end(Buffer.from([5, 0xff]));
      reader.release();
      return null;
    }
    socket.write(Buffer.from([5, 0]));
    const [, command, , addressType] = await reader.read(4);
    let host: string;
    if (addressType === 1) host = [...(await reader.read(4))].join('.');
    else if (addressType === 3) host = (await reader.read((await reader.read(1))[0]!)).toString('latin1');
    else if (addressType === 4) {
      const b = await reader.read(16);
      host = Array.from({ length: 8 }, (_, i) => b.readUInt16BE(i * 2).toString(16)).join(':');
    } else return fail(socket, reader, SOCKS_REPLY.addressNotSupported);
    const port = (await reader.read(2)).readUInt16BE(0);
    if (command !== 1) return fail(socket, reader, SOCKS_REPLY.commandNotSupported);
    return { host, port, rest: reader.release() };
  } catch {
    reader.release();
    socket.destroy();
    return null;
  }
}

function fail(socket: net.Socket, reader: ByteReader, code: number | null): null {
  reader.release();
  if (code === null) socket.destroy();
  else socksReply(socket, code, true);
  return null;
}

export function socksReply(socket: net.Socket, code: number, end = false): void {
  const reply = Buffer.from([5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
  if (end) socket.end(reply);
  else socket.write(reply);
}
