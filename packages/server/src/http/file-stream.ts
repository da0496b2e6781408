/**
 * Streaming a sandbox file to an HTTP client, shared by the file and tar download routes: the next
 * chunk is asked of the agent only once the previous one has drained to the client, so neither side
 * ever holds a whole file.
 */
import type { ServerResponse } from 'node:http';
import type { LiveSandbox, SandboxManager } from '../sandbox-manager.js';
import type { FileChunk } from '../manager/files.js';
import { ApiError } from './api-error.js';
import { drainedOrClosed } from './drain.js';
import type { RequestContext } from './router.js';

/**
 * The `path` query parameter, validated (required, at most 4096 characters, no NUL); `example`
 * shows the caller what to send.
 */
export function pathParam(ctx: RequestContext, example: string): string {
  const p = ctx.query.get('path');
  if (!p) throw new ApiError('bad_request', `path: required (query parameter, ${example})`, 'path');
  if (p.length > 4096) throw new ApiError('bad_request', 'path: longer than 4096 characters', 'path');
  if (p.includes('\0')) throw new ApiError('bad_request', 'path: must not contain NUL', 'path');
  return p;
}

/**
 * Answers 200 with the file at `path`, whose first chunk the caller has read (its `size` is the
 * Content-Length). A file that shrinks while it is read ends the response early (the promised length
 * can no longer be met); a client that goes away ends the reading.
 */
export async function streamFile(res: ServerResponse, manager: SandboxManager, s: LiveSandbox, path: string,
  first: FileChunk, contentType: string, headOnly = false): Promise<void> {
  const size = first.size;
  res.writeHead(200, { 'Content-Type': contentType, 'Content-Length': size });
  if (headOnly) return void res.end();
  let chunk = first;
  let sent = 0;
  for (;;) {
    const bytes = chunk.data.subarray(0, size - sent);
    sent += bytes.length;
    if (!res.write(bytes)) await drainedOrClosed(res);
    if (res.destroyed) return;
    if (chunk.eof || sent >= size || bytes.length === 0) break;
    chunk = await manager.files.read(s, path, sent);
  }
  if (sent < size) res.destroy();
  else res.end();
}
