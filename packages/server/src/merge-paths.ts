/**
 * Selective merge: copies chosen paths from one sandbox into another through their agents (each
 * sees its own filesystem; the host never resolves a sandbox path itself). Files stream in 1 MiB
 * chunks; a path missing in the source is removed from the destination; directories are walked.
 * The source's agent is untrusted: the paths it lists are never used as such (a listed entry is
 * its directory's path joined with a plain name), and what it prints for a link target is capped.
 */
import { FILE_CHUNK_BYTES, type FileStat } from '@podflare/protocol';
import type { AgentClient } from '@podflare/runtime';
import { AgentError } from './agent-channel.js';

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
/** Longest link target read (PATH_MAX). */
const MAX_LINK_BYTES = 4096;

/** The path of an entry listed in `dir`, from its name alone; a name that is not plain is a violation. */
function entryPath(channel: AgentClient, dir: string, name: string): string {
  if (!name || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
    throw channel.protocolViolation(`list reply: ${JSON.stringify(name.slice(0, 200))} is not a name in ${dir}`);
  }
  return dir.endsWith('/') ? dir + name : `${dir}/${name}`;
}

export async function copyPaths(from: AgentClient, to: AgentClient, paths: string[]): Promise<void> {
  for (const p of paths) await copyPath(from, to, p);
}

async function statOrNull(channel: AgentClient, path: string): Promise<FileStat | null> {
  try {
    return (await channel.request({ op: 'stat', path })).stat;
  } catch (err) {
    if (err instanceof AgentError && err.code === 'not_found') return null;
    throw err;
  }
}

async function copyPath(from: AgentClient, to: AgentClient, path: string): Promise<void> {
  const source = await statOrNull(from, path);
  const target = await statOrNull(to, path);
  if (!source) {
    if (target) await to.request({ op: 'remove', path, recursive: true });
    return;
  }
  if (target && (target.type !== source.type || source.type === 'symlink')) await to.request({ op: 'remove', path, recursive: true });
  switch (source.type) {
    case 'dir': {
      await to.request({ op: 'mkdir', path, parents: true });
      const inSource = (await from.request({ op: 'list', path })).entries;
      const names = new Set(inSource.map((e) => e.name));
      if (target?.type === 'dir') {
        for (const e of (await to.request({ op: 'list', path })).entries) {
          if (!names.has(e.name)) await to.request({ op: 'remove', path: entryPath(to, path, e.name), recursive: true });
        }
      }
      for (const e of inSource) await copyPath(from, to, entryPath(from, path, e.name));
      return;
    }
    case 'file':
      return copyFile(from, to, path, source.mode);
    case 'symlink': {
      const link = await new Promise<string>((resolve, reject) => {
        let out = '';
        from.exec({ op: 'exec', language: 'bash', code: `readlink -n -- ${shellQuote(path)}` }, (m) => {
          if (m.type === 'stdout' && out.length <= MAX_LINK_BYTES) out += m.data;
        }).then((exit) => {
          if (out.length > MAX_LINK_BYTES) reject(from.protocolViolation(`the target of the link ${path} is longer than ${MAX_LINK_BYTES}`));
          else if (exit.code === 0) resolve(out);
          else reject(new Error(`cannot read the link ${path}`));
        }, reject);
      });
      const exit = await to.exec({ op: 'exec', language: 'bash', code: `ln -sfn -- ${shellQuote(link)} ${shellQuote(path)}` }, () => undefined);
      if (exit.code !== 0) throw new Error(`cannot create the link ${path}`);
      return;
    }
    default:
      return; // devices, fifos and sockets are not copied
  }
}

async function copyFile(from: AgentClient, to: AgentClient, path: string, mode: number): Promise<void> {
  const { handle } = await to.request({ op: 'upload_begin', path, mode: mode & 0o7777 });
  try {
    for (let offset = 0; ;) {
      const chunk = await from.request({ op: 'file_read', path, offset, length: FILE_CHUNK_BYTES });
      if (chunk.data.length) await to.request({ op: 'upload_chunk', handle, data: chunk.data });
      offset += Buffer.byteLength(chunk.data, 'base64');
      if (chunk.eof || !chunk.data.length) break;
    }
    await to.request({ op: 'upload_end', handle });
  } catch (err) {
    await to.request({ op: 'upload_end', handle, abort: true }).catch(() => undefined);
    throw err;
  }
}
