/**
 * An allowlist, compiled: which names a sandbox may ask for and which addresses it may reach.
 *
 * Names and addresses are separate questions on purpose. A name rule (`example.com`, `*.example.com`,
 * `*`) lets a sandbox ask for that name; the addresses the name resolves to are then used only if
 * they are ordinary addresses, so a name that resolves to 127.0.0.1 (DNS rebinding) opens nothing.
 *
 * The order of the address questions (addressVerdict), refusals first:
 *   1. The server's API port on any guarded address: never, whatever the rules say.
 *   2. Guarded addresses — the host's own, loopback, link-local, cloud metadata (169.254.169.254,
 *      fd00:ec2::254), multicast, reserved and IPv6 transition ranges (special-addresses.ts) — are
 *      refused unless an address rule holding the address lies *within every range guarding it*:
 *      `127.0.0.1/32` or `127.0.0.0/8` open 127.0.0.1; `0.0.0.0/0`, `::/0` or `100.0.0.0/6` do not,
 *      since they do not name loopback, they merely contain it. The metadata address needs a rule for
 *      itself (a link-local /16 does not open it); the host's own interface addresses need a rule for
 *      exactly that address.
 *   3. An address held by an address rule: allowed.
 *   4. Otherwise only through an allowed name, and then not to a private network unless the name is
 *      listed by itself (`*` means the internet) — or an address rule, as in 3.
 *
 * Families never mix: an IPv4 address is matched only against IPv4 rules and an IPv6 address only
 * against IPv6 rules. IPv4-mapped (`::ffff:a.b.c.d`) and well-known NAT64 (`64:ff9b::a.b.c.d`)
 * addresses are their IPv4 address, for the rules and the guards alike (ip-address.ts).
 */
import { parseEgressRule, type EgressPolicy } from '@podflare/protocol';
import { contains, effectiveAddress, effectiveSubnet, formatIp, formatSubnet, parseIp, within, type IpAddress, type Subnet } from './ip-address.js';
import { guardsOf, HostAddresses, PRIVATE_RANGES, type Guard } from './special-addresses.js';

export { normalizeAddress } from './ip-address.js';

export type Verdict = { allowed: true } | { allowed: false; reason: string };

export class EgressMatcher {
  private readonly names = new Set<string>();
  private readonly suffixes: string[] = [];
  private anyName = false;
  /** Address rules, each in effective terms (a mapped-IPv4 rule is an IPv4 rule). */
  private readonly rules: Subnet[] = [];

  /**
   * @param protectedPorts the server's API ports, never reachable on a guarded address
   * @param hostAddresses the host's interface addresses (one cache per egress service)
   */
  constructor(
    readonly policy: EgressPolicy,
    private readonly protectedPorts: () => number[],
    private readonly hostAddresses: HostAddresses = new HostAddresses(),
  ) {
    for (const raw of policy.allow) {
      const rule = parseEgressRule(raw);
      if (typeof rule === 'string') throw new Error(`invalid egress rule ${rule}`); // validated by the API already
      if (rule.kind === 'name') this.names.add(rule.name);
      else if (rule.kind === 'suffix') this.suffixes.push(rule.suffix);
      else if (rule.kind === 'any-name') this.anyName = true;
      else {
        const parsed = parseIp(rule.address);
        if (!parsed || parsed.family !== rule.family) throw new Error(`invalid egress rule ${raw}`);
        this.rules.push(effectiveSubnet({ family: rule.family, base: parsed.value, prefix: rule.prefix }));
      }
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

  /** May a connection go to this address (resolved from the allowed name `viaName`, or asked for by address)? */
  addressVerdict(address: string, port: number | null, viaName: string | null): Verdict {
    const parsed = parseIp(address);
    if (!parsed) return { allowed: false, reason: `${address} is not an IP address` };
    const a = effectiveAddress(parsed);
    const shown = formatIp(a);
    const guards = guardsOf(a, this.hostAddresses);
    if (guards.length > 0) {
      if (port !== null && this.protectedPorts().includes(port)) {
        return { allowed: false, reason: "the server's API is never reachable from a sandbox" };
      }
      if (this.rules.some((r) => opens(r, a, guards))) return { allowed: true };
      return { allowed: false, reason: `${shown} is ${guards.map((g) => g.what).join(', ')}: ${howToOpen(guards)}` };
    }
    if (this.rules.some((r) => contains(r, a))) return { allowed: true };
    if (viaName === null) return { allowed: false, reason: `${shown} is not in the allowlist` };
    if (PRIVATE_RANGES.some((p) => contains(p, a)) && !this.nameListed(viaName)) {
      return { allowed: false, reason: `${shown} is a private address, which "*" does not cover: name the host or allow the address` };
    }
    return { allowed: true };
  }
}

/** A rule opens a guarded address when it holds the address and names every range guarding it. */
function opens(rule: Subnet, address: IpAddress, guards: Guard[]): boolean {
  return contains(rule, address) && guards.every((g) => within(rule, g.subnet));
}

function howToOpen(guards: Guard[]): string {
  // Ranges holding one address are nested: the narrowest is the one a rule must lie within.
  const narrowest = guards.reduce((a, b) => (b.subnet.prefix > a.subnet.prefix ? b : a));
  return `only an address rule within ${formatSubnet(narrowest.subnet)} opens it`;
}
