/**
 * The VM runtime's fork memory on streams built here byte by byte in QEMU 7.2's format: the split
 * of a parent's migration stream (fed in small odd-sized chunks so every record straddles chunk
 * boundaries somewhere), and the state made by copy (a template's stream, the parent's private
 * pages, its device state), checked by splitting it back. The private pages themselves are found
 * in a real process's page table. The real thing (a VM's stream, children reading the parent's
 * memory) is covered by the fork tests in vm.test.ts.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, it } from 'node:test';
import { deviceSections, forkSkeleton, forkStateHead } from '../packages/server/src/runtime/vm/fork-state.js';
import { MigrationStreamError, splitMigrationStream, StreamSplitter } from '../packages/server/src/runtime/vm/migration-split.js';
import { findPrivatePages, PageReader } from '../packages/server/src/runtime/vm/private-pages.js';

const PAGE = 4096;
const RAM = 16 * PAGE;

const be32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const be64 = (n: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
const str = (s: string) => Buffer.concat([Buffer.of(s.length), Buffer.from(s, 'latin1')]);
const page = (seed: number) => Buffer.from(Array.from({ length: PAGE }, (_, i) => (i * 7 + seed) % 251));

/** A record: be64 offset|flags, the block's id unless it continues the last block, the payload. */
function rec(offset: number, flags: number, block: string | null, payload: Buffer): Buffer {
  return Buffer.concat([be64(offset + flags), ...(block ? [str(block)] : []), payload]);
}
const ZERO = 0x02, PAGEF = 0x08, EOS = 0x10, CONT = 0x20;

/**
 * A stream like QEMU's: RAM block "mem" (ours) and a ROM block, two iterations, device sections
 * after the RAM section. `withMem: false` gives what the split must leave: no "mem" pages.
 */
function stream(withMem: boolean, extra: Buffer[] = [], beforeEnd: Buffer[] = []): Buffer {
  const mem = (b: Buffer) => (withMem ? [b] : []);
  return Buffer.concat([
    be32(0x5145564d), be32(3),
    Buffer.of(0x07), be32(7), Buffer.from('microvm'),
    Buffer.of(0x05), str('configuration/capabilities'), be32(1), be32(1), str('x-ignore-shared'),
    // setup: the block list (with addresses: x-ignore-shared)
    Buffer.of(0x01), be32(2), str('ram'), be32(0), be32(4),
    be64((RAM + 2 * PAGE) | 0x04), str('mem'), be64(RAM), be64(0), str('pc.bios'), be64(2 * PAGE), be64(0xffff0000),
    be64(EOS), Buffer.of(0x7e), be32(2),
    // first pass
    Buffer.of(0x02), be32(2),
    ...mem(rec(0, PAGEF, 'mem', page(1))),
    ...mem(rec(PAGE, PAGEF | CONT, null, page(2))),
    ...mem(rec(2 * PAGE, ZERO | CONT, null, Buffer.of(0))),
    rec(0, PAGEF, 'pc.bios', page(3)),
    rec(PAGE, ZERO | CONT, null, Buffer.of(0)),
    ...mem(rec(3 * PAGE, PAGEF, 'mem', page(4))),
    ...extra,
    be64(EOS), Buffer.of(0x7e), be32(2),
    // second pass: a page sent again, a written page now zero
    Buffer.of(0x02), be32(2),
    ...mem(rec(PAGE, PAGEF | CONT, null, page(5))),
    ...mem(rec(0, ZERO | CONT, null, Buffer.of(0))),
    be64(EOS), Buffer.of(0x7e), be32(2),
    ...beforeEnd,
    Buffer.of(0x03), be32(2), be64(EOS), Buffer.of(0x7e), be32(2),
    // device state, copied through
    Buffer.of(0x04), be32(3), str('timer'), be32(0), be32(2), Buffer.from('device bytes'), Buffer.of(0x7e), be32(3),
    Buffer.of(0x00),
    Buffer.of(0x06), be32(2), Buffer.from('{}'),
  ]);
}

/** Small chunks of varying sizes (1 to 13 bytes, then 5000: a page in one piece too). */
function chunked(b: Buffer): Readable {
  return Readable.from(chunksOf(b));
}

