/**
 * A sandbox's files through its agent: 1 MiB base64 chunks, one in flight at a time, so neither
 * side ever holds a whole file. Every call counts as use for the idle timeout. Not queued behind
 * execs: files can be read and written while code runs.
 */
import { FILE_CHUNK_BYTES } from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import type { LiveSandbox } from './live-sandbox.js';

/** One chunk of a file read: its bytes, the file's size, and whether the file ends here. */
export interface FileChunk {
  data: Buffer;
  size: number;
  eof: boolean;
}

const touch = (s: LiveSandbox) => {
  s.record.lastActiveAt = Date.now();
};

export class SandboxFiles {
  /**
   * Writes `body` to `path` as it arrives (read only as fast as the agent writes); `complete` says
   * whether the body ended normally (else 400, and the partial upload is aborted). Resolves with the size.
   */
  async upload(s: LiveSandbox, path: string, body: AsyncIterable<Buffer>, complete: () => boolean): Promise<number> {
    touch(s);
    const channel = s.rt.channel;
    const { handle } = await channel.request({ op: 'upload_begin', path });
    try {
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      const flush = async () => {
        if (!pendingBytes) return;
        const data = Buffer.concat(pending).toString('base64');
        pending = [];
        pendingBytes = 0;
        await channel.request({ op: 'upload_chunk', handle, data });
        touch(s);
      };
      for await (const chunk of body) {
        let offset = 0;
        while (offset < chunk.length) {
          const take = Math.min(FILE_CHUNK_BYTES - pendingBytes, chunk.length - offset);
          pending.push(chunk.subarray(offset, offset + take));
          pendingBytes += take;
          offset += take;
          if (pendingBytes === FILE_CHUNK_BYTES) await flush();
        }
      }
      if (!complete()) throw new SandboxError('bad_request', 'upload aborted before the body was complete');
      await flush();
      const { size } = await channel.request({ op: 'upload_end', handle });
      return size;
    } catch (err) {
      await channel.request({ op: 'upload_end', handle, abort: true }).catch(() => undefined);
      throw err;
    }
  }

  /** One chunk (at most 1 MiB) of `path` from `offset`. */
  async read(s: LiveSandbox, path: string, offset: number): Promise<FileChunk> {
    touch(s);
    const chunk = await s.rt.channel.request({ op: 'file_read', path, offset, length: FILE_CHUNK_BYTES });
    return { data: Buffer.from(chunk.data, 'base64'), size: chunk.size, eof: chunk.eof };
  }

  async stat(s: LiveSandbox, path: string) {
    touch(s);
    return (await s.rt.channel.request({ op: 'stat', path })).stat;
  }

  async list(s: LiveSandbox, path: string) {
    touch(s);
    return (await s.rt.channel.request({ op: 'list', path })).entries;
  }

  async remove(s: LiveSandbox, path: string, recursive: boolean): Promise<void> {
    touch(s);
    await s.rt.channel.request({ op: 'remove', path, recursive });
  }

  async mkdir(s: LiveSandbox, path: string): Promise<void> {
    touch(s);
    await s.rt.channel.request({ op: 'mkdir', path, parents: true });
  }
}
