/**
 * Just enough of the DNS wire format (RFC 1035) for the stub resolver a sandbox with an allowlist
 * talks to: one question in, A/AAAA answers or an error code out.
 */
import net from 'node:net';

export const RCODE = { noError: 0, formErr: 1, servFail: 2, nxDomain: 3, notImp: 4, refused: 5 } as const;
export const QTYPE = { A: 1, AAAA: 28 } as const;

export interface DnsQuery {
  id: number;
  flags: number;
  name: string;
  type: number;
  qclass: number;
  /** The question section as received, echoed in the answer. */
  question: Buffer;
}

/** The query's single question, or null for anything malformed. */
export function parseQuery(msg: Buffer): DnsQuery | null {
  if (msg.length < 12) return null;
  const flags = msg.readUInt16BE(2);
  if (flags & 0x8000 || msg.readUInt16BE(4) !== 1) return null; // a response, or not exactly one question
  const labels: string[] = [];
  let at = 12;
  for (;;) {
    if (at >= msg.length) return null;
    const len = msg[at]!;
    if (len === 0) { at++; break; }
    if (len > 63 || at + 1 + len > msg.length) return null; // compression pointers have no place in a question
    labels.push(msg.toString('latin1', at + 1, at + 1 + len));
    at += 1 + len;
  }
  if (at + 4 > msg.length) return null;
  return {
    id: msg.readUInt16BE(0), flags, name: labels.join('.').toLowerCase(),
    type: msg.readUInt16BE(at), qclass: msg.readUInt16BE(at + 2), question: msg.subarray(12, at + 4),
  };
}

function addressBytes(address: string): Buffer | null {
  if (net.isIPv4(address)) return Buffer.from(address.split('.').map(Number));
  if (!net.isIPv6(address)) return null;
  let a = address;
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(a);
  if (v4) {
    const [b0, b1, b2, b3] = v4.slice(1).map(Number) as [number, number, number, number];
    a = a.slice(0, v4.index) + ((b0 << 8) | b1).toString(16) + ':' + ((b2 << 8) | b3).toString(16);
  }
  const [head, tail] = a.split('::') as [string, string | undefined];
  const h = head ? head.split(':') : [];
  const t = tail === undefined ? null : tail ? tail.split(':') : [];
  const groups = t === null ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}

/** An answer to `q`: `rcode`, and for NOERROR the addresses as A or AAAA records (what fits in 512 bytes). */
export function buildAnswer(q: DnsQuery, rcode: number, addresses: string[] = [], ttl = 30): Buffer {
  const records: Buffer[] = [];
  let size = 12 + q.question.length;
  for (const address of addresses) {
    const rdata = addressBytes(address);
    if (!rdata || (q.type === QTYPE.A) !== (rdata.length === 4)) continue;
    const rr = Buffer.alloc(12 + rdata.length);
    rr.writeUInt16BE(0xc00c, 0); // the name: a pointer to the question's
    rr.writeUInt16BE(q.type, 2);
    rr.writeUInt16BE(1, 4); // IN
    rr.writeUInt32BE(ttl, 6);
    rr.writeUInt16BE(rdata.length, 10);
    rdata.copy(rr, 12);
    if (size + rr.length > 512) break;
    size += rr.length;
    records.push(rr);
  }
  const header = Buffer.alloc(12);
  header.writeUInt16BE(q.id, 0);
  // QR, the query's opcode and RD, RA, and the code.
  header.writeUInt16BE(0x8000 | (q.flags & 0x7900) | 0x0080 | (rcode & 0xf), 2);
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(records.length, 6);
  return Buffer.concat([header, q.question, ...records]);
}

/** An error answer to a message too broken to parse fully (its id, when it has one). */
export function formatError(msg: Buffer): Buffer | null {
  if (msg.length < 2) return null;
  const header = Buffer.alloc(12);
  header.writeUInt16BE(msg.readUInt16BE(0), 0);
  header.writeUInt16BE(0x8000 | RCODE.formErr, 2);
  return header;
}
