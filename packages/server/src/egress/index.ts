/**
 * Egress policies for sandboxes with an allowlist: the server-wide pieces (the resolver allowed
 * names go through, the ports that are never reachable, where events go) and one proxy per sandbox.
 * Runtime-neutral: a runtime supplies listening sockets that only its sandbox can reach.
 */
import type { EgressPolicy } from '@podflare/protocol';
import type { Logger } from '../log.js';
import type { SandboxEventLog } from '../sandbox-events.js';
import { EgressMatcher } from './policy.js';
import { HostAddresses } from './special-addresses.js';
import { EgressProxy, type EgressProxyListeners } from './proxy.js';
import { cachedResolver, createResolver, type NameResolver } from './resolver.js';

export interface EgressServiceOptions {
  /** DNS servers for allowed names ("ip" or "ip:port"); empty: the host's resolver. */
  dnsServers: string[];
  events: SandboxEventLog;
  log: Logger;
}

export class EgressService {
  private readonly resolver: NameResolver;
  /** Ports of the server's API (known once it listens): never reachable on the host's addresses. */
  readonly protectedPorts: number[] = [];
  /** The host's own addresses, guarded from every sandbox's allowlist. */
  private readonly hostAddresses = new HostAddresses();

  constructor(private readonly opts: EgressServiceOptions) {
    this.resolver = cachedResolver(createResolver(opts.dnsServers));
  }

  /** Serves `policy` for sandbox `sandboxId` on its listeners until the returned proxy is closed. */
  attach(sandboxId: string, policy: EgressPolicy, listeners: EgressProxyListeners): EgressProxy {
    return new EgressProxy(listeners, {
      matcher: new EgressMatcher(policy, () => this.protectedPorts, this.hostAddresses),
      resolver: this.resolver,
      record: (event) => this.opts.events.record(sandboxId, event),
      log: this.opts.log.child({ sandbox: sandboxId }),
    });
  }
}

export { EgressMatcher } from './policy.js';
export type { EgressProxy } from './proxy.js';
