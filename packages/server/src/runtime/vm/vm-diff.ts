/**
 * diff for VM sandboxes, at the filesystem level through the agents (a VM's disk is a qcow2 of
 * blocks, not of files): each guest lists its root filesystem (path, type, size, mode, mtime,
 * link) into a tmpfs file, the server reads both listings and compares them. Files whose
 * metadata differ but whose size is equal are compared byte for byte (a rewrite with the same
 * content is not a change). Text diffs are unified diffs of the two contents.
 *
 * Both listings and every file come from the guests, which are untrusted: nothing they say is held
 * whole or believed. A listing is parsed line by line as it is read, up to MAX_MANIFEST_BYTES and
 * MAX_MANIFEST_ENTRIES per side (~200 bytes held per entry); compares read at most
 * MAX_COMPARE_BYTES per side, text diffs MAX_CONTENT_BYTES per file and MAX_DIFF_CONTENT_BYTES in
 * all. One diff holds at most ~160 MiB (docs/untrusted-agent.md); the sandbox manager runs one diff
 * per sandbox at a time.
 */
import { randomBytes } from 'node:crypto';
import { createTwoFilesPatch } from 'diff';
import { z } from 'zod';
import { FILE_CHUNK_BYTES } from '@podflare/protocol';
import { SandboxError, type AgentClient } from '@podflare/runtime';
import type { DiffOptions, FileDiff } from '../runtime.js';

type Entry = [path: string, type: 'f' | 'd' | 'l' | 'o', size: number, mode: number, mtimeNs: number, link: string | null];

/** Text diffs only for files up to this size (as the namespace runtime). */
const MAX_CONTENT_BYTES = 256 * 1024;
/** Equal-size files with different metadata are compared byte for byte up to this size. */
const MAX_COMPARE_BYTES = 4 * 1024 * 1024;
/**
 * What the server reads of one guest's listing (the guest writes it: it may be endless). The
 * image's own root lists ~18k entries in ~2.5 MB; past these caps the diff is refused (413) and
 * the caller narrows it with `paths`.
 */
export const MAX_MANIFEST_BYTES = 16 * 1024 * 1024;
export const MAX_MANIFEST_ENTRIES = 100_000;
/** Text diffs of one answer together: past this, further changed files are listed as too large. */
export const MAX_DIFF_CONTENT_BYTES = 16 * 1024 * 1024;

const ManifestEntry = z.tuple([
  z.string().min(1).max(4096).startsWith('/'),
  z.enum(['f', 'd', 'l', 'o']),
  z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
  z.number().int().min(0).max(0o7777),
  z.number().finite(),
  z.string().max(4096).nullable(),
]);

/**
 * Reads a guest file in chunks, at most `maxBytes` of it: null when it holds more (the guest's
 * size claims are not trusted; the bytes it sends are counted).
 */
async function readCapped(channel: AgentClient, path: string, maxBytes: number, onChunk?: (chunk: Buffer) => void): Promise<Buffer | null> {
  const parts: Buffer[] = [];
  for (let offset = 0; ;) {
    const r = await channel.request({ op: 'file_read', path, offset, length: FILE_CHUNK_BYTES });
    const chunk = Buffer.from(r.data, 'base64');
    offset += chunk.length;
    if (offset > maxBytes) return null;
    if (onChunk) onChunk(chunk);
    else parts.push(chunk);
    if (r.eof || chunk.length === 0) return Buffer.concat(parts);
  }
}

/** The guest's listing, parsed line by line as it is read (never held whole as text). */
async function manifest(channel: AgentClient, paths: string[] | undefined): Promise<Map<string, Entry>> {
  const out = `/dev/shm/.podflare-manifest-${randomBytes(6).toString('hex')}`;
  try {
    await channel.request({ op: 'manifest', paths: paths?.length ? paths : undefined, out });
    const entries = new Map<string, Entry>();
    let partial = Buffer.alloc(0);
    let lineNo = 0;
    const parseLine = (line: Buffer) => {
      lineNo++;
      if (line.length === 0) return;
      let value: unknown;
      try {
        value = JSON.parse(line.toString('utf8'));
      } catch {
        throw channel.protocolViolation(`manifest line ${lineNo} is not JSON`);
      }
      const e = ManifestEntry.safeParse(value);
      if (!e.success) throw channel.protocolViolation(`manifest line ${lineNo}: ${e.error.issues[0]?.message ?? 'invalid'}`);
      entries.set(e.data[0], e.data as Entry);
      if (entries.size > MAX_MANIFEST_ENTRIES) throw tooLarge(`more than ${MAX_MANIFEST_ENTRIES} entries`);
    };
    const whole = await readCapped(channel, out, MAX_MANIFEST_BYTES, (chunk) => {
      let data = partial.length ? Buffer.concat([partial, chunk]) : chunk;
      for (let nl = data.indexOf(10); nl !== -1; nl = data.indexOf(10)) {
        parseLine(data.subarray(0, nl));
        data = data.subarray(nl + 1);
      }
      partial = Buffer.from(data);
    });
    if (whole === null) throw tooLarge(`more than ${MAX_MANIFEST_BYTES} bytes`);
    if (partial.length) parseLine(partial);
    return entries;
  } finally {
    await channel.request({ op: 'remove', path: out }).catch(() => undefined);
  }
}

