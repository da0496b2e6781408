/**
 * Incremental NDJSON framing: turns a byte stream into one parsed value per line, yielding each as
 * soon as its newline arrives (never waiting for the whole body). Multi-byte UTF-8 characters split
 * across chunks are handled by a streaming TextDecoder; a long line split over many chunks is scanned
 * for its newline only once per byte.
 */
import { PodflareError } from './errors.js';

/**
 * Yields the lines of a byte (or text) stream without their `\n` / `\r\n`, skipping blank lines. A
 * final line without a trailing newline is yielded too.
 */
export async function* splitLines(source: AsyncIterable<Uint8Array | string>): AsyncGenerator<string, void, undefined> {
  const decoder = new TextDecoder('utf-8');
  let pending = '';
  for await (const chunk of source) {
    // Only the new text can hold a newline: everything before it was already scanned.
    let scanFrom = pending.length;
    pending += typeof chunk === 'string' ? chunk : decoder.decode(chunk, { stream: true });
    let start = 0;
    let nl: number;
    while ((nl = pending.indexOf('\n', scanFrom)) !== -1) {
      const line = trimLine(pending, start, nl);
      if (line !== '') yield line;
      start = scanFrom = nl + 1;
    }
    if (start > 0) pending = pending.slice(start);
  }
  pending += decoder.decode();
  const last = trimLine(pending, 0, pending.length);
  if (last !== '') yield last;
}

function trimLine(text: string, start: number, end: number): string {
  if (end > start && text.charCodeAt(end - 1) === 13 /* \r */) end--;
  const line = text.slice(start, end);
  // /\S/ stops at the first visible character: cheap even for a multi-megabyte line.
  return /\S/.test(line) ? line : '';
}

/**
 * Yields one parsed JSON value per line of `source`. A line that is not JSON fails the iteration with
 * a {@link PodflareError} coded `invalid_response` (the server is not speaking the API).
 */
export async function* parseNdjson<T = unknown>(source: AsyncIterable<Uint8Array | string>): AsyncGenerator<T, void, undefined> {
  for await (const line of splitLines(source)) {
    let value: T;
    try {
      value = JSON.parse(line) as T;
    } catch (cause) {
      throw new PodflareError(`invalid NDJSON line from the server: ${line.slice(0, 200)}`, {
        code: 'invalid_response',
        status: 0,
        cause,
      });
    }
    yield value;
  }
}
