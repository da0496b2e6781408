/**
 * A test host in a network namespace this test creates itself (ip netns + veth), running a tiny
 * HTTP server. Network tests send traffic only here or to loopback, never anywhere else.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';

export interface TestHost {
  ip: string;
  port: number;
  close(): void;
}

export async function startTestHost(): Promise<TestHost> {
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
  const close = () => {
    server?.kill('SIGKILL');
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
    const port = 8080;
    server = spawn('ip', ['netns', 'exec', ns, '/usr/bin/python3', '-c',
      `import http.server as h
class H(h.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"hello from the test host")
    def log_message(self, *a): pass
h.HTTPServer(("${ip}", ${port}), H).serve_forever()`], { stdio: 'ignore' });
    // Wait until it answers from the host side.
    for (let i = 0; i < 50; i++) {
      try {
        const res = await fetch(`http://${ip}:${port}/`, { signal: AbortSignal.timeout(500) });
        if (res.ok) return { ip, port, close };
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('the test host did not come up');
  } catch (err) {
    close();
    throw err;
  }
}
