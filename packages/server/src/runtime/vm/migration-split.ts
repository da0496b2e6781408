/**
 * Splits a QEMU 7.2 migration stream in two as it arrives: the guest RAM block's pages go into a
 * RAM file (at their offset in the block), everything else — header, configuration, the RAM
 * section's setup (its block list) and end-of-section markers, other RAM blocks' pages (ROMs,
 * tens of KB) and every device section after the RAM section — stays a valid migration
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
import type { Readable } from 'node:stream';

export const MAGIC = 0x5145564d;
export const VERSION = 3;
export const PAGE = 4096;

export const enum Section { Eof = 0x00, Start = 0x01, Part = 0x02, End = 0x03, Full = 0x04, Subsection = 0x05, Configuration = 0x07, Command = 0x08, Footer = 0x7e }
/** MIG_CMD_PING (2), MIG_CMD_SWITCHOVER_START (11): no more bytes than their length says. */
const PASSED_COMMANDS = new Set([2, 11]);
export const enum Flag { Zero = 0x02, MemSize = 0x04, Page = 0x08, Eos = 0x10, Continue = 0x20 }

export interface SplitResult {
  /** The stream without the RAM block's pages. */
  state: Buffer;
  /** Pages written to the RAM file (all-zero pages are not: the file is fresh and sparse). */
  pages: number;
  /** Where the RAM section is in `state`: its id, the end of its setup (the START section with its block list), and its end (after END). */
  ram: RamSectionMarks;
}

export interface RamSectionMarks {
  section: number;
  setupEnd: number;
  end: number;
}

export class MigrationStreamError extends Error {}

/**
 * Exact byte counts out of the chunks received so far: views into them, copying only across
 * chunk boundaries; skipped bytes cost nothing (most records are skipped: zero pages).
 */
class Reader {
  private chunks: Buffer[] = [];
  /** Read position in chunks[0]. */
  private at = 0;
  private available = 0;
  consumed = 0;

  push(chunk: Buffer): void {
    if (!chunk.length) return;
    this.chunks.push(chunk);
    this.available += chunk.length;
  }

  has(n: number): boolean {
    return this.available >= n;
  }

  /** The byte `ahead` bytes on, not consumed (the caller made sure it is there). */
  peek(ahead = 0): number {
    let i = this.at + ahead;
    for (const c of this.chunks) {
      if (i < c.length) return c[i]!;
      i -= c.length;
    }
    throw new RangeError('peek past the data received');
  }

  /** A big-endian 32-bit word `ahead` bytes on, not consumed. */
  peek32(ahead: number): number {
    const c = this.chunks[0]!;
    const i = this.at + ahead;
    if (i + 4 <= c.length) return c.readUInt32BE(i);
    return ((this.peek(ahead) << 24) | (this.peek(ahead + 1) << 16) | (this.peek(ahead + 2) << 8) | this.peek(ahead + 3)) >>> 0;
  }

  take(n: number): Buffer {
    const first = this.chunks[0]!;
    let out: Buffer;
    if (this.at + n <= first.length) {
      out = first.subarray(this.at, this.at + n);
      this.advance(n);
      return out;
    }
    out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.at, n - done);
      c.copy(out, done, this.at, this.at + k);
      done += k;
      this.advance(k);
    }
    return out;
  }

  /** The first chunk and the read position in it (for a caller that parses in place). */
  window(): { buf: Buffer; at: number } | null {
    return this.chunks.length ? { buf: this.chunks[0]!, at: this.at } : null;
  }

  /** Moves on by `n` bytes parsed in place in `window()`. */
  consume(n: number): void {
    if (n > 0) this.advance(n);
  }

  skip(n: number): void {
    while (n > 0) {
      const k = Math.min(this.chunks[0]!.length - this.at, n);
      this.advance(k);
      n -= k;
    }
  }

  /** Moves on by `k` bytes within the first chunk. */
  private advance(k: number): void {
    this.at += k;
    this.available -= k;
    this.consumed += k;
    if (this.at === this.chunks[0]!.length) {
      this.chunks.shift();
      this.at = 0;
    }
  }

  /**
   * `chunk` (pushed last) is about to be overwritten: what of it is not consumed yet becomes a
   * copy of its own.
   */
  own(chunk: Buffer): void {
    const i = this.chunks.lastIndexOf(chunk);
    if (i < 0) return;
    this.chunks[i] = Buffer.from(i === 0 ? chunk.subarray(this.at) : chunk);
    if (i === 0) this.at = 0;
  }

  /** Everything received and not consumed. */
  rest(): Buffer[] {
    if (this.chunks.length && this.at) this.chunks[0] = this.chunks[0]!.subarray(this.at);
    this.at = 0;
    this.available = 0;
    return this.chunks.splice(0);
  }
}

