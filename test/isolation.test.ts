/**
 * What a sandbox must not see or reach: the host's files, other sandboxes, the host's processes,
 * the host's loopback services. Network traffic goes only to loopback and to a test host in a
 * network namespace this test creates.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startTestHost, type TestHost } from './helpers/netns.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const CHECKOUT = path.resolve(import.meta.dirname, '..');

/** Python that tries to connect and prints "open" or the error's class name. */
const probe = (host: string, port: number) =>
  `import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(("${host}", ${port}))\n    print("open")\nexcept Exception as e:\n    print(type(e).__name__)`;

const fetchFrom = (url: string) =>
  `import urllib.request\ntry:\n    print(urllib.request.urlopen("${url}", timeout=3).read().decode())\nexcept Exception as e:\n    print("failed", type(e).__name__)`;

describe('isolation', () => {
  let server: TestServer;
  let a: Sandbox;
  let b: Sandbox;
  let offline: Sandbox;
  let hostService: http.Server;
  let hostPort: number;
  let testHost: TestHost;

  before(async () => {
    server = await startTestServer();
    [a, b, offline] = await Promise.all([
      Sandbox.create({ host: server.url }),
      Sandbox.create({ host: server.url }),
      Sandbox.create({ host: server.url, egress: false }),
    ]);
    hostService = http.createServer((_req, res) => res.end('host secret'));
    await new Promise<void>((r) => hostService.listen(0, '127.0.0.1', () => r()));
    hostPort = (hostService.address() as AddressInfo).port;
    testHost = await startTestHost();
  });
  after(async () => {
    await Promise.all([a?.close(), b?.close(), offline?.close()]);
    hostService?.close();
    testHost?.close();
    await server?.stop();
  });

  it('shows none of the host: not /root, not the checkout, not the state directory', async () => {
    const r = await a.runCode(`import os
for p in ["/root/.bashrc_host_marker", ${JSON.stringify(CHECKOUT)}, ${JSON.stringify(server.stateDir)}, "/var/lib/podflare", "/work"]:
    print(p, os.path.exists(p))
print(sorted(os.listdir("/root")))`);
    assert.equal(r.exitCode, 0, r.stderr);
    for (const line of r.stdout.trim().split('\n').slice(0, 5)) assert.match(line, / False$/, line);
  });

  it("does not see another sandbox's files", async () => {
    await a.runCode('open("/tmp/only-in-a", "w").write("a")\nopen("/root/secret-a", "w").write("a")');
    const r = await b.runCode('import os\nprint(os.path.exists("/tmp/only-in-a"), os.path.exists("/root/secret-a"))');
    assert.equal(r.stdout, 'False False\n');
  });

  it('cannot write the kernel\'s global knobs under /proc (sysctls, sysrq)', async () => {
    const check = 'import os\nprint(os.access("/proc/sys/kernel/core_pattern", os.W_OK), os.access("/proc/sysrq-trigger", os.W_OK))';
    assert.equal((await a.runCode(check)).stdout, 'False False\n');
    const [child] = await a.fork(1);
    try {
      assert.equal((await child!.runCode(check)).stdout, 'False False\n');
    } finally {
      await child?.close();
    }
  });

  it('sees only its own processes (own pid namespace) and its own hostname', async () => {
    const r = await a.runCode('import os, socket\npids = [p for p in os.listdir("/proc") if p.isdigit()]\nprint(len(pids) < 10, socket.gethostname())');
    assert.match(r.stdout, /^True sbx-[0-9a-f]{12}\n$/);
    const host = await a.runCode('cat /proc/1/cmdline | tr "\\0" " "', 'bash');
    assert.doesNotMatch(host.stdout, /systemd|init|node/);
  });

  it("cannot reach the host's loopback services, with egress on or off", async () => {
    for (const sbx of [a, offline]) {
      for (const target of ['127.0.0.1', '10.0.2.2']) {
        const r = await sbx.runCode(probe(target, hostPort));
        assert.notEqual(r.stdout.trim(), 'open', `${target}:${hostPort} reachable (egress ${sbx === a})`);
      }
    }
    const serverPort = Number(new URL(server.url).port);
    const api = await a.runCode(probe('10.0.2.2', serverPort));
    assert.notEqual(api.stdout.trim(), 'open', "the server's API is reachable from a sandbox");
  });

  it('reaches a test host with egress on, and nothing without egress', async () => {
    const url = `http://${testHost.ip}:${testHost.port}/`;
    const online = await a.runCode(fetchFrom(url));
    assert.equal(online.stdout.trim(), 'hello from the test host');
    const cut = await offline.runCode(fetchFrom(url));
    assert.match(cut.stdout, /^failed/);
    const ifaces = await offline.runCode('import socket\nprint(sorted(n for _, n in socket.if_nameindex()))');
    assert.equal(ifaces.stdout, "['lo']\n");
  });

  it('gives fork children their parent\'s egress, in network namespaces of their own', async () => {
    const url = `http://${testHost.ip}:${testHost.port}/`;
    const [onlineChild] = await a.fork(1);
    const [offlineChild] = await offline.fork(1);
    try {
      assert.equal((await onlineChild!.runCode(fetchFrom(url))).stdout.trim(), 'hello from the test host');
      assert.match((await offlineChild!.runCode(fetchFrom(url))).stdout, /^failed/);
      const serverPort = Number(new URL(server.url).port);
      assert.notEqual((await onlineChild!.runCode(probe('10.0.2.2', serverPort))).stdout.trim(), 'open');
      // A child's processes and files are its own, not its parent's.
      await a.runCode('open("/tmp/parent-later", "w").write("p")');
      const r = await onlineChild!.runCode('import os\nprint(os.path.exists("/tmp/parent-later"), len([p for p in os.listdir("/proc") if p.isdigit()]) < 10)');
      assert.equal(r.stdout, 'False True\n');
    } finally {
      await Promise.all([onlineChild?.close(), offlineChild?.close()]);
    }
  });
});
