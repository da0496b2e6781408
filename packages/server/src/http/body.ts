/** Reading request bodies with caps, and writing JSON answers. */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { z } from 'zod';
import { describeZodError } from '@podflare/protocol';
import { ApiError } from './api-error.js';

/** JSON bodies are small (code is capped at 4 MiB); files use raw streamed bodies instead. */
export const MAX_JSON_BODY_BYTES = 8 * 1024 * 1024;
const JSON_BODY_TIMEOUT_MS = 60_000;

/**
 * A JSON body must say `Content-Type: application/json` (parameters such as charset aside). The
 * types a web page may send cross-site without a CORS preflight (form-urlencoded, multipart,
 * text/plain) or with none at all (a Blob) are refused, so no page can smuggle JSON in through
 * them. A request without a body may leave the type out (`POST /v1/sandboxes` with defaults), but
 * not declare another one (an empty form post).
 */
function checkJsonContentType(req: IncomingMessage): void {
  const header = req.headers['content-type'];
  const length = req.headers['content-length'];
  const hasBody = (length !== undefined && length !== '0') || req.headers['transfer-encoding'] !== undefined;
  const type = header?.split(';')[0]!.trim().toLowerCase() ?? '';
  if (type === 'application/json' || (type === '' && !hasBody)) return;
  const got = header === undefined ? 'no Content-Type' : `Content-Type ${header.slice(0, 100)}`;
  throw new ApiError('unsupported_media_type', `this endpoint takes a JSON body with Content-Type: application/json, got ${got}`);
}

export async function readJson(req: IncomingMessage): Promise<unknown> {
  checkJsonContentType(req);
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
