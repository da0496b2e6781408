/**
 * Forwarding one request to a node and its answer back, streamed both ways (NDJSON exec output and
 * file transfers pass chunk by chunk, never buffered). Keep-alive connections per node; a connect
 * that takes longer than `connectTimeoutMs` fails (a partitioned node answers 503 quickly, not
 * after the kernel's minutes of SYN retries).
 */
import http from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { NODE_TOKEN_HEADER } from './node-token.js';

/** Request headers that belong to one hop, not to the request (RFC 9110 §7.6.1), plus what the gateway sets itself. */
const HOP_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'te', 'trailer', 'transfer-encoding',
  'upgrade', 'host', 'origin', NODE_TOKEN_HEADER]);

/** How long an answer's headers wait for its first chunk before going out alone. */
const HEADER_FLUSH_MS = 2;

/** The request could not be delivered (no connection, or the connection broke before an answer). */
export class NodeUnreachableError extends Error {
  override name = 'NodeUnreachableError';
}

export interface ForwardTarget {
  address: string;
  nodeToken: string;
  agent: http.Agent;
  connectTimeoutMs: number;
}

export interface ForwardRequest {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
  /** A body already read (create), or the client's request to stream from. */
  body: Buffer | IncomingMessage | null;
}

/** Sends the request to the node; resolves with the node's answer (headers received, body not read). */
export function sendToNode(target: ForwardTarget, request: ForwardRequest): Promise<IncomingMessage> {
  const [host, port] = splitAddress(target.address);
  const headers: http.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(request.headers)) if (!HOP_HEADERS.has(k) && v !== undefined) headers[k] = v;
  headers.host = target.address;
  headers[NODE_TOKEN_HEADER] = target.nodeToken;
  if (Buffer.isBuffer(request.body)) headers['content-length'] = String(request.body.length);
  return new Promise((resolve, reject) => {
    const upstream = http.request({ host, port, method: request.method, path: request.path, headers, agent: target.agent });
    let answered = false;
    upstream.on('socket', (socket) => {
      if (!socket.connecting) return;
      const timer = setTimeout(() => upstream.destroy(new NodeUnreachableError(`no connection to ${target.address} within ${target.connectTimeoutMs} ms`)),
        target.connectTimeoutMs);
      socket.once('connect', () => clearTimeout(timer));
      socket.once('close', () => clearTimeout(timer));
    });
    upstream.on('response', (res) => { answered = true; resolve(res); });
    upstream.on('error', (err) => {
      if (answered) return;
      reject(err instanceof NodeUnreachableError ? err : new NodeUnreachableError(`${target.address}: ${err.message}`));
    });
    if (request.body === null) upstream.end();
    else if (Buffer.isBuffer(request.body)) upstream.end(request.body);
    else {
      const client = request.body;
      client.pipe(upstream);
      // The caller went away mid-request: so does the request to the node.
      client.on('aborted', () => upstream.destroy());
    }
  });
}

/** Streams the node's answer to the client as it comes. */
export function pipeAnswer(answer: IncomingMessage, res: ServerResponse): void {
  const headers: http.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(answer.headers)) if (!HOP_HEADERS.has(k) && k !== 'keep-alive' && v !== undefined) headers[k] = v;
  res.writeHead(answer.statusCode ?? 502, headers);
  // Chunks go out as they arrive (exec output streams); nothing waits for the end. The headers go
  // with the first chunk (one packet, one wake-up of the caller, where most answers are one or two
  // chunks), or on their own if the node sends nothing for a moment (a long exec streaming later).
  const flush = setTimeout(() => res.flushHeaders(), HEADER_FLUSH_MS);
  answer.once('data', () => clearTimeout(flush));
  answer.once('end', () => clearTimeout(flush));
  answer.once('close', () => clearTimeout(flush));
  answer.pipe(res);
  answer.on('error', () => res.destroy());
  res.on('close', () => { if (!answer.complete) answer.destroy(); });
}

/** Reads a (small) answer body whole. */
export async function readAnswer(answer: IncomingMessage, cap = 1024 * 1024): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of answer as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > cap) throw new Error(`answer over ${cap} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function splitAddress(address: string): [string, number] {
  const at = address.lastIndexOf(':');
  return [address.slice(0, at).replace(/^\[|\]$/g, ''), Number(address.slice(at + 1))];
}
