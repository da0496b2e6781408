/**
 * Per-request observability: W3C trace context (a valid incoming `traceparent` is honoured — its
 * trace id is kept and this server's span becomes the child — and a `traceparent` naming this
 * server's span is echoed on every answer), one structured log line per request with the sandbox it
 * touched and its duration, and the request counter of /v1/metrics.
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import type { Logger } from '../log.js';
import type { ServerMetrics } from '../metrics.js';

export interface TraceContext {
  traceId: string;
  spanId: string;
  /** The caller's span, when it sent a valid traceparent. */
  parentSpanId: string | null;
  flags: string;
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$/;

/** The trace this request belongs to: the caller's if its header is valid, else a new one. */
export function traceContext(header: string | string[] | undefined): TraceContext {
  const spanId = randomBytes(8).toString('hex');
  const value = typeof header === 'string' ? header.trim().toLowerCase() : '';
  const m = TRACEPARENT.exec(value);
  // Version ff is forbidden; all-zero ids are invalid; version 00 allows no trailing fields.
  if (m && m[1] !== 'ff' && !/^0+$/.test(m[2]!) && !/^0+$/.test(m[3]!) && !(m[1] === '00' && value.length !== 55)) {
    return { traceId: m[2]!, spanId, parentSpanId: m[3]!, flags: m[4]! };
  }
  return { traceId: randomBytes(16).toString('hex'), spanId, parentSpanId: null, flags: '00' };
}

export const formatTraceparent = (t: TraceContext) => `00-${t.traceId}-${t.spanId}-${t.flags}`;

const SANDBOX_IN_PATH = new RegExp(`^/v1/sandboxes/(${SANDBOX_ID_SOURCE})(?:/|$)`);

/** Sandboxes a request touched that its path does not name (a create's new id). */
const noted = new WeakMap<ServerResponse, string>();

/** Names the sandbox a request created, for its log line. */
export function noteSandbox(res: ServerResponse, id: string): void {
  noted.set(res, id);
}

/**
 * Starts observing a request, first thing (so even a request refused before routing carries its
 * traceparent); call `done` with its path once it is answered (or its stream ended).
 */
export function observeRequest(req: IncomingMessage, res: ServerResponse, log: Logger, metrics: ServerMetrics) {
  const started = performance.now();
  const trace = traceContext(req.headers.traceparent);
  res.setHeader('traceparent', formatTraceparent(trace));
  return {
    trace,
    done(path: string | undefined): void {
      const ms = Math.round((performance.now() - started) * 100) / 100;
      const status = res.statusCode;
      metrics.requests.inc({ method: req.method ?? 'GET', code: String(status) });
      log.info('request', {
        method: req.method, path, status, ms,
        sandbox: SANDBOX_IN_PATH.exec(path ?? '')?.[1] ?? noted.get(res),
        trace_id: trace.traceId, span_id: trace.spanId, parent_span_id: trace.parentSpanId ?? undefined,
      });
    },
  };
}
