/**
 * The pages of a stopped VM's RAM that are its own: those its QEMU has written since it mapped its
 * RAM file copy-on-write (`share=off`). Every other page of its RAM is still the file's. Found in
 * the kernel's page tables (/proc/<pid>/pagemap: a private mapping's written page is anonymous),
 * read from its memory (/proc/<pid>/mem; the server is root). Nothing in QEMU runs for it: a
 * migration would read all of the VM's RAM to find zero pages (512 MB for a few MB written).
 *
 * Synchronous: it runs in the fork worker thread (fork-memory.ts), off the server's event loop.
 */
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import { PAGE } from './migration-split.js';

const PRESENT = 0x80000000;
const SWAPPED = 0x40000000;
/** File page or shared anonymous page: not the process's own copy. */
const FILE_OR_SHARED = 0x20000000;

/** Where a VM's private pages are: its RAM's address in its QEMU, and their page numbers. */
export interface PageList {
  start: number;
  pages: Uint32Array;
}

/**
 * `pid`'s private pages of its mapping of `ramFile` (`ramSize` bytes; the name /proc/<pid>/maps
 * shows: a path, or `/memfd:<name> (deleted)` for shared RAM), from its page table.
 */
export function findPrivatePages(pid: number, ramFile: string, ramSize: number): PageList {
  const start = mappingStart(pid, ramFile, ramSize);
  const count = ramSize / PAGE;
  const entries = Buffer.allocUnsafe(count * 8);
  readFully(`/proc/${pid}/pagemap`, entries, (start / PAGE) * 8);
  const own = new Uint32Array(count);
  let n = 0;
  for (let i = 0; i < count; i++) {
    // Bits 63 (present), 62 (swapped), 61 (file page or shared): the entry's high word, little-endian.
    const high = entries.readUInt32LE(i * 8 + 4);
    if (((high & PRESENT) !== 0 && (high & FILE_OR_SHARED) === 0) || (high & SWAPPED) !== 0) own[n++] = i;
  }
  return { start, pages: own.slice(0, n) };
}

/**
 * Reads runs of pages of a VM's RAM from its QEMU's memory (/proc/<pid>/mem) into one buffer,
 * reused: a read per run, not per page (each read of another process's memory costs microseconds).
 */
export class PageReader {
  private readonly fd: number;
  private readonly buffer: Buffer;

  constructor(pid: number, private readonly start: number, maxPages: number) {
    this.fd = openSync(`/proc/${pid}/mem`, 'r');
    this.buffer = Buffer.allocUnsafe(maxPages * PAGE);
  }

  /** `count` pages from page `first` on; valid until the next read. */
  read(first: number, count: number): Buffer {
    readAt(this.fd, this.buffer, 0, count * PAGE, this.start + first * PAGE);
    return this.buffer.subarray(0, count * PAGE);
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Where `pid` maps `ramFile` (the whole of it: `ramSize` bytes), from /proc/<pid>/maps. */
function mappingStart(pid: number, ramFile: string, ramSize: number): number {
  for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    // start-end perms offset dev inode   path
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ 0+ \S+ \d+\s+(\S.*)$/.exec(line);
    if (m && m[3] === ramFile && parseInt(m[2]!, 16) - parseInt(m[1]!, 16) === ramSize) return parseInt(m[1]!, 16);
  }
  throw new Error(`QEMU ${pid} does not map ${ramFile}`);
}

function readFully(file: string, into: Buffer, position: number): void {
  const fd = openSync(file, 'r');
  try {
    readAt(fd, into, 0, into.length, position);
  } finally {
    closeSync(fd);
  }
}

function readAt(fd: number, into: Buffer, offset: number, length: number, position: number): void {
  while (length > 0) {
    const n = readSync(fd, into, offset, length, position);
    if (n === 0) throw new Error(`a read of another process's memory at 0x${position.toString(16)} came back short`);
    offset += n;
    position += n;
    length -= n;
  }
}
