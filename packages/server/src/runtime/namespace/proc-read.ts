/**
 * Bounded reads of /proc files a sandbox controls: the command lines of its processes (an argv
 * may be megabytes) and the mount table of its namespaces (thousands of mounts, if it can mount).
 * The server reads them at start-up for every process or sandbox on the host: each read is capped,
 * so no sandbox can make the server hold what it likes in memory.
 */
import { open } from 'node:fs/promises';
import { openSync, readSync, closeSync } from 'node:fs';

/** Enough for any holder's, bwrap's or slirp4netns's command line (they are well under 4 KiB). */
export const CMDLINE_READ_CAP = 64 * 1024;
/** A sandbox's mount table: ~150 bytes a mount, so thousands of mounts; a normal sandbox has a few dozen. */
export const MOUNTINFO_READ_CAP = 1024 * 1024;

/** A /proc file was longer than its cap (the sandbox that owns it made it so). */
export class ProcFileTooLargeError extends Error {
  override name = 'ProcFileTooLargeError';
  constructor(readonly file: string, readonly capBytes: number) {
    super(`${file} is larger than ${capBytes} bytes`);
  }
}

export interface ProcText {
  text: string;
  /** More followed past `text` (which holds the first `cap` bytes). */
  truncated: boolean;
}

/** The first `cap` bytes of `file` (a /proc file: its size is unknown until read), and whether more followed. */
export async function readProcHead(file: string, cap: number): Promise<ProcText> {
  const fh = await open(file, 'r');
  try {
    // In chunks: memory follows the file's real size (most are small), never past the cap.
    const chunks: Buffer[] = [];
    let len = 0;
    while (len <= cap) {
      const chunk = Buffer.allocUnsafe(Math.min(CHUNK, cap + 1 - len));
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, null);
      if (bytesRead === 0) break;
      chunks.push(chunk.subarray(0, bytesRead));
      len += bytesRead;
    }
    return headOf(chunks, len, cap);
  } finally {
    await fh.close();
  }
}

/** readProcHead, synchronously (for single-process checks made from synchronous code). */
export function readProcHeadSync(file: string, cap: number): ProcText {
  const fd = openSync(file, 'r');
  try {
    const chunks: Buffer[] = [];
    let len = 0;
    while (len <= cap) {
      const chunk = Buffer.allocUnsafe(Math.min(CHUNK, cap + 1 - len));
      const n = readSync(fd, chunk, 0, chunk.length, null);
      if (n === 0) break;
      chunks.push(chunk.subarray(0, n));
      len += n;
    }
    return headOf(chunks, len, cap);
  } finally {
    closeSync(fd);
  }
}

const CHUNK = 16 * 1024;

function headOf(chunks: Buffer[], len: number, cap: number): ProcText {
  return { text: Buffer.concat(chunks, len).toString('utf8', 0, Math.min(len, cap)), truncated: len > cap };
}

/** All of `file`, or ProcFileTooLargeError past `cap` bytes. */
export async function readProcWhole(file: string, cap: number): Promise<string> {
  const { text, truncated } = await readProcHead(file, cap);
  if (truncated) throw new ProcFileTooLargeError(file, cap);
  return text;
}

/** A command line's arguments, or null when it is longer than `cap` (then it is no process of ours). */
export async function readCmdline(pid: number | string, cap = CMDLINE_READ_CAP): Promise<string[] | null> {
  const { text, truncated } = await readProcHead(`/proc/${pid}/cmdline`, cap);
  return truncated ? null : text.split('\0');
}
