/**
 * Where the egress policy proxy answers inside a sandbox with an allowlist (its network namespace
 * has only `lo`). DNS sits at slirp's address so the image's resolv.conf works in both modes.
 */
export const EGRESS_ADDRESSES = {
  proxyHost: '127.0.0.1',
  httpProxyPort: 3128,
  socksPort: 1080,
  dnsHost: '10.0.2.3',
  /**
   * Ports taken over for programs that ignore the proxy variables: every IPv4 address is made local
   * to the namespace (`ip route add local 0.0.0.0/0 dev lo`), so a direct connection to any
   * address on these ports lands on the proxy's listener, which reads where it was going from the
   * connection's local address, and the name from the Host header or the TLS server name.
   */
  transparentPorts: { http: 80, tls: 443 },
} as const;

/** The environment that points programs in the sandbox at the proxy (curl, pip, urllib, requests, …). */
export function proxyEnvironment(): Record<string, string> {
  const http = `http://${EGRESS_ADDRESSES.proxyHost}:${EGRESS_ADDRESSES.httpProxyPort}`;
  const socks = `socks5h://${EGRESS_ADDRESSES.proxyHost}:${EGRESS_ADDRESSES.socksPort}`;
  const noProxy = 'localhost,127.0.0.1,::1';
  return {
    HTTP_PROXY: http, http_proxy: http,
    HTTPS_PROXY: http, https_proxy: http,
    ALL_PROXY: socks, all_proxy: socks,
    NO_PROXY: noProxy, no_proxy: noProxy,
  };
}
