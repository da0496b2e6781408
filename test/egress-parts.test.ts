/**
 * The egress proxy's parts, each checked against an independent real peer: the DNS answers against
 * Node's c-ares resolver, the TLS server-name reader against ClientHellos Node's TLS client writes,
 * the allowlist matcher against the address rules it documents. Loopback only.
 */
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import dns from 'node:dns';
import net from 'node:net';
import os from 'node:os';
import tls from 'node:tls';
import { describe, it } from 'node:test';
import { buildAnswer, parseQuery, QTYPE, RCODE } from '../packages/server/src/egress/dns-wire.js';
import { EgressMatcher } from '../packages/server/src/egress/policy.js';
import { scanClientHello } from '../packages/server/src/egress/tls-sni.js';

describe('egress DNS answers', () => {
  it('are read correctly by a real resolver: A, AAAA (IPv4-embedded too), NXDOMAIN', async () => {
    const socket = dgram.createSocket('udp4');
    socket.on('message', (msg, peer) => {
      const q = parseQuery(msg)!;
      const answer = q.name === 'gone.test'
        ? buildAnswer(q, RCODE.nxDomain)
        : buildAnswer(q, RCODE.noError, ['10.1.2.3', '10.1.2.4', '2001:db8::1', '::ffff:10.9.8.7', 'fe80:0:0:0:1:2:3:4']);
      socket.send(answer, peer.port, peer.address);
    });
    await new Promise<void>((r) => socket.bind(0, '127.0.0.1', () => r()));
    try {
      const resolver = new dns.promises.Resolver({ timeout: 1000, tries: 1 });
      resolver.setServers([`127.0.0.1:${socket.address().port}`]);
      assert.deepEqual(await resolver.resolve4('x.test'), ['10.1.2.3', '10.1.2.4']);
      assert.deepEqual(await resolver.resolve6('x.test'), ['2001:db8::1', '::ffff:10.9.8.7', 'fe80::1:2:3:4']);
      await assert.rejects(resolver.resolve4('gone.test'), { code: 'ENOTFOUND' });
    } finally {
      socket.close();
    }
  });

  it('refuse what is not one well-formed question', () => {
    assert.equal(parseQuery(Buffer.alloc(5)), null);
    const q = Buffer.from('123401000001000000000000017800000100 01'.replace(/ /g, ''), 'hex');
    assert.equal(parseQuery(q)?.name, 'x');
    assert.equal(parseQuery(q)?.type, QTYPE.A);
    const pointer = Buffer.from(q);
    pointer[12] = 0xc0; // a compression pointer where a label belongs
    assert.equal(parseQuery(pointer), null);
    const response = Buffer.from(q);
    response[2] = 0x81; // QR set: an answer, not a query
    assert.equal(parseQuery(response), null);
  });
});

/** The first bytes Node's TLS client sends when asked for `servername`. */
async function clientHello(servername: string): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const first = new Promise<Buffer>((resolve) => server.once('connection', (s) => s.once('data', (d: Buffer) => { resolve(d); s.destroy(); })));
  const client = tls.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port, servername });
  client.on('error', () => undefined);
  const hello = await first;
  client.destroy();
  server.close();
  return hello;
}

/** The same ClientHello, its handshake message cut into TLS records of `size` bytes. */
function resplit(hello: Buffer, size: number): Buffer {
  const body = hello.subarray(5, 5 + hello.readUInt16BE(3));
  const records: Buffer[] = [];
  for (let at = 0; at < body.length; at += size) {
    const part = body.subarray(at, at + size);
    const header = Buffer.from([0x16, 0x03, 0x01, 0, 0]);
    header.writeUInt16BE(part.length, 3);
    records.push(header, part);
  }
  return Buffer.concat(records);
}

describe('TLS server names', () => {
  it('are read from real ClientHellos, whole or split over records', async () => {
    const hello = await clientHello('pypi.example.org');
    assert.deepEqual(scanClientHello(hello), { kind: 'hello', sni: 'pypi.example.org' });
    assert.deepEqual(scanClientHello(resplit(hello, 7)), { kind: 'hello', sni: 'pypi.example.org' });
    assert.deepEqual(scanClientHello(hello.subarray(0, hello.length - 1)), { kind: 'incomplete' });
    assert.deepEqual(scanClientHello(Buffer.from('GET / HTTP/1.1\r\n')), { kind: 'not-tls' });
    const notHello = Buffer.from(hello);
    notHello[5] = 0x02; // a ServerHello's type
    assert.deepEqual(scanClientHello(notHello), { kind: 'malformed' });
  });
});