/** Writes runs of consecutive pages with one pwritev each. */
class PageWriter {
  private run: Buffer[] = [];
  private runStart = 0;
  private runEnd = -1;
  private readonly written: Uint8Array;
  pages = 0;

  /** fd null: the stream must not carry pages of the block (a template's: its RAM was shared). */
  constructor(private readonly fd: number | null, private readonly size: number) {
    this.written = new Uint8Array(Math.ceil(size / PAGE));
  }

  page(offset: number, data: Buffer): void {
    this.fdFor(offset);
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
    const fd = this.fdFor(offset);
    if (byte === 0 && !this.written[offset / PAGE]) return;
    this.flush();
    writeSync(fd, Buffer.alloc(PAGE, byte), 0, PAGE, offset);
    this.written[offset / PAGE] = 1;
  }

  flush(): void {
    if (!this.run.length || this.fd === null) return; // (no run without a file: see fdFor)
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

  /** The file a page at `offset` goes to; throws if the page has no place in it. */
  private fdFor(offset: number): number {
    if (offset + PAGE > this.size) throw new MigrationStreamError(`a page at ${offset} lies outside the ${this.size}-byte RAM block`);
    if (this.fd === null) throw new MigrationStreamError(`a page of the RAM block at ${offset}, in a stream that must have none`);
    return this.fd;
  }
}

/**
 * Splits one stream fed to it chunk by chunk: pages of RAM block `ramBlock` (which must be
 * `ramSize` bytes long) are written to `ramFd` at their offset, the rest is kept. Each chunk is
 * parsed as it arrives, synchronously (no promise per chunk or record).
 */
export class StreamSplitter {
  private readonly r = new Reader();
  private readonly out: Buffer[] = [];
  private readonly pages: PageWriter;
  private readonly where = { what: 'the header' };
  private readonly marks: RamSectionMarks & { kept: number } = { section: -1, setupEnd: -1, end: -1, kept: 0 };
  private readonly parser: Generator<void, void, void>;
  private done = false;

  /** `ramFd` null: the stream must have no pages of the block (it is only parsed). */
  constructor(ramBlock: string, ramFd: number | null, ramSize: number) {
    this.pages = new PageWriter(ramFd, ramSize);
    this.parser = new MigrationParser(this.r, this.out, this.pages, ramBlock, ramSize, this.where, this.marks).run();
    this.step();
  }

  /**
   * Parses `chunk`. `reused`: the caller overwrites the chunk's memory once this returns (a read
   * buffer of its own), so nothing may point into it afterwards — pages are written out and
   * what is kept or not parsed yet is copied.
   */
  push(chunk: Buffer, reused: boolean): void {
    if (this.done) return void this.out.push(reused ? Buffer.from(chunk) : chunk); // past the RAM section: device state, copied as it is
    this.r.push(chunk);
    this.step(reused);
    if (reused) {
      this.pages.flush();
      this.r.own(chunk);
    }
  }

  /** The stream ended: what it holds besides the RAM block's pages (throws if it ended early). */
  end(): SplitResult {
    if (!this.done) throw new MigrationStreamError(`the migration stream ended inside ${this.where.what} (at byte ${this.r.consumed})`);
    const { section, setupEnd, end } = this.marks;
    return { state: Buffer.concat(this.out), pages: this.pages.pages, ram: { section, setupEnd, end } };
  }

  /** Where the parse stands, for an error about a stream that broke off. */
  get position(): string {
    return `${this.where.what} (at byte ${this.r.consumed})`;
  }

