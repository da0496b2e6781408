/**
 * A test host in a network namespace this test creates itself (ip netns + veth), running a tiny
 * HTTP server (and, when asked, a DNS server with the test's own records). Network tests send
 * traffic only here or to loopback, never anywhere else.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import dns from 'node:dns';

export interface TestHost {
  ip: string;
  port: number;
  /** The host's own end of the veth pair (an address of the host). */
  hostIp: string;
  close(): void;
}

export interface TestHostOptions {
  /** The HTTP server's port. @default 8080 */
  port?: number;
  /**
   * Also answer DNS on <ip>:53 with these A records (name -> IPv4, 'self' for this test host's
   * address, 'host' for the host's end of the veth pair); NXDOMAIN for anything else.
   */
  dns?: Record<string, string>;
}

/** A DNS server (UDP, A records only) in Python's standard library: the test's own resolver. */
const DNS_SERVER = `
import json, socket, struct, sys
records = json.loads(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    at, labels = 12, []
    while q[at]:
        labels.append(q[at + 1:at + 1 + q[at]].decode()); at += 1 + q[at]
    qtype = struct.unpack('>H', q[at + 1:at + 3])[0]
    question = q[12:at + 5]
    name = '.'.join(labels).lower()
    ip = records.get(name)
    if ip == 'self':
        ip = sys.argv[1]
    elif ip == 'host':
        ip = sys.argv[3]
    answers = b''
    if ip and qtype == 1:
        answers = struct.pack('>HHHIH', 0xc00c, 1, 1, 5, 4) + socket.inet_aton(ip)
    rcode = 0 if name in records else 3
    header = struct.pack('>HHHHHH', struct.unpack('>H', q[:2])[0], 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
    s.sendto(header + question + answers, peer)
`;

export async function startTestHost(opts: TestHostOptions = {}): Promise<TestHost> {
  const tag = randomBytes(3).toString('hex');
  const ns = `pft-${tag}`;
  const hostIf = `pfh${tag}`;
  const nsIf = `pfn${tag}`;
  // A /30 in a range reserved for tests on this machine; unique per run.
  const octet = 1 + (parseInt(tag, 16) % 250);
  const hostIp = `10.231.${octet}.1`;
  const ip = `10.231.${octet}.2`;
  const sh = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' });
  sh('netns', 'add', ns);
  let server: ChildProcess | undefined;
  let dnsServer: ChildProcess | undefined;
  const close = () => {
    server?.kill('SIGKILL');
    dnsServer?.kill('SIGKILL');
    try { sh('link', 'del', hostIf); } catch { /* already gone */ }
    try { sh('netns', 'del', ns); } catch { /* already gone */ }
  };
  try {
    sh('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
    sh('link', 'set', nsIf, 'netns', ns);
    sh('addr', 'add', `${hostIp}/30`, 'dev', hostIf);
    sh('link', 'set', hostIf, 'up');
    sh('-n', ns, 'addr', 'add', `${ip}/30`, 'dev', nsIf);
    sh('-n', ns, 'link', 'set', nsIf, 'up');
    sh('-n', ns, 'link', 'set', 'lo', 'up');
    const port = opts.port ?? 8080;
    server = spawn('ip', ['netns', 'exec', ns, '/usr/bin/python3', '-c',
      `import http.server as h
class H(h.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"hello from the test host")
    def log_message(self, *a): pass
h.HTTPServer(("${ip}", ${port}), H).serve_forever()`], { stdio: 'ignore' });
    if (opts.dns) {
      dnsServer = spawn('ip', ['netns', 'exec', ns, '/usr/bin/python3', '-c', DNS_SERVER, ip, JSON.stringify(opts.dns), hostIp], { stdio: 'ignore' });
    }
    // Wait until it answers from the host side.
    for (let i = 0; i < 50; i++) {
      try {
        const res = await fetch(`http://${ip}:${port}/`, { signal: AbortSignal.timeout(500) });
        if (res.ok && (!opts.dns || (await answersDns(ip)))) return { ip, port, hostIp, close };
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('the test host did not come up');
  } catch (err) {
    close();
    throw err;
  }
}

/** True once the test host's DNS server answers (NXDOMAIN counts). */
async function answersDns(ip: string): Promise<boolean> {
  const resolver = new dns.promises.Resolver({ timeout: 300, tries: 1 });
  resolver.setServers([ip]);
  try {
    await resolver.resolve4('ready.check');
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOTFOUND';
  }
}