describe('allowlist matching', () => {
  const apiPort = 7070;
  const m = new EgressMatcher({ allow: ['pypi.org', '*.example.com', '10.0.0.0/8', '2001:db8::/32', '127.0.0.1/32'] }, () => [apiPort]);

  it('matches names exactly or below a *.domain, never the bare domain', () => {
    assert.ok(m.nameAllowed('pypi.org'));
    assert.ok(m.nameAllowed('PyPI.org.'));
    assert.ok(!m.nameAllowed('files.pypi.org'));
    assert.ok(m.nameAllowed('a.b.example.com'));
    assert.ok(!m.nameAllowed('example.com'));
    assert.ok(!m.nameAllowed('badexample.com'));
  });

  it('lets addresses through by address rule, and ordinary addresses of allowed names', () => {
    assert.ok(m.addressVerdict('10.2.3.4', 443, null).allowed);
    assert.ok(m.addressVerdict('::ffff:10.2.3.4', 443, null).allowed); // IPv4-mapped is IPv4
    assert.ok(m.addressVerdict('2001:db8::5', 443, null).allowed);
    assert.ok(!m.addressVerdict('192.0.2.1', 443, null).allowed);
    assert.ok(m.addressVerdict('192.0.2.1', 443, 'pypi.org').allowed);
  });

  it('lets "*" reach public addresses only, private ones when the name is listed or the address allowed', () => {
    const any = new EgressMatcher({ allow: ['*', 'db.corp.test', '172.20.0.0/16'] }, () => []);
    assert.ok(any.nameAllowed('anything.test'));
    assert.ok(any.addressVerdict('192.0.2.1', 443, 'anything.test').allowed);
    for (const a of ['10.1.1.1', '172.16.0.1', '192.168.1.1', '100.64.0.1', 'fd00::1']) {
      assert.ok(!any.addressVerdict(a, 443, 'anything.test').allowed, a);
    }
    assert.ok(any.addressVerdict('10.1.1.1', 443, 'db.corp.test').allowed);
    assert.ok(any.addressVerdict('172.20.1.1', 443, 'anything.test').allowed);
  });

  it("keeps link-local, other loopback and the host's own addresses behind address rules, and the API always", () => {
    for (const a of ['169.254.169.254', '127.0.0.2', '::1', 'fe80::1', '0.0.0.0']) {
      assert.ok(!m.addressVerdict(a, 80, 'pypi.org').allowed, a);
    }
    const own = Object.values(os.networkInterfaces()).flat().find((i) => i && i.family === 'IPv4' && !i.internal);
    if (own) assert.ok(!m.addressVerdict(own.address, 80, 'pypi.org').allowed, own.address);
    assert.ok(m.addressVerdict('127.0.0.1', 8000, null).allowed); // named by an address rule
    assert.ok(!m.addressVerdict('127.0.0.1', apiPort, null).allowed); // but never the API
  });
});