  private step(reused = false): void {
    this.done = this.parser.next().done === true;
    if (this.done) this.out.push(...this.r.rest().map((b) => (reused ? Buffer.from(b) : b)));
  }
}

/**
 * Reads the whole stream from `source` through `splitter` ('data' events: each chunk is the
 * stream's own, so pages are written straight from it).
 */
export function splitMigrationStream(source: Readable, splitter: StreamSplitter): Promise<SplitResult> {
  source.on('data', (chunk: Buffer) => {
    try {
      splitter.push(chunk, false);
    } catch (err) {
      source.destroy(err as Error);
    }
  });
  return splitEnded(source, splitter);
}

/**
 * The split's result once `source` has ended. A chunk the splitter refused ends the stream with
 * that error (`destroy(err)`): it is what the promise rejects with.
 */
export function splitEnded(source: Readable, splitter: StreamSplitter): Promise<SplitResult> {
  return new Promise<SplitResult>((resolve, reject) => {
    let settled = false;
    const fail = (err: Error) => {
      if (settled) return;
      settled = true;
      source.destroy();
      reject(err);
    };
    source.once('error', (err) => fail(err instanceof MigrationStreamError ? err : new MigrationStreamError(`the migration stream broke: ${err.message}`)));
    source.once('end', () => {
      if (settled) return;
      let result: SplitResult;
      try {
        result = splitter.end();
      } catch (err) {
        return fail(err as Error);
      }
      settled = true; // a 'close' after the end is no failure
      resolve(result);
    });
    source.once('close', () => fail(new MigrationStreamError(`the migration stream closed inside ${splitter.position}`)));
  });
}

/** What the parser reads from: a `need` waits (yields) until `n` bytes have arrived. */
type Wait = Generator<void, void, void>;

/**
 * The parser, as generators that yield whenever they need more data than has arrived (a promise
 * per record would cost more than the parsing). `run` returns at the end of the RAM section.
 * Kept bytes go to `out`; the RAM block's pages to `pages`.
 */
class MigrationParser {
  /** The stream's migration capabilities (its configuration section). */
  private capabilities: string[] = [];
  private ramSection: number | null = null;
  /** The RAM block the last page named (a CONTINUE page is of the same one). */
  private lastBlock: string | null = null;
  /** The block list named our RAM block. */
  private sawBlock = false;

  constructor(
    private readonly r: Reader,
    private readonly out: Buffer[],
    private readonly pages: PageWriter,
    private readonly ramBlock: string,
    private readonly ramSize: number,
    private readonly where: { what: string },
    private readonly marks: RamSectionMarks & { kept: number },
  ) {}

  *run(): Wait {
    yield* this.header();
    yield* this.sections();
    this.pages.flush();
  }

  // Reading. Kept bytes are copied: the chunk may be a read buffer that is reused (kept bytes are
  // few: ~70 KB a stream).

  private keep(n: number): Buffer {
    const b = Buffer.from(this.r.take(n));
    this.out.push(b);
    this.marks.kept += n;
    return b;
  }

  private u8(): number {
    return this.keep(1)[0]!;
  }

  private be32(): number {
    return this.keep(4).readUInt32BE(0);
  }

  /** A length byte and that many bytes (an id string), both kept; the string without its length byte. */
  private str(): string {
    return this.keep(1 + this.r.peek()).toString('latin1').slice(1);
  }

  private *need(n: number, what: string): Wait {
    while (!this.r.has(n)) {
      this.where.what = what;
      yield;
    }
  }

  /** A length byte and the string after it: waits for both. */
  private *needStr(what: string): Wait {
    yield* this.need(1, what);
    yield* this.need(1 + this.r.peek(), what);
  }

  // The stream's structure.

  private *header(): Wait {
    yield* this.need(8, 'the header');
    if (this.be32() !== MAGIC) throw new MigrationStreamError('not a QEMU migration stream');
    const version = this.be32();
    if (version !== VERSION) throw new MigrationStreamError(`migration stream version ${version}, expected ${VERSION}`);
  }

  /** Sections up to the END of the RAM section (the configuration may only come first). */
  private *sections(): Wait {
    for (let first = true; ; first = false) {
      yield* this.need(1, 'a section type');
      const type = this.u8();
      if (type === Section.Configuration && first) yield* this.configuration();
      else if (type === Section.Start || type === Section.Full) yield* this.ramStart(type);
      else if (type === Section.Command) yield* this.command();
      else if (type === Section.Part || type === Section.End) {
        yield* this.ramPart();
        if (type === Section.End) {
          this.marks.end = this.marks.kept;
          return;
        }
      } else {
        throw new MigrationStreamError(`unexpected section type 0x${type.toString(16)} before the end of RAM`);
      }
    }
  }