/**
 * As the split worker reads: every chunk arrives in the same buffer, which the next read
 * overwrites (here: scribbled over at once), so a split that kept a view into it would break.
 */
function pushThroughOneBuffer(input: Buffer, fd: number, ramSize: number) {
  const splitter = new StreamSplitter('mem', fd, ramSize);
  const buffer = Buffer.alloc(5000);
  for (const chunk of chunksOf(input)) {
    chunk.copy(buffer);
    splitter.push(buffer.subarray(0, chunk.length), true);
    buffer.fill(0xa5);
  }
  return splitter.end();
}

function chunksOf(b: Buffer): Buffer[] {
  const chunks: Buffer[] = [];
  for (let at = 0, i = 0; at < b.length; i++) {
    const n = i % 5 === 4 ? 5000 : 1 + (i * 5) % 13;
    chunks.push(b.subarray(at, at + n));
    at += n;
  }
  return chunks;
}

async function split(input: Buffer, ramSize = RAM, whole = false, reusedBuffer = false) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pf-split-'));
  const file = path.join(dir, 'ram');
  const fd = openSync(file, 'w+');
  ftruncateSync(fd, ramSize); // as the runtime makes it: sparse, the RAM's size
  try {
    const r = reusedBuffer
      ? pushThroughOneBuffer(input, fd, ramSize)
      : await splitMigrationStream(whole ? Readable.from([input]) : chunked(input), new StreamSplitter('mem', fd, ramSize));
    return { ...r, ram: readFileSync(file) };
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('vm fork point: migration stream split', () => {
  for (const [how, whole, reused] of [['small chunks', false, false], ['one chunk', true, false], ['small chunks, all read into one reused buffer', false, true]] as const) {
    it(`writes the RAM block pages at their offsets and keeps everything else as a valid stream (${how})`, async () => {
      const r = await split(stream(true), RAM, whole, reused);
      assert.deepEqual(r.state, stream(false));
      assert.equal(r.pages, 4);
      const at = (n: number) => r.ram.subarray(n * PAGE, (n + 1) * PAGE);
      assert.ok(at(0).equals(Buffer.alloc(PAGE)), 'a page sent again as zero is zero');
      assert.ok(at(1).equals(page(5)), 'a page sent twice has its last content');
      assert.ok(at(2).equals(Buffer.alloc(PAGE)));
      assert.ok(at(3).equals(page(4)));
      assert.equal(r.ram.length, RAM);
      assert.ok(r.ram.subarray(4 * PAGE).equals(Buffer.alloc(RAM - 4 * PAGE)), 'pages never sent stay zero');
    });
  }

  it('passes through the commands newer QEMUs send between sections (ping, switchover-start)', async () => {
    const be16 = (n: number) => Buffer.of(n >> 8, n & 0xff);
    const commands = [Buffer.of(0x08), be16(2), be16(4), be32(42), Buffer.of(0x08), be16(11), be16(0)];
    const r = await split(stream(true, [], commands));
    assert.deepEqual(r.state, stream(false, [], commands));
    assert.equal(r.pages, 4);
    const packaged = [Buffer.of(0x08), be16(8), be16(4), be32(100)];
    await assert.rejects(split(stream(true, [], packaged)), (e: Error) => e instanceof MigrationStreamError && /unhandled migration command 8/.test(e.message));
  });

  it('refuses what it cannot split: compressed or XBZRLE pages, a wrong block size, a cut stream', async () => {
    await assert.rejects(split(stream(true, [rec(4 * PAGE, 0x40 | CONT, null, Buffer.alloc(3))])), (e: Error) => e instanceof MigrationStreamError && /flags 0x60/.test(e.message));
    await assert.rejects(split(stream(true, [rec(4 * PAGE, 0x100, 'mem', Buffer.alloc(3))])), /flags 0x100/);
    await assert.rejects(split(stream(true), 2 * RAM), /RAM block mem is 65536 bytes, the RAM file 131072/);
    const whole = stream(true);
    await assert.rejects(split(whole.subarray(0, whole.length - 300)), /ended inside a RAM page/);
    await assert.rejects(split(Buffer.from('not a stream at all')), /not a QEMU migration stream/);
    await assert.rejects(split(whole.subarray(0, whole.length - 300), RAM, false, true), /ended inside a RAM page/);
  });
});

describe('vm fork by copy: the children\'s state and the parent\'s private pages', () => {
  // What xen-save-devices-state writes: header, device sections, EOF.
  const devices = Buffer.concat([be32(0x5145564d), be32(3), Buffer.of(0x04), be32(3), str('timer'), be32(0), be32(2), Buffer.from('parent devices'), Buffer.of(0x7e), be32(3), Buffer.of(0x00)]);

  it('puts the private pages into the template\'s RAM section and the parent\'s devices after it', async () => {
    // A template's stream has no pages of its (shared) RAM block.
    const skeleton = forkSkeleton(stream(false), 'mem', RAM);
    const own = new Map([[1, page(11)], [2, page(12)], [5, Buffer.alloc(PAGE)], [6, page(16)], [7, page(17)]]);
    const runs: string[] = [];
    const head = forkStateHead(skeleton, 'mem', Uint32Array.of(1, 2, 5, 6, 7), (first, count) => {
      runs.push(`${first}+${count}`);
      return Buffer.concat(Array.from({ length: count }, (_, i) => own.get(first + i)!));
    });
    assert.deepEqual(runs, ['1+2', '5+3'], 'consecutive pages are read in one go');
    const state = Buffer.concat([head, deviceSections(devices)]);
    // Split back: the pages land where they belong, the rest is a stream with the template's
    // frame, ROM pages and the parent's devices.
    const r = await split(state);
    assert.equal(r.pages, 4, 'an all-zero page goes as a one-byte record');
    const at = (n: number) => r.ram.subarray(n * PAGE, (n + 1) * PAGE);
    assert.ok(at(1).equals(page(11)));
    assert.ok(at(2).equals(page(12)));
    assert.ok(at(6).equals(page(16)));
    assert.ok(at(7).equals(page(17)));
    assert.ok(at(5).equals(Buffer.alloc(PAGE)));
    assert.ok(r.state.includes(page(3)), 'the ROM block\'s page is kept');
    assert.ok(r.state.includes(Buffer.from('parent devices')));
    assert.ok(!r.state.includes(Buffer.from('device bytes')), 'the template\'s device state is not the children\'s');
    assert.ok(state.length < 5 * PAGE + 2000, `${state.length} bytes`);
  });

  it('refuses a template stream with pages of the RAM block, and a device state that is not one', () => {
    assert.throws(() => forkSkeleton(stream(true), 'mem', RAM), /a page of the RAM block at 0, in a stream that must have none/);
    assert.throws(() => deviceSections(Buffer.from('QEVM')), /not a complete QEMU device state/);
    assert.throws(() => deviceSections(devices.subarray(0, devices.length - 1)), /not a complete QEMU device state/);
  });

  it('finds the pages a process wrote in its private mapping of a file, and reads them from its memory', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'pf-pages-'));
    const file = path.join(dir, 'ram');
    const size = 64 * PAGE;
    writeFileSync(file, Buffer.alloc(size, 0x11));
    // MAP_PRIVATE (ACCESS_COPY), as QEMU maps a RAM file share=off: pages 3, 10 and 11 written,
    // page 20 only read, so it is mapped but still the file's.
    const py = spawn('python3', ['-c', `
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), ${size}, access=mmap.ACCESS_COPY)
for n in (3, 10, 11):
    m[n * 4096:(n + 1) * 4096] = bytes([n]) * 4096
m[20 * 4096]
print("ready", flush=True)
sys.stdin.read()
`, file], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      const [line] = await once(py.stdout!, 'data');
      assert.equal(String(line).trim(), 'ready');
      const found = findPrivatePages(py.pid!, file, size);
      assert.deepEqual([...found.pages], [3, 10, 11]);
      const reader = new PageReader(py.pid!, found.start, 4);
      try {
        assert.ok(reader.read(10, 2).equals(Buffer.concat([Buffer.alloc(PAGE, 10), Buffer.alloc(PAGE, 11)])));
        assert.ok(reader.read(20, 1).equals(Buffer.alloc(PAGE, 0x11)), 'a page not written is the file\'s');
      } finally {
        reader.close();
      }
      assert.throws(() => findPrivatePages(py.pid!, file, 2 * size), /does not map/);
    } finally {
      py.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
