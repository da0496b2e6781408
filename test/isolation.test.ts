/**
 * What a sandbox must not see or reach: the host's files, other sandboxes, the host's processes,
 * the host's loopback services. Network traffic goes only to loopback and to a test host in a
 * network namespace this test creates.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startTestHost, type TestHost } from './helpers/netns.js';
import { startTestServer, type TestServer } from './helpers/server.js';

const execFileP = promisify(execFile);
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

  it("cannot write the kernel's global knobs under /proc, even after removing the covers", async () => {
    const check = 'import os\nprint(os.access("/proc/sys/kernel/core_pattern", os.W_OK), os.access("/proc/sysrq-trigger", os.W_OK))';
    assert.equal((await a.runCode(check)).stdout, 'False False\n');
    // Sandbox root holds CAP_SYS_ADMIN in its own namespaces and can take the read-only covers
    // away; what stops it then is that it is not host root.
    const [child] = await a.fork(1);
    try {
      assert.equal((await child!.runCode(check)).stdout, 'False False\n');
      const r = await child!.runCode('umount /proc/sysrq-trigger; umount /proc/sys && echo uncovered; echo "|/tmp/pwn" > /proc/sys/kernel/core_pattern && echo WROTE', 'bash');
      assert.match(r.stdout, /uncovered/);
      assert.doesNotMatch(r.stdout, /WROTE/);
      assert.match(r.stderr, /Permission denied/);
    } finally {
      await child?.close();
    }
    assert.doesNotMatch(await readFile('/proc/sys/kernel/core_pattern', 'utf8'), /pwn/);
  });

  it('runs as an unprivileged host user: root inside is uid 100000 outside, and so are its files', async () => {
    const map = await a.runCode('cat /proc/self/uid_map /proc/self/gid_map; id -u', 'bash');
    assert.deepEqual(map.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/).join(' ')), ['0 100000 65536', '0 100000 65536', '0']);
    await a.runCode('printf made > /root/made-inside; cp /usr/bin/id /root/suid-id; chmod 4755 /root/suid-id', 'bash');
    const upper = path.join(server.stateDir, 'sandboxes', a.id, 'upper', 'root');
    const made = await stat(path.join(upper, 'made-inside'));
    assert.deepEqual([made.uid, made.gid], [100000, 100000]);
    // A setuid-root program made inside, run outside by an ordinary user, is setuid to the
    // unprivileged range, not to root.
    const outside = path.join(os.tmpdir(), `pf-suid-${process.pid}`);
    await execFileP('cp', ['-p', path.join(upper, 'suid-id'), outside]);
    try {
      assert.equal(((await stat(outside)).mode & 0o4000) !== 0, true, 'setuid bit kept by the copy');
      const { stdout } = await execFileP('setpriv', ['--reuid', '65534', '--regid', '65534', '--clear-groups', outside, '-u']);
      assert.equal(stdout.trim(), '100000');
    } finally {
      await rm(outside, { force: true });
    }
  });

  it('is refused what sandboxes never need (seccomp): modules, keyrings, bpf, perf, userfaultfd, io_uring, new user namespaces', async () => {
    // x86-64 syscall numbers, called raw so that no library can answer for the kernel.
    const calls = { init_module: 175, add_key: 248, keyctl: 250, perf_event_open: 298, bpf: 321, userfaultfd: 323, io_uring_setup: 425, 'unshare(CLONE_NEWUSER)': 272 };
    const code = [
      'import ctypes, os',
      'libc = ctypes.CDLL(None, use_errno=True)',
      `for name, nr in ${JSON.stringify(calls)}.items():`,
      '    arg = 0x10000000 if name.startswith("unshare") else 0',
      '    r = libc.syscall(nr, arg, 0, 0, 0, 0)',
      '    print(name, r, os.strerror(ctypes.get_errno()) if r < 0 else "allowed")',
      'status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)',
      'print("NoNewPrivs", status["NoNewPrivs"].strip(), "Seccomp", status["Seccomp"].strip())',
    ].join('\n');
    for (const sbx of [a, ...(await a.fork(1))]) {
      const r = await sbx.runCode(code);
      for (const name of Object.keys(calls)) assert.match(r.stdout, new RegExp(`^${name.replace(/[()]/g, '\\$&')} -1 Operation not permitted$`, 'm'), r.stdout);
      assert.match(r.stdout, /^NoNewPrivs 1 Seccomp 2$/m);
      // Ordinary work still runs: threads, subprocesses, a namespace of its own for fork.
      const ok = await sbx.runCode('python3 -c "import threading, subprocess; t = threading.Thread(target=print, args=(1,)); t.start(); t.join(); print(subprocess.run([\'true\']).returncode)"', 'bash');
      assert.equal(ok.stdout, '1\n0\n');
      if (sbx !== a) await sbx.close();
    }
  });

  it('fails the classic escapes: host devices, mknod, /proc/1/root, raw and packet sockets, /sys', async () => {
    const r = await a.runCode([
      'mknod /tmp/disk b 8 0 2>/dev/null && echo MKNOD',
      'ls /dev | tr "\\n" " "; echo',
      'mount -t ext4 /dev/vda /mnt 2>/dev/null && echo MOUNTED',
      'mount -t proc proc /mnt 2>/dev/null; ls /mnt 2>/dev/null | grep -c "^[0-9]"', // its own processes only, if at all
      'echo inside-$$ > /root/marker; cat /proc/1/root/root/marker',
      'ls /sys 2>/dev/null | wc -l',
      'touch /proc/sys/kernel/x 2>/dev/null && echo WROTE-PROC',
    ].join('; '), 'bash');
    assert.doesNotMatch(r.stdout, /MKNOD|MOUNTED|WROTE-PROC/);
    const lines = r.stdout.trim().split('\n');
    // A minimal /dev: no disk, loop, kvm or memory device of the host.
    assert.match(lines[0]!, /\bnull\b/);
    assert.doesNotMatch(lines[0]!, /\b(vd[a-z]|sd[a-z]|nvme\w*|loop\w*|kvm|mem|port)\b/);
    assert.ok(Number(lines[1]) < 10, `sees ${lines[1]} processes`);
    assert.match(lines[2]!, /^inside-\d+$/); // /proc/1/root is its own root, not the host's
    assert.equal(lines[3], '0');
    const sockets = await a.runCode([
      'import socket',
      'for args in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6), (socket.AF_PACKET, socket.SOCK_RAW, 0)]:',
      '    try:',
      '        socket.socket(*args); print("opened")',
      '    except OSError as e:',
      '        print(e.strerror)',
    ].join('\n'));
    assert.equal(sockets.stdout, 'Operation not permitted\n'.repeat(3));
  });

  it("cannot reach another sandbox's network", async () => {
    // b listens on every address of its own network namespace; a tries every address b could have.
    await b.runCode('import socket, threading\nsrv = socket.socket()\nsrv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nsrv.bind(("0.0.0.0", 8765))\nsrv.listen()');
    for (const target of ['10.0.2.15', '10.0.2.2', '10.0.2.3', '127.0.0.1']) {
      const r = await a.runCode(probe(target, 8765));
      assert.notEqual(r.stdout.trim(), 'open', `${target}:8765 reached b`);
    }
    assert.equal((await b.runCode(probe('127.0.0.1', 8765))).stdout.trim(), 'open'); // the listener is real
    await b.runCode('srv.close()');
  });

  it("cannot write a host-owned file exposed to it: host root's files are nobody's inside", async () => {
    // The image's files are root's inside (an idmapped view); a file owned by real host root in
    // the sandbox's own layer (as if exposed by mistake) is not writable, even by sandbox root.
    const upper = path.join(server.stateDir, 'sandboxes', b.id, 'upper');
    await writeFile(path.join(upper, 'host-owned'), 'host data\n', { mode: 0o644 });
    const r = await b.runCode('ls -ln /host-owned | cut -d" " -f3; echo changed >> /host-owned && echo WROTE; cat /host-owned', 'bash');
    assert.equal(r.stdout.split('\n')[0], '65534');
    assert.doesNotMatch(r.stdout, /WROTE/);
    assert.equal(await readFile(path.join(upper, 'host-owned'), 'utf8'), 'host data\n');
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