  /** The START of the RAM section, with its setup (the block list): the only iterative section allowed. */
  private *ramStart(type: number): Wait {
    yield* this.need(5, 'a section header');
    const id = this.be32();
    yield* this.needStr('a section header');
    const name = this.str();
    yield* this.need(8, 'a section header');
    this.keep(8); // instance id, version id
    if (type === Section.Full || name !== 'ram' || this.ramSection !== null) {
      throw new MigrationStreamError(`section "${name}" (type ${type}) before the end of RAM: only RAM may be iterative`);
    }
    this.ramSection = id;
    this.marks.section = id;
    yield* this.ramRecords();
    yield* this.footer(id);
    this.marks.setupEnd = this.marks.kept;
  }

  /** A PART or END of the RAM section. */
  private *ramPart(): Wait {
    yield* this.need(4, 'a section header');
    const id = this.be32();
    if (id !== this.ramSection) throw new MigrationStreamError(`section ${id} is not the RAM section`);
    yield* this.ramRecords();
    yield* this.footer(id);
  }

  /**
   * Newer QEMUs (10 in Debian 13) send commands between sections: switchover-start before the
   * last of RAM and the device state. A 16-bit command and a 16-bit length, kept for the children
   * as they are. Only those whose bytes are all inside: a packaged stream (postcopy) follows its
   * command.
   */
  private *command(): Wait {
    yield* this.need(4, 'a command');
    const cmd = this.r.peek(0) * 2 ** 8 + this.r.peek(1);
    const len = this.r.peek(2) * 2 ** 8 + this.r.peek(3);
    if (!PASSED_COMMANDS.has(cmd)) throw new MigrationStreamError(`unhandled migration command ${cmd} (only ping and switchover-start are passed through)`);
    yield* this.need(4 + len, 'a command');
    this.keep(4 + len);
  }

  /** Section footers are optional in the format (send-section-footer is on for every current machine). */
  private *footer(sectionId: number): Wait {
    yield* this.need(1, 'a section footer');
    if (this.r.peek() !== Section.Footer) return;
    yield* this.need(5, 'a section footer');
    this.u8();
    const id = this.be32();
    if (id !== sectionId) throw new MigrationStreamError(`section footer for ${id} closes section ${sectionId}`);
  }

  /** The configuration section: the machine type, then subsections. */
  private *configuration(): Wait {
    yield* this.need(4, 'the configuration');
    const r = this.r;
    const len = r.peek(0) * 2 ** 24 + r.peek(1) * 2 ** 16 + r.peek(2) * 2 ** 8 + r.peek(3);
    yield* this.need(4 + len, 'the configuration');
    this.keep(4 + len); // the machine type
    for (;;) {
      yield* this.need(1, 'the configuration');
      if (r.peek() !== Section.Subsection) return;
      this.u8();
      yield* this.configurationSubsection();
    }
  }

  /** One subsection of the configuration: the capabilities are noted, the page size checked. */
  private *configurationSubsection(): Wait {
    yield* this.needStr('a configuration subsection');
    const name = this.str();
    yield* this.need(4, 'a configuration subsection');
    this.be32(); // version
    if (name === 'configuration/capabilities') {
      yield* this.need(4, 'the capabilities');
      const n = this.be32();
      this.capabilities = [];
      for (let i = 0; i < n; i++) {
        yield* this.needStr('the capabilities');
        this.capabilities.push(this.str());
      }
    } else if (name === 'configuration/target-page-bits') {
      yield* this.need(4, 'the target page bits');
      if (this.be32() !== 12) throw new MigrationStreamError('target pages are not 4 KiB');
    } else if (name === 'configuration/uuid') {
      yield* this.need(16, 'the uuid');
      this.keep(16);
    } else {
      throw new MigrationStreamError(`unknown configuration subsection ${name}`);
    }
  }

  // RAM records.

