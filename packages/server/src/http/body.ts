/** Reading request bodies with caps, and writing JSON answers. */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { z } from 'zod';
import { describeZodError } from '@podflare/protocol';
import { ApiError } from '../errors.js';

/** JSON bodies are small (code is capped at 4 MiB); files use raw streamed bodies instead. */
export const MAX_JSON_BODY_BYTES = 8 * 1024 * 1024;
const JSON_BODY_TIMEOUT_MS = 60_000;

/**
 * Media types a JSON body may be declared as: JSON itself, none at all, and curl's default for
 * `-d` (form-urlencoded), so `curl -d '{"code": "1"}'` works. Anything else is a client mistake.
 */
function isJsonContentType(header: string | undefined): boolean {
  if (!header) return true;
  const type = header.split(';')[0]!.trim().toLowerCase();
  return type === '' || type === 'application/json' || type.endsWith('+json') || type === 'application/x-www-form-urlencoded';
}

export async function readJson(req: IncomingMessage): Promise<unknown> {
  if (!isJsonContentType(req.headers['content-type']) && (req.headers['content-length'] !== '0' || req.headers['transfer-encoding'])) {
    throw new ApiError('unsupported_media_type', `this endpoint takes a JSON body (Content-Type: application/json), got ${req.headers['content-type']!.slice(0, 100)}`);
  }
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_JSON_BODY_BYTES) throw new ApiError('payload_too_large', `request body over ${MAX_JSON_BODY_BYTES} bytes`);
  const chunks: Buffer[] = [];
  let size = 0;
  // The server sets no overall request timeout (uploads may take long): a JSON body trickling in
  // slower than this only ties up a connection, so drop it.
  const timer = setTimeout(() => req.destroy(), JSON_BODY_TIMEOUT_MS);
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > MAX_JSON_BODY_BYTES) throw new ApiError('payload_too_large', `request body over ${MAX_JSON_BODY_BYTES} bytes`);
      chunks.push(chunk);
    }
  } finally {
    clearTimeout(timer);
  }
  if (size === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new ApiError('bad_request', `request body is not valid JSON: ${(err as Error).message}`);
  }
}

export async function readBody<T extends z.ZodType>(req: IncomingMessage, schema: T): Promise<z.infer<T>> {
  const raw = await readJson(req);
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw new ApiError('bad_request', 'request body must be a JSON object');
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const { message, field } = describeZodError(parsed.error);
    throw new ApiError('bad_request', message, field);
  }
  return parsed.data;
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

export function sendEmpty(res: ServerResponse, status = 204): void {
  res.writeHead(status);
  res.end();
}
