/**
 * Egress allowlists: a sandbox created with `egress: {allow: [...]}` reaches only what its rules
 * name, through the server's policy proxy; DNS answers only allowed names; denied attempts show in
 * the sandbox's events; the server's API and the host's loopback stay out of reach. Traffic goes
 * only to test hosts in network namespaces this test creates (and to loopback); names resolve
 * through the test's own DNS server in one of them.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { BadRequestError, Sandbox, type SandboxEvent } from 'podflare';
import { startTestHost, type TestHost } from './helpers/netns.js';
import { startTestServer, type TestServer } from './helpers/server.js';

/** Python fetching a URL through the proxy the environment names; prints the body or the failure. */
const fetchFrom = (url: string) => `import urllib.request, urllib.error
try:
    print(urllib.request.urlopen("${url}", timeout=5).read().decode())
except urllib.error.HTTPError as e:
    print("http", e.code)
except Exception as e:
    print("failed", type(e).__name__)`;

/** The same, without any proxy (urllib's default opener keeps the proxies it first saw). */
const fetchDirect = (url: string) => fetchFrom(url).replace('urllib.request.urlopen(', 'urllib.request.build_opener(urllib.request.ProxyHandler({})).open(');

/** Python asking the sandbox's resolver (glibc, /etc/resolv.conf) for a name. */
const resolve = (name: string) => `import socket
try:
    print(sorted({a[4][0] for a in socket.getaddrinfo("${name}", 80, socket.AF_INET)}))
except socket.gaierror as e:
    print("gaierror", e.errno)`;

/** Python opening a TCP connection straight to an address (no proxy). */
const connectDirect = (host: string, port: number) => `import socket
s = socket.socket()
s.settimeout(3)
try:
    s.connect(("${host}", ${port}))
    print("open")
except Exception as e:
    print(type(e).__name__)`;

/** Python, indented as an `if` body: a GET on the open connection `s`, then the page printed. */
const GET_AND_PRINT_BODY = `    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    print(data.decode().split("\\r\\n\\r\\n", 1)[1])`;

/** Python speaking HTTP CONNECT to the proxy, then a GET through the tunnel; prints the status line(s). */
const connectTunnel = (target: string) => `import os, socket
proxy = os.environ["HTTPS_PROXY"].split("//")[1]
host, port = proxy.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(b"CONNECT ${target} HTTP/1.1\\r\\nHost: ${target}\\r\\n\\r\\n")
head = s.recv(4096).decode()
print(head.split("\\r\\n")[0])
if " 200 " in head:
${GET_AND_PRINT_BODY}`;

/** Python speaking SOCKS5 (by name) to the proxy in ALL_PROXY; prints the reply code and the page. */
const socksFetch = (name: string, port: number) => `import os, socket, struct
proxy = os.environ["ALL_PROXY"].split("//")[1]
host, pport = proxy.rsplit(":", 1)
s = socket.create_connection((host, int(pport)), timeout=5)
s.sendall(b"\\x05\\x01\\x00")
assert s.recv(2) == b"\\x05\\x00"
name = b"${name}"
s.sendall(b"\\x05\\x01\\x00\\x03" + bytes([len(name)]) + name + struct.pack(">H", ${port}))
reply = s.recv(10)
print("reply", reply[1])
if reply[1] == 0:
${GET_AND_PRINT_BODY}`;

/** The sandbox's NO_PROXY sends loopback straight to the sandbox's own lo: these calls ask the proxy. */
const viaProxy = { env: { NO_PROXY: '', no_proxy: '' } };

/**
 * Sockets this process (the server) holds in network namespaces other than its own: the proxy's
 * listeners live in sandboxes' namespaces, so their inodes are missing from our /proc/net tables.
 */
function foreignSockets(): Set<string> {
  const own = new Set<string>();
  for (const table of ['tcp', 'tcp6', 'udp', 'udp6', 'unix', 'raw', 'raw6', 'netlink', 'packet']) {
    try {
      const lines = readFileSync(`/proc/self/net/${table}`, 'utf8').split('\n').slice(1);
      const col = table === 'unix' ? 6 : table === 'packet' ? 8 : 9;
      for (const l of lines) { const inode = l.trim().split(/\s+/)[col]; if (inode) own.add(inode); }
    } catch { /* table absent */ }
  }
  const found = new Set<string>();
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`));
      if (m && !own.has(m[1]!)) found.add(m[1]!);
    } catch { /* closed meanwhile */ }
  }
  return found;
}

/**
 * Python opening a CONNECT tunnel and starting TLS with server name `sni` (its ClientHello, from
 * the ssl module, optionally split over two TLS records); prints whether the far side answered.
 */
const tlsThroughTunnel = (target: string, sni: string, split = false) => `import os, socket, ssl, struct
ctx = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname="${sni}")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
if ${split ? 'True' : 'False'}:
    body = hello[5:]
    hello = b"".join(b"\\x16\\x03\\x01" + struct.pack(">H", len(p)) + p for p in (body[:40], body[40:]))
