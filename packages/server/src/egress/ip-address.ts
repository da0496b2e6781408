/**
 * IP addresses and subnets as numbers, for the egress policy. Written out rather than taken from
 * `net.BlockList` on purpose: BlockList matches IPv4 addresses against IPv6 subnets (`::/0` holds
 * 127.0.0.1) and IPv4 subnets against IPv4-mapped IPv6 addresses, and the policy needs to know
 * whether one subnet lies within another, which BlockList cannot say.
 *
 * Embedded IPv4 addresses: an IPv6 address that a connection really delivers to an IPv4 address is
 * that IPv4 address here ({@link effectiveAddress}), so IPv4 rules and IPv4 refusals apply to it:
 *   - `::ffff:0:0/96`  IPv4-mapped: a dual-stack socket connects to the IPv4 address itself;
 *   - `64:ff9b::/96`   the well-known NAT64 prefix (RFC 6052): a translator on the path connects to
 *                      the IPv4 address on our behalf.
 * Other embeddings (6to4 `2002::/16`, Teredo `2001::/32`, IPv4-compatible `::/96`, local-use NAT64
 * `64:ff9b:1::/48`, whose IPv4 part sits where its operator chose) are not translated here: they
 * are special ranges of their own (see special-addresses.ts), refused unless a rule names them.
 */
import net from 'node:net';

export type IpFamily = 4 | 6;

/** An address as a number: 32 bits for IPv4, 128 for IPv6. */
export interface IpAddress {
  family: IpFamily;
  value: bigint;
}

/** A block of addresses: those whose first `prefix` bits equal `base`'s. */
export interface Subnet {
  family: IpFamily;
  base: bigint;
  prefix: number;
}

const bitsOf = (family: IpFamily) => (family === 4 ? 32 : 128);

function parseV4(text: string): bigint | null {
  if (!net.isIPv4(text)) return null;
  return text.split('.').reduce((acc, part) => (acc << 8n) | BigInt(Number(part)), 0n);
}

function parseV6(text: string): bigint | null {
  if (!net.isIPv6(text)) return null;
  let s = text;
  // A dotted IPv4 tail (::ffff:1.2.3.4) is the last two 16-bit groups.
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (dotted) {
    const v4 = parseV4(dotted[1]!);
    if (v4 === null) return null;
    s = s.slice(0, -dotted[1]!.length) + `${(v4 >> 16n).toString(16)}:${(v4 & 0xffffn).toString(16)}`;
  }
  const [head, tail] = s.split('::') as [string, string | undefined];
  const groups = (part: string | undefined) => (part ? part.split(':') : []);
  const left = groups(head);
  const right = groups(tail);
  const all = tail === undefined ? left : [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  if (all.length !== 8) return null;
  return all.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g, 16)), 0n);
}

/** Parses an IPv4 or IPv6 address (an IPv6 zone id, `%eth0`, is dropped); null when it is neither. */
export function parseIp(text: string): IpAddress | null {
  const t = text.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1').replace(/%.*$/, '');
  const v4 = parseV4(t);
  if (v4 !== null) return { family: 4, value: v4 };
  const v6 = parseV6(t);
  return v6 === null ? null : { family: 6, value: v6 };
}

/** A subnet from its written base address and prefix length; null when they do not make one. */
export function subnet(address: string, prefix: number): Subnet | null {
  const a = parseIp(address);
  if (!a || !Number.isInteger(prefix) || prefix < 0 || prefix > bitsOf(a.family)) return null;
  return { family: a.family, base: a.value, prefix };
}

/** A subnet known to be valid (for the tables written in the code). */
export function knownSubnet(address: string, prefix: number): Subnet {
  const s = subnet(address, prefix);
  if (!s) throw new Error(`not a subnet: ${address}/${prefix}`);
  return s;
}

/** True when `address` is in `block`. Families never mix: an IPv4 address is in no IPv6 block. */
export function contains(block: Subnet, address: IpAddress): boolean {
  if (block.family !== address.family) return false;
  const shift = BigInt(bitsOf(block.family) - block.prefix);
  return address.value >> shift === block.base >> shift;
}

/** True when every address of `inner` is in `outer` (same family, at least as long a prefix). */
export function within(inner: Subnet, outer: Subnet): boolean {
  return inner.family === outer.family && inner.prefix >= outer.prefix && contains(outer, { family: inner.family, value: inner.base });
}

const IPV4_MAPPED = knownSubnet('::ffff:0:0', 96);
const NAT64_WELL_KNOWN = knownSubnet('64:ff9b::', 96);
const LOW_32 = 0xffff_ffffn;

/** The IPv4 address an IPv6 address delivers to (mapped or well-known NAT64), else the address itself. */
export function effectiveAddress(a: IpAddress): IpAddress {
  if (contains(IPV4_MAPPED, a) || contains(NAT64_WELL_KNOWN, a)) return { family: 4, value: a.value & LOW_32 };
  return a;
}

/**
 * A rule's subnet in the same terms as {@link effectiveAddress}: a rule written inside the mapped or
 * NAT64 prefix (`::ffff:10.0.0.0/104`) is the IPv4 rule it spells (`10.0.0.0/8`). A rule wider than
 * those prefixes (`::/0`) stays an IPv6 rule and so holds no IPv4 address.
 */
export function effectiveSubnet(s: Subnet): Subnet {
  for (const prefix of [IPV4_MAPPED, NAT64_WELL_KNOWN]) {
    if (within(s, prefix)) return { family: 4, base: s.base & LOW_32, prefix: s.prefix - 96 };
  }
  return s;
}

/** The address written out: dotted IPv4, or IPv6 in its shortest form. */
export function formatIp(a: IpAddress): string {
  if (a.family === 4) return [24n, 16n, 8n, 0n].map((s) => String((a.value >> s) & 0xffn)).join('.');
  const groups = Array.from({ length: 8 }, (_, i) => ((a.value >> BigInt(112 - 16 * i)) & 0xffffn).toString(16));
  // The WHATWG URL parser writes IPv6 in its canonical compressed form (RFC 5952).
  return new URL(`http://[${groups.join(':')}]/`).hostname.slice(1, -1);
}

export function formatSubnet(s: Subnet): string {
  return `${formatIp({ family: s.family, value: s.base })}/${s.prefix}`;
}

/**
 * The address in the form the proxy connects to: IPv4-mapped IPv6 as IPv4, the zone id dropped,
 * anything else as given (lower case). Unlike {@link effectiveAddress}, NAT64 addresses stay IPv6:
 * the path to them goes through the translator.
 */
export function normalizeAddress(address: string): string {
  const a = address.toLowerCase().replace(/%.*$/, '');
  const parsed = parseIp(a);
  if (parsed && contains(IPV4_MAPPED, parsed)) return formatIp({ family: 4, value: parsed.value & LOW_32 });
  return a;
}