const tooLarge = (what: string) => new SandboxError('payload_too_large',
  `a sandbox's file listing for this diff holds ${what}: narrow the diff with paths=`, { field: 'paths' });

const sameMeta = (a: Entry, b: Entry) => a[1] === b[1] && a[2] === b[2] && a[3] === b[3] && a[4] === b[4] && a[5] === b[5];

/** Text or not: no NUL byte and valid UTF-8. */
function asText(data: Buffer): string | null {
  if (data.includes(0)) return null;
  const text = data.toString('utf8');
  return Buffer.byteLength(text) === data.length && !text.includes('\ufffd') ? text : null;
}

export async function vmDiff(a: AgentClient, b: AgentClient, opts: DiffOptions): Promise<FileDiff> {
  const [ma, mb] = await Promise.all([manifest(a, opts.paths), manifest(b, opts.paths)]);
  const added: string[] = [];
  const removed: string[] = [];
  const modified: string[] = [];
  const content: Record<string, string> = {};
  const binary: string[] = [];
  const tooLargeFiles: string[] = [];
  let contentBytes = 0;
  const paths = [...new Set([...ma.keys(), ...mb.keys()])].sort();
  for (const path of paths) {
    const ea = ma.get(path);
    const eb = mb.get(path);
    let bufA: Buffer | undefined;
    let bufB: Buffer | undefined;
    if (!ea) added.push(path);
    else if (!eb) removed.push(path);
    else {
      if (sameMeta(ea, eb) || (ea[1] === 'd' && eb[1] === 'd')) continue;
      if (ea[1] === 'f' && eb[1] === 'f' && ea[2] === eb[2] && ea[3] === eb[3] && ea[2] <= MAX_COMPARE_BYTES) {
        const [ra, rb] = await Promise.all([readCapped(a, path, MAX_COMPARE_BYTES), readCapped(b, path, MAX_COMPARE_BYTES)]);
        [bufA, bufB] = [ra ?? undefined, rb ?? undefined];
        if (bufA && bufB && bufA.equals(bufB)) continue;
      }
      modified.push(path);
    }
    const regularOrAbsent = (!ea || ea[1] === 'f') && (!eb || eb[1] === 'f');
    if (!opts.content || !regularOrAbsent) continue;
    if ((ea?.[2] ?? 0) > MAX_CONTENT_BYTES || (eb?.[2] ?? 0) > MAX_CONTENT_BYTES || contentBytes >= MAX_DIFF_CONTENT_BYTES) {
      tooLargeFiles.push(path);
      continue;
    }
    // The sizes listed are the guest's word: what is read is capped again.
    const readA = bufA ?? (ea ? await readCapped(a, path, MAX_CONTENT_BYTES) : Buffer.alloc(0));
    const readB = bufB ?? (eb ? await readCapped(b, path, MAX_CONTENT_BYTES) : Buffer.alloc(0));
    if (!readA || !readB || readA.length > MAX_CONTENT_BYTES || readB.length > MAX_CONTENT_BYTES) {
      tooLargeFiles.push(path);
      continue;
    }
    bufA = readA;
    bufB = readB;
    const ta = asText(bufA);
    const tb = asText(bufB);
    if (ta === null || tb === null) {
      binary.push(path);
      continue;
    }
    const rel = path.replace(/^\//, '');
    // The same header lines as Python's difflib.unified_diff (namespace runtime): no index line.
    const patch = createTwoFilesPatch(`a/${rel}`, `b/${rel}`, ta, tb, undefined, undefined).split('\n').slice(1).join('\n');
    contentBytes += patch.length;
    content[path] = patch;
  }
  const result: FileDiff = { added, removed, modified };
  if (opts.content) Object.assign(result, { content, binary, too_large: tooLargeFiles });
  return result;
}