proxy = os.environ["HTTPS_PROXY"].split("//")[1]
host, port = proxy.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(b"CONNECT ${target} HTTP/1.1\\r\\n\\r\\n")
assert b" 200 " in s.recv(4096)
s.sendall(hello)
try:
    print("answered" if s.recv(4096) else "closed")
except ConnectionResetError:
    print("closed")`;

const denials = (events: SandboxEvent[]) => events.filter((e) => e.type === 'egress_denied').map((e) => `${e.data.via} ${e.data.host}${e.data.port === null ? '' : `:${e.data.port}`}`);

describe('egress allowlists', () => {
  let server: TestServer;
  let allowed: TestHost; // serves allowed.test, a.zone.test; runs the test's DNS server
  let other: TestHost; // serves other.test: never allowed by name
  let loopService: http.Server;
  let loopPort: number;
  let apiPort: number;
  let sbx: Sandbox;

  before(async () => {
    // Port 80: direct connections (no proxy variables) to port 80 are taken over by the proxy too.
    other = await startTestHost({ port: 80 });
    allowed = await startTestHost({
      port: 80,
      dns: {
        'allowed.test': 'self', 'a.zone.test': 'self', 'zone.test': 'self', 'other.test': other.ip,
        'loop.test': '127.0.0.1', 'hostside.test': 'host',
      },
    });
    server = await startTestServer({ egressDnsServers: [allowed.ip] });
    apiPort = Number(new URL(server.url).port);
    loopService = http.createServer((_req, res) => res.end('loopback service'));
    await new Promise<void>((r) => loopService.listen(0, '127.0.0.1', () => r()));
    loopPort = (loopService.address() as AddressInfo).port;
    sbx = await Sandbox.create({ host: server.url, egress: { allow: ['allowed.test', '*.zone.test', `${other.ip}/32`] } });
  });
  after(async () => {
    await sbx?.close();
    loopService?.close();
    allowed?.close();
    other?.close();
    await server?.stop();
  });

  const page = 'hello from the test host';

  it('lets through the names and addresses the rules allow, and nothing else', async () => {
    assert.equal((await sbx.runCode(fetchFrom(`http://allowed.test:${allowed.port}/`))).stdout.trim(), page);
    assert.equal((await sbx.runCode(fetchFrom(`http://a.zone.test:${allowed.port}/`))).stdout.trim(), page);
    // By address: the CIDR rule's host only.
    assert.equal((await sbx.runCode(fetchFrom(`http://${other.ip}:${other.port}/`))).stdout.trim(), page);
    assert.equal((await sbx.runCode(fetchFrom(`http://${allowed.ip}:${allowed.port}/`))).stdout.trim(), 'http 403');
    // Names need a name rule, even when they resolve into an allowed block; *.zone.test is not zone.test.
    assert.equal((await sbx.runCode(fetchFrom(`http://other.test:${other.port}/`))).stdout.trim(), 'http 403');
    assert.equal((await sbx.runCode(fetchFrom(`http://zone.test:${allowed.port}/`))).stdout.trim(), 'http 403');
  });

  it('tunnels CONNECT and SOCKS5 to allowed hosts only', async () => {
    const ok = await sbx.runCode(connectTunnel(`allowed.test:${allowed.port}`));
    assert.equal(ok.stdout, `HTTP/1.1 200 Connection Established\n${page}\n`, ok.stderr);
    assert.match((await sbx.runCode(connectTunnel(`other.test:${other.port}`))).stdout, /^HTTP\/1.1 403 /);
    const socks = await sbx.runCode(socksFetch('a.zone.test', allowed.port));
    assert.equal(socks.stdout, `reply 0\n${page}\n`, socks.stderr);
    assert.equal((await sbx.runCode(socksFetch('other.test', other.port))).stdout, 'reply 2\n'); // "not allowed by ruleset"
  });

  it('checks the TLS server name inside a CONNECT tunnel against the rules', async () => {
    const target = `allowed.test:${allowed.port}`;
    // The test host speaks HTTP, so it answers a ClientHello with an error: an answer means "let through".
    const first = await sbx.runCode(tlsThroughTunnel(target, 'allowed.test'));
    assert.equal(first.stdout, 'answered\n', JSON.stringify(first.error));
    assert.equal((await sbx.runCode(tlsThroughTunnel(target, 'a.zone.test'))).stdout, 'answered\n');
    assert.equal((await sbx.runCode(tlsThroughTunnel(target, 'allowed.test', true))).stdout, 'answered\n');
    assert.equal((await sbx.runCode(tlsThroughTunnel(target, 'other.test'))).stdout, 'closed\n');
    assert.equal((await sbx.runCode(tlsThroughTunnel(target, 'elsewhere.test', true))).stdout, 'closed\n');
    const reasons = (await sbx.events()).filter((e) => e.type === 'egress_denied' && e.data.via === 'connect').map((e) => e.data.reason ?? '');
    assert.ok(reasons.some((r) => r.includes('TLS server name other.test')), reasons.join(' | '));
    assert.ok(reasons.some((r) => r.includes('TLS server name elsewhere.test')), reasons.join(' | '));
  });

  it('takes over direct connections to ports 80 and 443 (programs that ignore the proxy variables)', async () => {
    const before = (await sbx.events()).at(-1)?.seq ?? -1;
    assert.equal((await sbx.runCode(fetchDirect('http://allowed.test/'))).stdout.trim(), page);
    assert.equal((await sbx.runCode(fetchDirect(`http://${other.ip}/`))).stdout.trim(), page);
    assert.equal((await sbx.runCode(fetchDirect(`http://${allowed.ip}/`))).stdout.trim(), 'http 403');
    // The Host header names the destination: an allowed address with a denied name is denied.
    const spoofed = await sbx.runCode(`import socket
s = socket.create_connection(("${other.ip}", 80), timeout=5)
s.sendall(b"GET / HTTP/1.0\\r\\nHost: evil.test\\r\\n\\r\\n")
print(s.recv(4096).decode().split("\\r\\n")[0])`);
    assert.equal(spoofed.stdout.trim(), 'HTTP/1.1 403 Forbidden', spoofed.stderr);
    // TLS: the server name decides (nothing listens on 443 there: only the decision is seen).
    await sbx.runCode(`import socket, ssl
for name in ("allowed.test", "other.test"):
    try:
        with socket.create_connection(("${allowed.ip}", 443), timeout=5) as s:
            ssl.create_default_context().wrap_socket(s, server_hostname=name)
    except Exception:
        pass`);
    const denied = denials(await sbx.events({ after: before }));
    assert.deepEqual(denied.filter((d) => d.startsWith('transparent')), [
      `transparent ${allowed.ip}:80`, 'transparent evil.test:80', 'transparent other.test:443',
    ]);
    const allowedDirect = (await sbx.events({ after: before })).filter((e) => e.type === 'egress_allowed' && e.data.via === 'transparent');
    assert.deepEqual(allowedDirect.map((e) => `${e.data.host}:${e.data.port}`), ['allowed.test:80', `${other.ip}:80`]);
  });

  it('answers DNS for allowed names only', async () => {
    assert.equal((await sbx.runCode(resolve('allowed.test'))).stdout.trim(), `['${allowed.ip}']`);
    assert.equal((await sbx.runCode(resolve('a.zone.test'))).stdout.trim(), `['${allowed.ip}']`);
    assert.match((await sbx.runCode(resolve('other.test'))).stdout, /^gaierror/);
    assert.match((await sbx.runCode(resolve('example.com'))).stdout, /^gaierror/);
  });

  it('has no way out but the proxy: nothing else of an allowed host is reachable', async () => {
    // The test's DNS server listens on the allowed host, UDP port 53: the host reaches it, the sandbox not.
    const query = await sbx.runCode(`import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x07allowed\\x04test\\x00\\x00\\x01\\x00\\x01"
try:
    s.sendto(q, ("${allowed.ip}", 53))
    print("answer", len(s.recv(512)))
except Exception as e:
    print(type(e).__name__)`);
    assert.match(query.stdout, /^(TimeoutError|timeout|ConnectionRefusedError)/, query.stdout + query.stderr);
    assert.notEqual((await sbx.runCode(connectDirect(allowed.ip, 22))).stdout.trim(), 'open');
    const ifaces = await sbx.runCode('import socket\nprint(sorted(n for _, n in socket.if_nameindex()))');
    assert.equal(ifaces.stdout, "['lo']\n");
  });

  it('records denied attempts in the sandbox\'s events', async () => {
    const events = await sbx.events();
    const denied = denials(events);
    assert.ok(denied.includes(`http other.test:${other.port}`), denied.join(', '));
    assert.ok(denied.includes(`http ${allowed.ip}:${allowed.port}`), denied.join(', '));
    assert.ok(denied.includes(`connect other.test:${other.port}`), denied.join(', '));
    assert.ok(denied.includes(`socks other.test:${other.port}`), denied.join(', '));
    assert.ok(denied.includes('dns example.com'), denied.join(', '));
    assert.ok(!denied.some((d) => d.includes('allowed.test')), denied.join(', '));
    const allowedEvents = events.filter((e) => e.type === 'egress_allowed');
    assert.ok(allowedEvents.some((e) => e.data.host === 'allowed.test' && e.data.address === allowed.ip));
    // Numbered in order; `after` returns only newer ones.
    assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => events[0]!.seq + i));
    const last = events[events.length - 1]!.seq;
    assert.deepEqual(await sbx.events({ after: last }), []);
    await sbx.runCode(fetchFrom('http://denied-later.test/'));
    assert.deepEqual(denials(await sbx.events({ after: last })), ['http denied-later.test:80']);
  });

  it('gives fork children the same policy, with events of their own', async () => {
    const [child] = await sbx.fork(1);
    try {
      assert.equal((await child!.runCode(fetchFrom(`http://allowed.test:${allowed.port}/`))).stdout.trim(), page);
      assert.equal((await child!.runCode(fetchFrom(`http://other.test:${other.port}/`))).stdout.trim(), 'http 403');
      assert.match((await child!.runCode(resolve('other.test'))).stdout, /^gaierror/);
      assert.deepEqual(denials(await child!.events()), [`http other.test:${other.port}`, 'dns other.test']);
      assert.deepEqual((await child!.info()).egress, { allow: ['allowed.test', '*.zone.test', `${other.ip}/32`] });
    } finally {
      await child?.close();
    }
  });

  it("keeps the server's API and the host's own addresses out of reach, even for '*'", async () => {
    const any = await Sandbox.create({ host: server.url, egress: { allow: ['*', 'hostside.test'] } });
    try {
      // "*" means the internet: the test hosts' private addresses need their names listed.
      assert.equal((await any.runCode(fetchFrom(`http://allowed.test:${allowed.port}/`))).stdout.trim(), 'http 403');
      for (const url of [
        `http://127.0.0.1:${apiPort}/v1/healthz`, `http://localhost:${apiPort}/v1/healthz`,
        `http://loop.test:${loopPort}/`, `http://127.0.0.1:${loopPort}/`,
        `http://${allowed.hostIp}:${loopPort}/`, // the host's end of the veth pair
        `http://hostside.test:${loopPort}/`, // a listed name that resolves to it
      ]) {
        assert.equal((await any.runCode(fetchFrom(url), viaProxy)).stdout.trim(), 'http 403', url);
      }
      const reasons = (await any.events()).filter((e) => e.type === 'egress_denied').map((e) => e.data.reason ?? '');
      assert.ok(reasons.some((r) => /loopback/.test(r)), reasons.join(' | '));
      assert.ok(reasons.some((r) => r.startsWith(`hostside.test resolves to ${allowed.hostIp}: ${allowed.hostIp} is the host's own`)), reasons.join(' | '));
      assert.ok(reasons.some((r) => /private address, which "\*" does not cover/.test(r)), reasons.join(' | '));
    } finally {
      await any.close();
    }
  });

  it("opens the host's loopback only to an address rule naming it, and never the API", async () => {
    const loop = await Sandbox.create({ host: server.url, egress: { allow: ['127.0.0.1/32'] } });
    try {
      assert.equal((await loop.runCode(fetchFrom(`http://127.0.0.1:${loopPort}/`), viaProxy)).stdout.trim(), 'loopback service');
      assert.equal((await loop.runCode(fetchFrom(`http://127.0.0.1:${apiPort}/v1/healthz`), viaProxy)).stdout.trim(), 'http 403');
      // Without the proxy, 127.0.0.1 is the sandbox's own loopback: nothing of the host's is there.
      assert.notEqual((await loop.runCode(connectDirect('127.0.0.1', loopPort))).stdout.trim(), 'open');
      const reasons = denials(await loop.events());
      assert.deepEqual(reasons, [`http 127.0.0.1:${apiPort}`]);
    } finally {
      await loop.close();
    }
  });

  it("lets no IPv6 rule reach IPv4 loopback, and no all-addresses rule reach loopback at all", async () => {
    // The test's own listeners on the host's loopback; each connection they see is counted.
    const connections: string[] = [];
    const listen = async (address: string) => {
      const s = http.createServer((_req, res) => res.end('should not be reached'));
      s.on('connection', (socket) => connections.push(`${address} from ${socket.remoteAddress}`));
      await new Promise<void>((r) => s.listen(0, address, () => r()));
      return { s, port: (s.address() as AddressInfo).port };
    };
    const v4 = await listen('127.0.0.1');
    const v6 = await listen('::1');
    const v6only = await Sandbox.create({ host: server.url, egress: { allow: ['::/0'] } });
    const v4all = await Sandbox.create({ host: server.url, egress: { allow: ['0.0.0.0/0'] } });
    try {
      for (const url of [`http://127.0.0.1:${v4.port}/`, `http://[::ffff:127.0.0.1]:${v4.port}/`, `http://[::ffff:7f00:1]:${v4.port}/`, `http://[::1]:${v6.port}/`]) {
        assert.equal((await v6only.runCode(fetchFrom(url), viaProxy)).stdout.trim(), 'http 403', url);
      }
      assert.match((await v6only.runCode(connectTunnel(`127.0.0.1:${v4.port}`), viaProxy)).stdout, /^HTTP\/1.1 403 /);
      assert.equal((await v6only.runCode(socksFetch('127.0.0.1', v4.port), viaProxy)).stdout, 'reply 2\n');
      for (const url of [`http://127.0.0.1:${v4.port}/`, `http://[::ffff:127.0.0.1]:${v4.port}/`, `http://[::1]:${v6.port}/`]) {
        assert.equal((await v4all.runCode(fetchFrom(url), viaProxy)).stdout.trim(), 'http 403', url);
      }
      assert.deepEqual(connections, []);
      const reasons = (await v6only.events()).filter((e) => e.type === 'egress_denied').map((e) => e.data.reason ?? '');
      assert.ok(reasons.includes('127.0.0.1 is loopback: only an address rule within 127.0.0.0/8 opens it'), reasons.join(' | '));
    } finally {
      await v6only.close();
      await v4all.close();
      v4.s.close();
      v6.s.close();
    }
  });

  it('leaves no socket behind once a sandbox with a policy is gone', async () => {
    const before = foreignSockets();
    const temp = await Sandbox.create({ host: server.url, egress: { allow: ['allowed.test'] } });
    const [child] = await temp.fork(1);
    const ours = [...foreignSockets()].filter((s) => !before.has(s));
    // At least the five listeners (HTTP proxy, SOCKS, DNS, ports 80 and 443) in each of the two sandboxes.
    assert.ok(ours.length >= 10, `${ours.length} sockets`);
    await child!.close();
    await temp.close();
    const left = () => ours.filter((s) => foreignSockets().has(s));
    for (let i = 0; i < 100 && left().length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(left(), []);
  });

  it('egress: false still has no network and no DNS at all', async () => {
    const offline = await Sandbox.create({ host: server.url, egress: false });
    try {
      assert.match((await offline.runCode(resolve('allowed.test'))).stdout, /^gaierror/);
      assert.notEqual((await offline.runCode(connectDirect('10.0.2.3', 53))).stdout.trim(), 'open');
      assert.notEqual((await offline.runCode(connectDirect('127.0.0.1', 3128))).stdout.trim(), 'open');
      assert.match((await offline.runCode(fetchFrom(`http://${other.ip}:${other.port}/`))).stdout, /^failed/);
      assert.deepEqual(await offline.events(), []);
    } finally {
      await offline.close();
    }
  });

  it('refuses malformed rules with a 400 naming the rule', async () => {
    await assert.rejects(
      Sandbox.create({ host: server.url, egress: { allow: ['allowed.test', 'not a host!'] } }),
      (err: unknown) => err instanceof BadRequestError && /egress\.allow\.1/.test(err.message),
    );
    await assert.rejects(Sandbox.create({ host: server.url, egress: { allow: ['10.0.0.0/40'] } }), BadRequestError);
    await assert.rejects(Sandbox.create({ host: server.url, egress: 'yes' as unknown as boolean }), BadRequestError);
  });
});
