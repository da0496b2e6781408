/**
 * Splits a QEMU 7.2 migration stream in two as it arrives: the guest RAM block's pages go into a
 * RAM file (at their offset in the block), everything else — header, configuration, the RAM
 * section's setup (its block list) and end-of-section markers, other RAM blocks' pages (ROMs,
 * a few hundred KB) and every device section after the RAM section — stays a valid migration
 * stream without those pages. A QEMU that maps the RAM file as its RAM block (`share=off`, so it
 * is not an x-ignore-shared block and the stream's block list still names it) and loads the
 * stripped stream ends up where the source was.
 *
 * Format (migration/savevm.c and migration/ram.c of QEMU 7.2):
 *   be32 magic "QEVM", be32 version 3
 *   0x07 configuration: be32 len + machine name, then subsections (0x05, len + name, be32 version, body)
 *   sections: type byte, be32 section id; START (0x01) and FULL (0x04) add len + idstr, be32
 *     instance id, be32 version id; each ends with a footer 0x7e + be32 section id
 *   RAM sections (START, PART…, END of "ram"): be64 records, offset | flags:
 *     MEM_SIZE 0x04  total bytes; then per block len + idstr, be64 length (+ be64 address with
 *                    x-ignore-shared) until the lengths add up to the total
 *     ZERO 0x02      one fill byte;  PAGE 0x08  4096 bytes;  both name their block (len + idstr)
 *                    unless CONTINUE 0x20 says "same block as the last page"
 *     EOS 0x10       end of this section's RAM data
 *   After the END of "ram" only non-iterable device sections, EOF and the JSON description
 *   follow: copied through unparsed.
 * Anything else (XBZRLE, compression, multifd, postcopy, block migration) is refused: the split
 * would be wrong, so the fork fails instead.
 */
import { writeSync, writevSync } from 'node:fs';

const MAGIC = 0x5145564d;
const VERSION = 3;
const PAGE = 4096;

const enum Section { Eof = 0x00, Start = 0x01, Part = 0x02, End = 0x03, Full = 0x04, Subsection = 0x05, Configuration = 0x07, Footer = 0x7e }
const enum Flag { Zero = 0x02, MemSize = 0x04, Page = 0x08, Eos = 0x10, Continue = 0x20 }

export interface SplitResult {
  /** The stream without the RAM block's pages. */
  state: Buffer;
  /** Pages written to the RAM file (all-zero pages are not: the file is fresh and sparse). */
  pages: number;
}

export class MigrationStreamError extends Error {}

/** Pulls exact byte counts out of a stream of chunks, copying only across chunk boundaries. */
class Reader {
  private chunks: Buffer[] = [];
  private available = 0;
  consumed = 0;

  constructor(private readonly source: AsyncIterator<Buffer>) {}

  /** Makes `n` bytes available (the caller awaits this only when `has(n)` is false). */
  async fill(n: number, what: string): Promise<void> {
    while (this.available < n) {
      const r = await this.source.next();
      if (r.done) throw new MigrationStreamError(`the migration stream ended inside ${what} (at byte ${this.consumed + this.available})`);
      if (r.value.length) {
        this.chunks.push(r.value);
        this.available += r.value.length;
      }
    }
  }

  peek(): number {
    return this.chunks[0]![0]!;
  }

  has(n: number): boolean {
    return this.available >= n;
  }

  take(n: number): Buffer {
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length > n) {
      out = first.subarray(0, n);
      this.chunks[0] = first.subarray(n);
    } else if (first.length === n) {
      out = first;
      this.chunks.shift();
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.available -= n;
    this.consumed += n;
    return out;
  }

  /** Everything left, to the end of the stream. */
  async rest(): Promise<Buffer[]> {
    const out = this.chunks.splice(0);
    for (;;) {
      const r = await this.source.next();
      if (r.done) return out;
      out.push(r.value);
    }
  }
}

/** Writes runs of consecutive pages with one pwritev each. */
class PageWriter {
  private run: Buffer[] = [];
  private runStart = 0;
  private runEnd = -1;
  private readonly written: Uint8Array;
  pages = 0;

