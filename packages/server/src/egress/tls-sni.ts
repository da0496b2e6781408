/**
 * The server name (SNI) a TLS client asks for in its ClientHello (RFC 8446 §4.1.2, RFC 6066 §3),
 * read from the first bytes a client sends through a tunnel. A ClientHello split across several
 * TLS records is put back together first, so splitting it hides nothing.
 */

export type HelloScan =
  | { kind: 'not-tls' }
  | { kind: 'incomplete' }
  | { kind: 'malformed' }
  | { kind: 'hello'; sni: string | null };

const MAX_HELLO = 64 * 1024;

export function scanClientHello(buf: Buffer): HelloScan {
  if (buf.length === 0) return { kind: 'incomplete' };
  if (buf[0] !== 0x16) return { kind: 'not-tls' };
  // Reassemble the handshake message from consecutive handshake records.
  const parts: Buffer[] = [];
  let have = 0;
  let at = 0;
  let need = -1;
  while (need < 0 || have < need) {
    if (at + 5 > buf.length) return buf.length > MAX_HELLO ? { kind: 'malformed' } : { kind: 'incomplete' };
    if (buf[at] !== 0x16) return { kind: 'malformed' };
    const len = buf.readUInt16BE(at + 3);
    if (at + 5 + len > buf.length) return buf.length > MAX_HELLO ? { kind: 'malformed' } : { kind: 'incomplete' };
    parts.push(buf.subarray(at + 5, at + 5 + len));
    have += len;
    at += 5 + len;
    if (need < 0 && have >= 4) {
      const hs = Buffer.concat(parts);
      if (hs[0] !== 0x01) return { kind: 'malformed' }; // not a ClientHello
      need = 4 + hs.readUIntBE(1, 3);
      if (need > MAX_HELLO) return { kind: 'malformed' };
    }
  }
  return parseHello(Buffer.concat(parts).subarray(4, need));
}

function parseHello(h: Buffer): HelloScan {
  try {
    let at = 2 + 32; // legacy_version, random
    at += 1 + h[at]!; // session id
    at += 2 + h.readUInt16BE(at); // cipher suites
    at += 1 + h[at]!; // compression methods
    if (at === h.length) return { kind: 'hello', sni: null }; // no extensions
    const end = at + 2 + h.readUInt16BE(at);
    at += 2;
    if (end > h.length) return { kind: 'malformed' };
    while (at + 4 <= end) {
      const type = h.readUInt16BE(at);
      const len = h.readUInt16BE(at + 2);
      at += 4;
      if (at + len > end) return { kind: 'malformed' };
      if (type === 0) {
        // server_name_list: one host_name entry (type 0) is all RFC 6066 allows.
        let p = at + 2;
        while (p + 3 <= at + len) {
          const nameType = h[p]!;
          const nameLen = h.readUInt16BE(p + 1);
          if (p + 3 + nameLen > at + len) return { kind: 'malformed' };
          if (nameType === 0) return { kind: 'hello', sni: h.toString('latin1', p + 3, p + 3 + nameLen).toLowerCase() };
          p += 3 + nameLen;
        }
        return { kind: 'malformed' };
      }
      at += len;
    }
    return { kind: 'hello', sni: null };
  } catch {
    return { kind: 'malformed' }; // read past the end
  }
}