describe('address rules: IPv4 and IPv6 never cross, guarded addresses first', () => {
  const verdict = (allow: string[], address: string, viaName: string | null = null) =>
    new EgressMatcher({ allow }, () => [7070]).addressVerdict(address, 8000, viaName).allowed;

  // [rules, address, allowed?]: what a sandbox with these rules may connect to (by address).
  const table: Array<[string[], string, boolean]> = [
    // An IPv6 rule holds no IPv4 address, however the IPv4 address is written.
    [['::/0'], '127.0.0.1', false],
    [['::/0'], '10.0.0.1', false],
    [['::/0'], '192.0.2.1', false],
    [['::/0'], '169.254.169.254', false],
    [['::/0'], '::ffff:127.0.0.1', false],
    [['::/0'], '::ffff:7f00:1', false],
    [['::/0'], '::ffff:10.0.0.1', false],
    [['::/0'], '64:ff9b::127.0.0.1', false], // well-known NAT64: the IPv4 address behind it
    [['::/0'], '64:ff9b::c000:201', false],
    [['::/0'], '2001:db8::1', true],
    // ...and it does not name the IPv6 guarded ranges it merely contains.
    [['::/0'], '::1', false],
    [['::/0'], '::', false],
    [['::/0'], 'fe80::1', false],
    [['::/0'], 'fe80::1%lo', false],
    [['::/0'], 'ff02::1', false],
    [['::/0'], 'fd00:ec2::254', false],
    [['::/0'], '2002:7f00:1::1', false], // 6to4 relays through 127.0.0.1
    [['::/0'], '2001:0:7f00:1::1', false], // Teredo
    [['::/0'], '::127.0.0.1', false], // IPv4-compatible (deprecated)
    // An IPv4 rule holds no IPv6 address, and does not name loopback or metadata either.
    [['0.0.0.0/0'], '127.0.0.1', false],
    [['0.0.0.0/0'], '127.1.2.3', false],
    [['0.0.0.0/0'], '::ffff:127.0.0.1', false],
    [['0.0.0.0/0'], '169.254.169.254', false],
    [['0.0.0.0/0'], '0.0.0.0', false],
    [['0.0.0.0/0'], '224.0.0.1', false],
    [['0.0.0.0/0'], '255.255.255.255', false],
    [['0.0.0.0/0'], '::1', false],
    [['0.0.0.0/0'], '2001:db8::1', false],
    [['0.0.0.0/0'], '10.0.0.1', true],
    [['0.0.0.0/0'], '::ffff:10.0.0.1', true],
    [['0.0.0.0/0'], '64:ff9b::c000:201', true],
    [['100.0.0.0/6'], '127.0.0.1', false], // holds loopback, is not within it
    [['::/1'], '::1', false],
    // A rule within the guarded range opens it (and only what it holds).
    [['127.0.0.1/32'], '127.0.0.1', true],
    [['127.0.0.1/32'], '::ffff:127.0.0.1', true],
    [['127.0.0.1/32'], '127.0.0.2', false],
    [['127.0.0.0/8'], '127.0.0.1', true],
    [['::ffff:127.0.0.1/128'], '127.0.0.1', true], // a mapped rule is the IPv4 rule it spells
    [['::ffff:0:0/96'], '127.0.0.1', false], // = 0.0.0.0/0
    [['::1/128'], '::1', true],
    [['::1/128'], '127.0.0.1', false],
    [['169.254.0.0/16'], '169.254.1.1', true],
    [['169.254.0.0/16'], '169.254.169.254', false], // metadata needs a rule of its own
    [['169.254.169.254/32'], '169.254.169.254', true],
    [['fe80::/10'], 'fe80::1', true],
    [['fd00::/8'], 'fd00:ec2::254', false],
    [['fd00:ec2::254'], 'fd00:ec2::254', true],
  ];

  for (const [allow, address, allowed] of table) {
    it(`${allow.join(', ')} ${allowed ? 'admits' : 'does not admit'} ${address}`, () => {
      assert.equal(verdict(allow, address), allowed);
    });
  }

  it('keeps guarded addresses guarded when they come from an allowed name', () => {
    for (const a of ['127.0.0.1', '::ffff:127.0.0.1', '169.254.169.254', '::1', '64:ff9b::a9fe:a9fe']) {
      assert.equal(verdict(['*', 'svc.test', '::/0', '0.0.0.0/0'], a, 'svc.test'), false, a);
    }
    assert.equal(verdict(['svc.test', '127.0.0.1/32'], '127.0.0.1', 'svc.test'), true);
  });

  it("guards the host's own interface addresses: only a rule for that very address opens one", () => {
    const own = Object.values(os.networkInterfaces()).flat().find((i) => i && i.family === 'IPv4' && !i.internal);
    if (!own) return;
    const [a, b] = own.address.split('.');
    assert.equal(verdict(['0.0.0.0/0'], own.address), false);
    assert.equal(verdict([`${a}.${b}.0.0/16`], own.address), false);
    assert.equal(verdict(['::/0'], `::ffff:${own.address}`), false);
    assert.equal(verdict([`${own.address}/32`], own.address), true);
  });

  it("never opens the server's API port on a guarded address, whatever the rules", () => {
    const m = new EgressMatcher({ allow: ['127.0.0.1/32', '::1/128'] }, () => [7070]);
    for (const a of ['127.0.0.1', '::ffff:127.0.0.1', '::1']) assert.equal(m.addressVerdict(a, 7070, null).allowed, false, a);
  });

  it('names the guarded range and the rule that would open it when refusing', () => {
    const v = new EgressMatcher({ allow: ['::/0'] }, () => []).addressVerdict('::ffff:127.0.0.1', 80, null);
    assert.deepEqual(v, { allowed: false, reason: '127.0.0.1 is loopback: only an address rule within 127.0.0.0/8 opens it' });
  });
});