  constructor(private readonly fd: number, private readonly size: number) {
    this.written = new Uint8Array(Math.ceil(size / PAGE));
  }

  page(offset: number, data: Buffer): void {
    if (offset + PAGE > this.size) throw new MigrationStreamError(`a page at ${offset} lies outside the ${this.size}-byte RAM block`);
    if (offset !== this.runEnd || this.run.length >= 1024) {
      this.flush();
      this.runStart = offset;
    }
    this.run.push(data);
    this.runEnd = offset + PAGE;
    this.written[offset / PAGE] = 1;
    this.pages++;
  }

  /** A page of one byte repeated: only written when it is not zero or replaces an earlier page. */
  fill(offset: number, byte: number): void {
    if (offset + PAGE > this.size) throw new MigrationStreamError(`a page at ${offset} lies outside the ${this.size}-byte RAM block`);
    if (byte === 0 && !this.written[offset / PAGE]) return;
    this.flush();
    writeSync(this.fd, Buffer.alloc(PAGE, byte), 0, PAGE, offset);
    this.written[offset / PAGE] = 1;
  }

  flush(): void {
    if (!this.run.length) return;
    let at = this.runStart;
    let bufs = this.run;
    while (bufs.length) {
      let n = writevSync(this.fd, bufs, at);
      at += n;
      // A short write (rare on tmpfs): continue from where it stopped.
      while (n > 0 && bufs.length) {
        if (n >= bufs[0]!.length) { n -= bufs[0]!.length; bufs = bufs.slice(1); } else { bufs = [bufs[0]!.subarray(n), ...bufs.slice(1)]; n = 0; }
      }
    }
    this.run = [];
    this.runEnd = -1;
  }
}

/**
 * Reads the whole stream from `source`; pages of RAM block `ramBlock` (which must be `ramSize`
 * bytes long) are written to `ramFd` at their offset, the rest is returned.
 */
