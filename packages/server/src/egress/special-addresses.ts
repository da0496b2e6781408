/**
 * Addresses a sandbox must not reach by accident: the host's own, loopback, link-local, cloud
 * metadata, multicast, reserved ranges and IPv6 transition ranges (which deliver to an IPv4
 * address this policy cannot see). Each one is a "guard" of the addresses it holds; the policy
 * (policy.ts) opens a guarded address only to an address rule lying within every guard it has.
 */
import os from 'node:os';
import { contains, effectiveAddress, knownSubnet, parseIp, type IpAddress, type Subnet } from './ip-address.js';

/** A guarded range and what it is, for refusal messages ("127.0.0.1 is loopback"). */
export interface Guard {
  subnet: Subnet;
  what: string;
}

const guard = (address: string, prefix: number, what: string): Guard => ({ subnet: knownSubnet(address, prefix), what });

/** The fixed special ranges (IANA special-purpose registries, plus known metadata addresses). */
export const SPECIAL_RANGES: readonly Guard[] = [
  guard('0.0.0.0', 8, '"this network" (0.0.0.0/8, the host itself on Linux)'),
  guard('127.0.0.0', 8, 'loopback'),
  guard('169.254.0.0', 16, 'link-local'),
  guard('169.254.169.254', 32, 'the cloud metadata service'),
  guard('100.100.100.200', 32, 'the cloud metadata service'), // Alibaba Cloud's
  guard('224.0.0.0', 4, 'multicast'),
  guard('240.0.0.0', 4, 'reserved or broadcast'),
  guard('::', 128, 'the unspecified address (the host itself on Linux)'),
  guard('::1', 128, 'loopback'),
  guard('::', 96, 'IPv4-compatible IPv6 (deprecated)'),
  guard('100::', 64, 'discard-only'),
  guard('fe80::', 10, 'link-local'),
  guard('fec0::', 10, 'site-local (deprecated)'),
  guard('ff00::', 8, 'multicast'),
  guard('fd00:ec2::254', 128, 'the cloud metadata service'), // AWS's IPv6 endpoint
  guard('64:ff9b:1::', 48, 'local-use NAT64 (an IPv4 address in an operator-chosen place)'),
  guard('2001::', 32, 'Teredo (IPv6 tunnelled over IPv4)'),
  guard('2002::', 16, '6to4 (IPv6 tunnelled over IPv4)'),
];

/** Private networks: not guarded (address rules open them), but `*` alone does not reach them. */
export const PRIVATE_RANGES: readonly Subnet[] = [
  knownSubnet('10.0.0.0', 8), knownSubnet('172.16.0.0', 12), knownSubnet('192.168.0.0', 16),
  knownSubnet('100.64.0.0', 10), knownSubnet('fc00::', 7),
];

/**
 * The addresses of the host's own interfaces, re-read at most every `maxAgeMs` (interfaces come
 * and go: each sandbox's veth, a VPN). One per egress service, never module-wide, so two servers in
 * one process do not share it.
 */
export class HostAddresses {
  private cached: { at: number; keys: Set<string> } = { at: -Infinity, keys: new Set() };

  constructor(
    private readonly interfaces: () => NodeJS.Dict<os.NetworkInterfaceInfo[]> = () => os.networkInterfaces(),
    private readonly maxAgeMs = 5000,
  ) {}

  has(address: IpAddress): boolean {
    return this.current().has(keyOf(address));
  }

  private current(): Set<string> {
    const now = Date.now();
    if (now - this.cached.at > this.maxAgeMs) {
      const keys = new Set<string>();
      for (const list of Object.values(this.interfaces())) {
        for (const i of list ?? []) {
          const a = parseIp(i.address);
          if (a) keys.add(keyOf(effectiveAddress(a)));
        }
      }
      this.cached = { at: now, keys };
    }
    return this.cached.keys;
  }
}

const keyOf = (a: IpAddress) => `${a.family}:${a.value}`;

const IPV4_LOOPBACK = knownSubnet('127.0.0.0', 8);

/**
 * Every guard of `address` (an effective address): the special ranges holding it, and the host's
 * own address as a one-address range. Not for IPv4 loopback, all of which is the host's own
 * anyway: `127.0.0.0/8` opens all of it, 127.0.0.1 (an interface address) included.
 */
export function guardsOf(address: IpAddress, host: HostAddresses): Guard[] {
  const guards = SPECIAL_RANGES.filter((g) => contains(g.subnet, address));
  if (!contains(IPV4_LOOPBACK, address) && host.has(address)) {
    guards.push({ subnet: { family: address.family, base: address.value, prefix: address.family === 4 ? 32 : 128 }, what: "the host's own address" });
  }
  return guards;
}
