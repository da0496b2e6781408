/**
 * An allowlist, compiled: which names a sandbox may ask for and which addresses it may reach.
 *
 * Names and addresses are separate questions on purpose. A name rule (`example.com`, `*.example.com`,
 * `*`) lets a sandbox ask for that name; the addresses the name resolves to are then used only if
 * they are ordinary addresses. The host's own addresses, loopback, link-local (cloud metadata) and
 * the like are reachable only through an address rule (`127.0.0.1/32`) naming them, so a name that
 * resolves to 127.0.0.1 (DNS rebinding) opens nothing. The server's API is never reachable.
 */
import net from 'node:net';
import os from 'node:os';
import { parseEgressRule, type EgressPolicy } from '@podflare/protocol';

export type Verdict = { allowed: true } | { allowed: false; reason: string };

const SPECIAL_V4: Array<[string, number]> = [
  ['0.0.0.0', 8], // "this network"
  ['127.0.0.0', 8], // loopback
  ['169.254.0.0', 16], // link-local (cloud metadata services live here)
  ['224.0.0.0', 4], // multicast
  ['240.0.0.0', 4], // reserved, broadcast
];
const SPECIAL_V6: Array<[string, number]> = [
  ['::', 128], ['::1', 128], ['fe80::', 10], ['ff00::', 8],
];

const special = new net.BlockList();
for (const [a, p] of SPECIAL_V4) special.addSubnet(a, p, 'ipv4');
for (const [a, p] of SPECIAL_V6) special.addSubnet(a, p, 'ipv6');

/** Private networks: what `*` (any name) does not reach by itself, so it means "the internet". */
const PRIVATE = new net.BlockList();
for (const [a, p] of [['10.0.0.0', 8], ['172.16.0.0', 12], ['192.168.0.0', 16], ['100.64.0.0', 10]] as const) PRIVATE.addSubnet(a, p, 'ipv4');
PRIVATE.addSubnet('fc00::', 7, 'ipv6');

/** Addresses of the host's own interfaces, refreshed at most every few seconds. */
let hostAddresses: { at: number; set: Set<string> } = { at: 0, set: new Set() };
function ownAddresses(): Set<string> {
  if (Date.now() - hostAddresses.at > 5000) {
    const set = new Set<string>();
    for (const list of Object.values(os.networkInterfaces())) for (const i of list ?? []) set.add(normalizeAddress(i.address));
    hostAddresses = { at: Date.now(), set };
  }
  return hostAddresses.set;
}

/** IPv4-mapped IPv6 (::ffff:1.2.3.4) is the IPv4 address; IPv6 zone ids are dropped. */
export function normalizeAddress(address: string): string {
  const a = address.toLowerCase().replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(a);
  return mapped ? mapped[1]! : a;
}

function familyOf(address: string): 'ipv4' | 'ipv6' {
  return net.isIPv4(address) ? 'ipv4' : 'ipv6';
}

/** True for the host's own addresses and ranges no sandbox should reach by accident. */
export function isHostOrSpecial(address: string): boolean {
  const a = normalizeAddress(address);
  return special.check(a, familyOf(a)) || ownAddresses().has(a);
}

export class EgressMatcher {
  private readonly names = new Set<string>();
  private readonly suffixes: string[] = [];
  private anyName = false;
  private readonly addresses = new net.BlockList();

  constructor(readonly policy: EgressPolicy, private readonly protectedPorts: () => number[]) {
    for (const raw of policy.allow) {
      const rule = parseEgressRule(raw);
      if (typeof rule === 'string') throw new Error(`invalid egress rule ${rule}`); // validated by the API already
      if (rule.kind === 'name') this.names.add(rule.name);
      else if (rule.kind === 'suffix') this.suffixes.push(rule.suffix);
      else if (rule.kind === 'any-name') this.anyName = true;
      else this.addresses.addSubnet(rule.address, rule.prefix, rule.family === 4 ? 'ipv4' : 'ipv6');
    }
  }

  /** May the sandbox ask for this name (DNS, CONNECT, a proxied request)? */
  nameAllowed(name: string): boolean {
    return this.anyName || this.nameListed(name);
  }

  /** Named by a name or *.domain rule (not only by `*`). */
  private nameListed(name: string): boolean {
    const n = name.toLowerCase().replace(/\.$/, '');
    return this.names.has(n) || this.suffixes.some((s) => n.endsWith('.' + s));
  }

  /** Named by an address rule (what it takes to reach the host's own or special addresses). */
  addressListed(address: string): boolean {
    const a = normalizeAddress(address);
    return this.addresses.check(a, familyOf(a));
  }

  /** May a connection go to this address (resolved from the allowed name `viaName`, or asked for by address)? */
  addressVerdict(address: string, port: number | null, viaName: string | null): Verdict {
    const a = normalizeAddress(address);
    if (port !== null && this.protectedPorts().includes(port) && isHostOrSpecial(a)) {
      return { allowed: false, reason: "the server's API is never reachable from a sandbox" };
    }
    if (this.addressListed(a)) return { allowed: true };
    if (isHostOrSpecial(a)) return { allowed: false, reason: `${a} is the host's own, loopback or link-local: allow it with an address rule` };
    if (viaName === null) return { allowed: false, reason: `${a} is not in the allowlist` };
    if (PRIVATE.check(a, familyOf(a)) && !this.nameListed(viaName)) {
      return { allowed: false, reason: `${a} is a private address, which "*" does not cover: name the host or allow the address` };
    }
    return { allowed: true };
  }
}