export async function splitMigrationStream(source: AsyncIterable<Buffer>, ramBlock: string, ramFd: number, ramSize: number): Promise<SplitResult> {
  const r = new Reader(source[Symbol.asyncIterator]());
  const out: Buffer[] = [];
  const pages = new PageWriter(ramFd, ramSize);
  const bytes = async (n: number, what: string, keep = true): Promise<Buffer> => {
    if (!r.has(n)) await r.fill(n, what);
    const b = r.take(n);
    if (keep) out.push(b);
    return b;
  };
  const u8 = async (what: string) => (await bytes(1, what))[0]!;
  const be32 = async (what: string) => (await bytes(4, what)).readUInt32BE(0);
  const str = async (what: string) => (await bytes(await u8(what), what)).toString('latin1');
  /** The next byte, not consumed. */
  const peek = async (what: string): Promise<number> => {
    if (!r.has(1)) await r.fill(1, what);
    return r.peek();
  };

  if ((await be32('the header')) !== MAGIC) throw new MigrationStreamError('not a QEMU migration stream');
  const version = await be32('the header');
  if (version !== VERSION) throw new MigrationStreamError(`migration stream version ${version}, expected ${VERSION}`);

  let capabilities: string[] = [];
  let ramSection: number | null = null;
  let lastBlock: string | null = null;
  let sawBlock = false;

  /** Section footers are optional in the format (send-section-footer is on for every current machine). */
  const footer = async (sectionId: number) => {
    if ((await peek('a section footer')) !== Section.Footer) return;
    await u8('a section footer');
    const id = await be32('a section footer');
    if (id !== sectionId) throw new MigrationStreamError(`section footer for ${id} closes section ${sectionId}`);
  };

  const configuration = async () => {
    await bytes(await be32('the configuration'), 'the configuration'); // the machine type
    for (;;) {
      if ((await peek('the configuration')) !== Section.Subsection) return;
      await u8('the configuration');
      const name = await str('a configuration subsection');
      await be32('a configuration subsection'); // version
      if (name === 'configuration/capabilities') {
        const n = await be32('the capabilities');
        capabilities = [];
        for (let i = 0; i < n; i++) capabilities.push(await str('the capabilities'));
      } else if (name === 'configuration/target-page-bits') {
        if ((await be32('the target page bits')) !== 12) throw new MigrationStreamError('target pages are not 4 KiB');
      } else if (name === 'configuration/uuid') {
        await bytes(16, 'the uuid');
      } else {
        throw new MigrationStreamError(`unknown configuration subsection ${name}`);
      }
    }
  };

  /** One RAM section's records, up to its EOS. */
  const ramRecords = async () => {
    for (;;) {
      const head = await bytes(8, 'a RAM record', false);
      const hi = head.readUInt32BE(0);
      const lo = head.readUInt32BE(4);
      const flags = lo & 0xfff;
      const offset = hi * 2 ** 32 + ((lo & ~0xfff) >>> 0);
      if (flags === Flag.Eos) {
        out.push(head);
        return;
      }
      if (flags === Flag.MemSize) {
        out.push(head);
        if (capabilities.includes('postcopy-ram')) throw new MigrationStreamError('postcopy streams are not handled');
        let left = offset;
        while (left > 0) {
          const id = await str('the RAM block list');
          const length = Number((await bytes(8, 'the RAM block list')).readBigUInt64BE(0));
          if (capabilities.includes('x-ignore-shared')) await bytes(8, 'the RAM block list');
          if (id === ramBlock) {
            if (length !== ramSize) throw new MigrationStreamError(`RAM block ${id} is ${length} bytes, the RAM file ${ramSize}`);
            sawBlock = true;
          }
          left -= length;
        }
        if (!sawBlock) throw new MigrationStreamError(`the stream has no RAM block named ${ramBlock}`);
        continue;
      }
      if ((flags & ~(Flag.Zero | Flag.Page | Flag.Continue)) !== 0 || ((flags & Flag.Zero) !== 0) === ((flags & Flag.Page) !== 0)) {
        throw new MigrationStreamError(`unhandled RAM record flags 0x${flags.toString(16)} (only plain pages, zero pages and EOS are split)`);
      }
      let idstr: Buffer | null = null;
      if (flags & Flag.Continue) {
        if (lastBlock === null) throw new MigrationStreamError('a RAM page continues no block');
      } else {
        const len = await bytes(1, 'a RAM page', false);
        idstr = Buffer.concat([len, await bytes(len[0]!, 'a RAM page', false)]);
        lastBlock = idstr.subarray(1).toString('latin1');
      }
      const ours = lastBlock === ramBlock;
      if (flags & Flag.Zero) {
        const fill = await bytes(1, 'a zero page', false);
        if (ours) pages.fill(offset, fill[0]!);
        else out.push(head, ...(idstr ? [idstr] : []), fill);
      } else {
        const data = await bytes(PAGE, 'a RAM page', false);
        if (ours) pages.page(offset, data);
        else out.push(head, ...(idstr ? [idstr] : []), data);
      }
    }
  };

  for (let first = true; ; first = false) {
    const type = await u8('a section type');
    if (type === Section.Configuration && first) {
      await configuration();
      continue;
    }
    if (type === Section.Start || type === Section.Full) {
      const id = await be32('a section header');
      const name = await str('a section header');
      await bytes(8, 'a section header'); // instance id, version id
      if (type === Section.Full || name !== 'ram' || ramSection !== null) {
        throw new MigrationStreamError(`section "${name}" (type ${type}) before the end of RAM: only RAM may be iterative`);
      }
      ramSection = id;
      await ramRecords();
      await footer(id);
      continue;
    }
    if (type === Section.Part || type === Section.End) {
      const id = await be32('a section header');
      if (id !== ramSection) throw new MigrationStreamError(`section ${id} is not the RAM section`);
      await ramRecords();
      await footer(id);
      if (type === Section.End) break;
      continue;
    }
    throw new MigrationStreamError(`unexpected section type 0x${type.toString(16)} before the end of RAM`);
  }
  pages.flush();
  out.push(...(await r.rest()));
  return { state: Buffer.concat(out), pages: pages.pages };
}
