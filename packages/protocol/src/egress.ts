/**
 * The egress setting of a sandbox and the syntax of its allowlist rules, shared by the server
 * (validation and enforcement) and the SDKs. Runtime-dependency free.
 *
 * `egress: true`  user-mode networking, anything the host can reach except its own loopback;
 * `egress: false` no network at all (not even DNS);
 * `egress: {allow: [...]}` only through the host's policy proxy, to the hosts the rules name:
 *   - `example.com`   that name exactly (any port);
 *   - `*.example.com` any name below example.com (not example.com itself);
 *   - `*`             any name, public addresses only (private ones need the name listed or an
 *                     address rule; the host's own, loopback and link-local stay denied);
 *   - `10.1.2.3`, `10.0.0.0/8`, `fd00::/8` an address or CIDR block, for connections by address
 *     and for what allowed names resolve to. IPv4 rules hold IPv4 addresses only, IPv6 rules IPv6
 *     only (`::ffff:a.b.c.d` is IPv4). The host's own addresses, loopback, link-local, metadata and
 *     other guarded ranges open only to a rule lying within them (`127.0.0.1/32`, never `0.0.0.0/0`
 *     or `::/0`), and the server's API port never (server: egress/policy.ts, docs/api.md).
 */

export interface EgressPolicy {
  allow: string[];
}

export type EgressSetting = boolean | EgressPolicy;

export const MAX_EGRESS_RULES = 256;

export type EgressRule =
  | { kind: 'name'; name: string }
  | { kind: 'suffix'; suffix: string }
  | { kind: 'any-name' }
  | { kind: 'cidr'; family: 4 | 6; address: string; prefix: number };

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

export function isHostName(s: string): boolean {
  if (s.length === 0 || s.length > 253) return false;
  const labels = s.split('.');
  // A name made of digits and dots only would be read as an address by clients.
  if (labels.every((l) => /^\d+$/.test(l))) return false;
  return labels.every((l) => LABEL.test(l));
}

export function isIPv4(s: string): boolean {
  const parts = s.split('.');
  return parts.length === 4 && parts.every((p) => /^(0|[1-9]\d{0,2})$/.test(p) && Number(p) <= 255);
}

export function isIPv6(s: string): boolean {
  if (!s.includes(':') || !/^[0-9a-fA-F:.]+$/.test(s)) return false;
  try {
    // The WHATWG URL parser implements the full IPv6 grammar (and is everywhere).
    new URL(`http://[${s}]/`);
    return true;
  } catch {
    return false;
  }
}

/** Parses one allowlist rule; a string describing the problem when it is not one. */
export function parseEgressRule(raw: string): EgressRule | string {
  const rule = raw.trim().toLowerCase().replace(/\.$/, '');
  if (rule === '*') return { kind: 'any-name' };
  if (rule.startsWith('*.')) {
    const suffix = rule.slice(2);
    return isHostName(suffix) ? { kind: 'suffix', suffix } : `"${raw}": not a valid *.domain`;
  }
  const slash = rule.indexOf('/');
  const address = slash === -1 ? rule : rule.slice(0, slash);
  const family = isIPv4(address) ? 4 : isIPv6(address) ? 6 : 0;
  if (family !== 0) {
    const max = family === 4 ? 32 : 128;
    const prefixText = slash === -1 ? String(max) : rule.slice(slash + 1);
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > max) return `"${raw}": prefix length must be 0-${max}`;
    return { kind: 'cidr', family, address, prefix: Number(prefixText) };
  }
  if (slash !== -1) return `"${raw}": not an address in CIDR notation`;
  return isHostName(rule) ? { kind: 'name', name: rule } : `"${raw}": not a host name, *.domain, address or CIDR`;
}

export function isEgressPolicy(e: EgressSetting | undefined): e is EgressPolicy {
  return typeof e === 'object' && e !== null && Array.isArray((e as EgressPolicy).allow);
}
