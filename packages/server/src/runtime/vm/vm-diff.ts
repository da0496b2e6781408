/**
 * diff for VM sandboxes, at the filesystem level through the agents (a VM's disk is a qcow2 of
 * blocks, not of files): each guest lists its root filesystem (path, type, size, mode, mtime,
 * link) into a tmpfs file, the server reads both listings and compares them. Files whose
 * metadata differ but whose size is equal are compared byte for byte (a rewrite with the same
 * content is not a change). Text diffs are unified diffs of the two contents.
 */
import { randomBytes } from 'node:crypto';
import { createTwoFilesPatch } from 'diff';
import { FILE_CHUNK_BYTES } from '@podflare/protocol';
import type { AgentChannel } from '../../agent-channel.js';
import type { DiffOptions, FileDiff } from '../runtime.js';

type Entry = [path: string, type: 'f' | 'd' | 'l' | 'o', size: number, mode: number, mtimeNs: number, link: string | null];

/** Text diffs only for files up to this size (as the namespace runtime). */
const MAX_CONTENT_BYTES = 256 * 1024;
/** Equal-size files with different metadata are compared byte for byte up to this size. */
const MAX_COMPARE_BYTES = 4 * 1024 * 1024;

async function readWhole(channel: AgentChannel, path: string): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let offset = 0; ;) {
    const r = await channel.request({ op: 'file_read', path, offset, length: FILE_CHUNK_BYTES });
    const chunk = Buffer.from(r.data, 'base64');
    parts.push(chunk);
    offset += chunk.length;
    if (r.eof || chunk.length === 0) return Buffer.concat(parts);
  }
}

async function manifest(channel: AgentChannel, paths: string[] | undefined): Promise<Map<string, Entry>> {
  const out = `/dev/shm/.podflare-manifest-${randomBytes(6).toString('hex')}`;
  try {
    await channel.request({ op: 'manifest', paths: paths?.length ? paths : undefined, out });
    const text = (await readWhole(channel, out)).toString('utf8');
    const entries = new Map<string, Entry>();
    for (const line of text.split('\n')) {
      if (!line) continue;
      const e = JSON.parse(line) as Entry;
      entries.set(e[0], e);
    }
    return entries;
  } finally {
    await channel.request({ op: 'remove', path: out }).catch(() => undefined);
  }
}

const sameMeta = (a: Entry, b: Entry) => a[1] === b[1] && a[2] === b[2] && a[3] === b[3] && a[4] === b[4] && a[5] === b[5];

/** Text or not: no NUL byte and valid UTF-8. */
function asText(data: Buffer): string | null {
  if (data.includes(0)) return null;
  const text = data.toString('utf8');
  return Buffer.byteLength(text) === data.length && !text.includes('\ufffd') ? text : null;
}

export async function vmDiff(a: AgentChannel, b: AgentChannel, opts: DiffOptions): Promise<FileDiff> {
  const [ma, mb] = await Promise.all([manifest(a, opts.paths), manifest(b, opts.paths)]);
  const added: string[] = [];
  const removed: string[] = [];
  const modified: string[] = [];
  const content: Record<string, string> = {};
  const binary: string[] = [];
  const tooLarge: string[] = [];
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
        [bufA, bufB] = await Promise.all([readWhole(a, path), readWhole(b, path)]);
        if (bufA.equals(bufB)) continue;
      }
      modified.push(path);
    }
    const regularOrAbsent = (!ea || ea[1] === 'f') && (!eb || eb[1] === 'f');
    if (!opts.content || !regularOrAbsent) continue;
    if ((ea?.[2] ?? 0) > MAX_CONTENT_BYTES || (eb?.[2] ?? 0) > MAX_CONTENT_BYTES) {
      tooLarge.push(path);
      continue;
    }
    bufA ??= ea ? await readWhole(a, path) : Buffer.alloc(0);
    bufB ??= eb ? await readWhole(b, path) : Buffer.alloc(0);
    const ta = asText(bufA);
    const tb = asText(bufB);
    if (ta === null || tb === null) {
      binary.push(path);
      continue;
    }
    const rel = path.replace(/^\//, '');
    // The same header lines as Python's difflib.unified_diff (namespace runtime): no index line.
    content[path] = createTwoFilesPatch(`a/${rel}`, `b/${rel}`, ta, tb, undefined, undefined).split('\n').slice(1).join('\n');
  }
  const result: FileDiff = { added, removed, modified };
  if (opts.content) Object.assign(result, { content, binary, too_large: tooLarge });
  return result;
}