  /** One RAM section's records, up to its EOS. */
  private *ramRecords(): Wait {
    const r = this.r;
    for (;;) {
      if (this.lastBlock === this.ramBlock) this.continuations();
      // The longest record (header, id string, page) is usually there already.
      if (!r.has(8 + 256 + PAGE)) yield* this.need(8, 'a RAM record');
      const hi = r.peek32(0);
      const lo = r.peek32(4);
      const flags = lo & 0xfff;
      const offset = hi * 2 ** 32 + ((lo & ~0xfff) >>> 0);
      if (flags === Flag.Eos) {
        this.keep(8);
        return;
      }
      if (flags === Flag.MemSize) {
        this.keep(8);
        yield* this.blockList(offset);
        continue;
      }
      const zero = pageRecordIsZero(flags);
      const named = (flags & Flag.Continue) === 0;
      if (named && !r.has(9)) yield* this.need(9, 'a RAM page');
      const idLength = named ? 1 + r.peek(8) : 0;
      const length = 8 + idLength + (zero ? 1 : PAGE);
      if (!r.has(length)) yield* this.need(length, 'a RAM page');
      this.pageRecord(offset, zero, idLength, length);
    }
  }

  /** The RAM section's block list (MEM_SIZE: `total` bytes of blocks): ours must be there, as large as the RAM file. */
  private *blockList(total: number): Wait {
    if (this.capabilities.includes('postcopy-ram')) throw new MigrationStreamError('postcopy streams are not handled');
    const withAddress = this.capabilities.includes('x-ignore-shared');
    for (let left = total; left > 0;) {
      yield* this.needStr('the RAM block list');
      const id = this.str();
      yield* this.need(withAddress ? 16 : 8, 'the RAM block list');
      const length = Number(this.keep(8).readBigUInt64BE(0));
      if (withAddress) this.keep(8);
      if (id === this.ramBlock) {
        if (length !== this.ramSize) throw new MigrationStreamError(`RAM block ${id} is ${length} bytes, the RAM file ${this.ramSize}`);
        this.sawBlock = true;
      }
      left -= length;
    }
    if (!this.sawBlock) throw new MigrationStreamError(`the stream has no RAM block named ${this.ramBlock}`);
  }

  /**
   * One page record, all `length` bytes of it arrived: a page of our RAM block goes to the RAM
   * file (a zero page as a fill), another block's is kept.
   */
  private pageRecord(offset: number, zero: boolean, idLength: number, length: number): void {
    const r = this.r;
    if (idLength) {
      let id = '';
      for (let i = 1; i < idLength; i++) id += String.fromCharCode(r.peek(8 + i));
      this.lastBlock = id;
    } else if (this.lastBlock === null) {
      throw new MigrationStreamError('a RAM page continues no block');
    }
    if (this.lastBlock !== this.ramBlock) {
      this.keep(length);
    } else if (zero) {
      const fill = r.peek(8 + idLength);
      r.skip(length);
      this.pages.fill(offset, fill);
    } else {
      r.skip(8 + idLength);
      this.pages.page(offset, r.take(PAGE));
    }
  }

  /**
   * The bulk of the stream: pages of the RAM block that continue it (no id string), parsed in
   * place in the current chunk without allocating (zero pages are just skipped).
   */
  private continuations(): void {
    const w = this.r.window();
    if (!w) return;
    const { buf } = w;
    let at = w.at;
    for (;;) {
      if (at + 9 > buf.length) break;
      const lo = buf.readUInt32BE(at + 4);
      const flags = lo & 0xfff;
      const offset = buf.readUInt32BE(at) * 2 ** 32 + ((lo & ~0xfff) >>> 0);
      if (flags === (Flag.Zero | Flag.Continue)) {
        this.pages.fill(offset, buf[at + 8]!);
        at += 9;
      } else if (flags === (Flag.Page | Flag.Continue) && at + 8 + PAGE <= buf.length) {
        this.pages.page(offset, buf.subarray(at + 8, at + 8 + PAGE));
        at += 8 + PAGE;
      } else {
        break;
      }
    }
    this.r.consume(at - w.at);
  }
}

/** Whether a page record's flags say a zero page (else a full page); throws for any other record. */
function pageRecordIsZero(flags: number): boolean {
  const zero = (flags & Flag.Zero) !== 0;
  if ((flags & ~(Flag.Zero | Flag.Page | Flag.Continue)) !== 0 || zero === ((flags & Flag.Page) !== 0)) {
    throw new MigrationStreamError(`unhandled RAM record flags 0x${flags.toString(16)} (only plain pages, zero pages and EOS are split)`);
  }
  return zero;
}
