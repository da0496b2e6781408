/**
 * Exposed ports on the VM runtime (issue 25): its guests may have no network device (egress off)
 * and the server cannot dial into them, so a connection goes through a relay process the agent
 * starts in the guest (manager/port-relay.ts). HTTP (small and multi-megabyte bodies, through the
 * flow control), a WebSocket, a port nobody listens on, and no relay left once connections end.
 * One VM boot (TCG: seconds).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';
import { openWebSocket } from './helpers/websocket.js';

/** A stdlib WebSocket echo server (text frames under 126 bytes). */
const WS_ECHO = String.raw`
import base64, hashlib, socket, threading
GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
def serve(c):
    data = b''
    while b'\r\n\r\n' not in data:
        data += c.recv(4096)
    head, buf = data.split(b'\r\n\r\n', 1)
    key = [l.split(':', 1)[1].strip() for l in head.decode('latin1').split('\r\n') if l.lower().startswith('sec-websocket-key:')][0]
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    c.sendall(('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' % accept).encode())
    while True:
        while len(buf) < 6 or len(buf) < 6 + (buf[1] & 0x7f):
            more = c.recv(4096)
            if not more:
                return
            buf += more
        n = buf[1] & 0x7f
        mask, payload = buf[2:6], buf[6:6 + n]
        buf = buf[6 + n:]
        out = b'echo ' + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        c.sendall(bytes([0x81, len(out)]) + out)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 8765))
s.listen()
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
`;

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch { /* not yet */ }
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await sleep(500);
  }
}

describe('exposed ports on the VM runtime', { timeout: 900_000 }, () => {
  let server: TestServer;
  let vm: Sandbox | undefined;

  before(async () => {
    server = await startTestServer({ poolSize: 0 });
    vm = await Sandbox.create({ host: server.url, runtime: 'vm', egress: false });
  });
  after(async () => {
    await vm?.close().catch(() => undefined);
    await server?.stop();
  });

  it('HTTP through a signed URL and by key, a 3 MB body intact, a WebSocket, 503 for a closed port, no relay left', async () => {
    const sbx = vm!;
    assert.equal((await sbx.info()).runtime, 'vm');
    const made = await sbx.runCode([
      'mkdir -p /root/site && cd /root/site',
      'echo "<h1>hello from the vm</h1>" > index.html',
      'head -c 3000000 /dev/urandom > big.bin && sha256sum big.bin | cut -d" " -f1 > big.sha',
    ].join('\n'), { language: 'bash' });
    assert.equal(made.exitCode, 0, made.stderr);
    await sbx.commands.run('exec python3 -m http.server 8000 --bind 127.0.0.1 --directory /root/site', { background: true });
    await sbx.commands.run(`exec python3 -c '${WS_ECHO.replace(/'/g, `'\\''`)}'`, { background: true });

    const host = await sbx.getHost(8000);
    const page = await until('the guest\'s http.server', async () => {
      const res = await fetch(`http://${host}/index.html`);
      return res.status === 200 ? res.text() : undefined;
    });
    assert.equal(page, '<h1>hello from the vm</h1>\n');
    const byKey = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/8000/proxy/index.html`);
    assert.equal(byKey.status, 200);

    const big = Buffer.from(await (await fetch(`http://${host}/big.bin`)).arrayBuffer());
    assert.equal(big.length, 3_000_000);
    const sha = (await sbx.runCode('cat /root/site/big.sha', { language: 'bash' })).stdout.trim();
    assert.equal(createHash('sha256').update(big).digest('hex'), sha, 'the body arrives intact');

    const signed = (await sbx.getHost(8765)).split('/').slice(1).join('/');
    const port = Number(new URL(server.url).port);
    const ws = await until('the guest\'s WebSocket server', () => openWebSocket(port, `/${signed}/`));
    ws.send('ping');
    assert.equal(await ws.next(30_000), 'echo ping');
    ws.close();

    const closed = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/ports/9/proxy/`);
    assert.equal(closed.status, 503);

    // The relays end with their connections.
    let left: unknown[] = [];
    await until('no relay process left', async () => {
      const relays = (await sbx.commands.list()).filter((p) => p.running && p.cmd.includes('create_connection'));
      left = relays.map((p) => ({ pid: p.pid, started: p.startedAt, logEnd: p.logEnd }));
      return relays.length === 0 ? true : undefined;
    }, 60_000).catch((err: Error) => assert.fail(`${err.message}: ${JSON.stringify(left)}`));
  });
});
