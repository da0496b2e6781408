/**
 * The HTTP layer: one keep-alive `Agent` per Client, shared by every sandbox made through it, so a hot
 * exec reuses a warm TCP connection (`node:http` directly rather than fetch: no per-call stream and
 * promise machinery on the hot path). Responses are handed over unread so NDJSON and downloads stream;
 * non-2xx answers become the error classes of errors.ts.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import { Readable, type Duplex } from 'node:stream';
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ClientRequest, OutgoingHttpHeaders } from 'node:http';
import {
  BadRequestError,
  ConnectionError,
  PodflareError,
  TimeoutError,
  errorFromResponse,
} from './errors.js';
import type { Capacity, ConnectionOptions, UploadData } from './types.js';

/** The SDK's version, sent in the User-Agent header. */
export const SDK_VERSION = '0.1.0';

/** Where the server listens when neither the `host` option nor the environment says otherwise. */
export const DEFAULT_HOST = 'http://127.0.0.1:7070';

/** Default of {@link ClientOptions.requestTimeoutMs}. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;

/** Options of {@link Client}. */
export interface ClientOptions {
  /**
   * Base URL of the Podflare server: `http://host:port` or `https://…`; a bare `host:port` means http.
   * A path prefix (`https://proxy.example/podflare`) is kept.
   * @default process.env.PODFLARE_HOST, else process.env.PODFLARE_HOSTD_URL (the hosted SDKs' name
   * for it), else `http://127.0.0.1:7070`
   */
  host?: string;
  /**
   * API key, sent as `Authorization: Bearer <key>`.
   * @default process.env.PODFLARE_API_KEY (none: fine for a loopback server without keys)
   */
  apiKey?: string;
  /**
   * Client-side bound on a call, in ms; past it the call fails with a {@link TimeoutError}
   * (`status` 0). It covers the whole call for JSON calls (create, fork, files.list…); for file
   * transfers it covers connecting and waiting for the answer's headers, not the body's streaming;
   * for execs only connecting (see `ExecOptions.requestTimeoutMs`). `0` disables it.
   * @default 60000
   */
  requestTimeoutMs?: number;
}

/**
 * Which part of a call the client-side timeout covers: `total` the whole call, body included;
 * `headers` connecting and, once the request body is sent, waiting for the answer's headers;
 * `connect` connecting only.
 * @internal
 */
export type TimeoutScope = 'total' | 'headers' | 'connect';

/** @internal A request as the Sandbox and Files classes describe it. */
export interface RequestSpec {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** The API path, starting with `/v1/`, segments already encoded. */
  path: string;
  /** Query parameters; `undefined` and `false` are left out, `true` is sent as `1`. */
  query?: Record<string, string | number | boolean | undefined> | undefined;
  /** A JSON body. */
  json?: unknown;
  /** A raw body (uploads). Streams are piped, never buffered. */
  body?: UploadData | undefined;
  signal?: AbortSignal | undefined;
  /** Overrides the Client's `requestTimeoutMs` for this call. */
  timeoutMs?: number | undefined;
  /** @default 'total' */
  timeoutScope?: TimeoutScope;
}

/** Socket errors that mean the server is unreachable or the connection dropped. */
const NETWORK_ERROR_CODES: ReadonlySet<string> = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH',
  'EHOSTDOWN', 'ENETUNREACH', 'ENETDOWN', 'ETIMEDOUT', 'ERR_STREAM_PREMATURE_CLOSE',
]);
/** The subset that happens before anything was exchanged: the server was never reached. */
const UNREACHABLE_CODES: ReadonlySet<string> = new Set([
  'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'EHOSTDOWN', 'ENETUNREACH', 'ENETDOWN',
]);

/** Biggest error body the client reads; longer ones are cut (the message only needs the start). */
const MAX_ERROR_BODY = 1024 * 1024;

/**
 * A reused keep-alive socket that the server had closed while it sat idle in the pool (its idle
 * timeout racing our request): the request never reached the server, so a replayable request is sent
 * once more on a fresh socket. This is the retry Node's http docs recommend (`req.reusedSocket`).
 */
class StaleSocketError extends Error {
  constructor(readonly original: Error) {
    super(original.message);
  }
}

/** The caller's upload stream failed; its error is rethrown as is. */
class UploadSourceError extends Error {
  constructor(readonly original: Error) {
    super(original.message);
  }
}

/**
 * A connection to one Podflare server: its address, API key and one keep-alive connection pool.
 * Sandboxes made with the same Client (and the children they fork) share its connections. Most code
 * never makes one: `Sandbox.create()` uses a default Client built from `PODFLARE_HOST` and
 * `PODFLARE_API_KEY`.
 *
 * @example
 * ```ts
 * const client = new Client({ host: 'http://10.0.0.5:7070', apiKey: process.env.MY_KEY });
 * const a = await Sandbox.create({ client });
 * const b = await Sandbox.create({ client }); // same connection pool
 * ```
 */
export class Client {
  /** The server's base URL as used (normalized, no trailing slash), e.g. `http://127.0.0.1:7070`. */
  readonly host: string;
  /** Where {@link host} came from (the option, which variable, or the default): error messages name it. */
  readonly #hostSource: string;
  /** The client-side timeout in ms (0: none). */
  readonly requestTimeoutMs: number;
  readonly #apiKey: string | undefined;
  readonly #agent: http.Agent;
  readonly #transport: typeof http.request;
  readonly #hostname: string;
  readonly #port: number;
  readonly #basePath: string;
  readonly #userAgent = `podflare-js/${SDK_VERSION} node/${process.version}`;

  constructor(options: ClientOptions = {}) {
    const { raw, source } = hostSetting(options.host);
    this.#hostSource = source;
    const url = parseHost(raw, source);
    const secure = url.protocol === 'https:';
    this.#basePath = url.pathname.replace(/\/+$/, '');
    this.host = `${url.protocol}//${url.host}${this.#basePath}`;
    // URL keeps IPv6 literals bracketed; http.request wants them bare.
    this.#hostname = url.hostname.replace(/^\[(.*)\]$/, '$1');
    this.#port = url.port ? Number(url.port) : secure ? 443 : 80;
    this.#apiKey = options.apiKey ?? nonEmpty(process.env.PODFLARE_API_KEY);
    const timeout = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    if (!Number.isFinite(timeout) || timeout < 0) {
      throw new BadRequestError(`requestTimeoutMs must be a number >= 0, got ${String(timeout)}`, {
        code: 'bad_request',
        status: 0,
        field: 'requestTimeoutMs',
      });
    }
    this.requestTimeoutMs = timeout;
    // One pool per Client. Idle sockets are unref'd by Node, so they never keep the process alive.
    const agentOptions: http.AgentOptions = { keepAlive: true, keepAliveMsecs: 1000, scheduling: 'lifo' };
    this.#agent = secure ? new https.Agent(agentOptions) : new http.Agent(agentOptions);
    this.#transport = secure ? https.request : http.request;
  }

  /**
   * Resolves to true when the server answers `GET /v1/healthz` (no auth needed).
   * @throws {ConnectionError} when it cannot be reached.
   */
  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    await this.empty({ method: 'GET', path: '/v1/healthz', signal: options.signal });
    return true;
  }

  /** The server's warm-pool and sandbox counters (`GET /v1/capacity`). */
  capacity(options: { signal?: AbortSignal } = {}): Promise<Capacity> {
    return this.json<Capacity>({ method: 'GET', path: '/v1/capacity', signal: options.signal });
  }

  /**
   * Closes this Client's pooled connections (in-flight calls included). Not needed before exit: idle
   * sockets do not keep the process alive; useful for a short-lived Client in a long process. The
   * Client stays usable (a later call opens a new connection). Sandboxes are NOT destroyed: call
   * their `close()` first.
   */
  close(): void {
    this.#agent.destroy();
  }

  /**
   * Sends a request and resolves with the 2xx answer, its body unread (read it fully or destroy it,
   * else the connection is not returned to the pool). Non-2xx answers are thrown as PodflareErrors.
   * @internal
   */
  async request(spec: RequestSpec): Promise<IncomingMessage> {
    if (spec.signal?.aborted) throw abortReason(spec.signal);
    const path = this.#pathWithQuery(spec.path, spec.query);
    const headers: OutgoingHttpHeaders = { 'user-agent': this.#userAgent };
    if (this.#apiKey !== undefined) headers.authorization = `Bearer ${this.#apiKey}`;
    let payload: Buffer | undefined;
    let stream: Readable | undefined;
    if (spec.json !== undefined) {
      payload = Buffer.from(JSON.stringify(spec.json));
      headers['content-type'] = 'application/json';
    } else if (spec.body !== undefined) {
      const body = toBody(spec.body);
      if (Buffer.isBuffer(body)) payload = body;
      else stream = body;
      headers['content-type'] = 'application/octet-stream';
    }
    if (payload !== undefined) headers['content-length'] = payload.length;
    else if (stream === undefined && spec.method !== 'GET') headers['content-length'] = 0;

    for (let attempt = 0; ; attempt++) {
      let res: IncomingMessage;
      let req: ClientRequest;
      try {
        [res, req] = await this.#send(spec, path, headers, payload, stream);
      } catch (err) {
        // A request without a stream body can be replayed: the stale socket never delivered it.
        if (err instanceof StaleSocketError && stream === undefined && attempt === 0) continue;
        // The caller's own stream failed: theirs to interpret, even if it carries a socket code.
        if (err instanceof UploadSourceError) throw err.original;
        throw this.wrapError(err instanceof StaleSocketError ? err.original : err, spec);
      }
      const status = res.statusCode ?? 0;
      if (status >= 200 && status < 300) return res;
      let text: string;
      try {
        text = (await readAll(res, MAX_ERROR_BODY)).toString('utf8');
      } catch (err) {
        throw this.wrapError(err, spec);
      } finally {
        // An upload the server refused early: stop sending the rest of the body.
        if (stream !== undefined && !req.writableFinished) req.destroy();
      }
      throw errorFromResponse(status, text, res.headers, `${spec.method} ${this.host}${spec.path}`);
    }
  }

  /** Sends a request and parses its JSON answer. @internal */
  async json<T>(spec: RequestSpec): Promise<T> {
    const res = await this.request(spec);
    let buf: Buffer;
    try {
      buf = await readAll(res);
    } catch (err) {
      throw this.wrapError(err, spec);
    }
    try {
      return JSON.parse(buf.toString('utf8')) as T;
    } catch (cause) {
      throw new PodflareError(
        `invalid JSON from ${spec.method} ${this.host}${spec.path}: ${buf.toString('utf8', 0, 200)}`,
        { code: 'invalid_response', status: res.statusCode ?? 0, cause },
      );
    }
  }

  /** Sends a request whose answer has no body we need (204s), draining it so the socket is reused. @internal */
  async empty(spec: RequestSpec): Promise<void> {
    const res = await this.request(spec);
    try {
      await readAll(res);
    } catch (err) {
      throw this.wrapError(err, spec);
    }
  }

  /**
   * Turns a socket-level error into a {@link ConnectionError} naming the host; PodflareErrors, abort
   * reasons and errors from the caller's own upload stream pass through unchanged.
   * @internal
   */
  wrapError(err: unknown, spec: Pick<RequestSpec, 'method' | 'path' | 'signal'>): unknown {
    if (err instanceof PodflareError) return err;
    if (spec.signal?.aborted && err === spec.signal.reason) return err;
    const code = (err as NodeJS.ErrnoException | null)?.code;
    if (typeof code !== 'string' || !NETWORK_ERROR_CODES.has(code)) return err;
    const message = UNREACHABLE_CODES.has(code)
      ? `cannot reach the Podflare server at ${this.host} (${code}; from ${this.#hostSource}): check that ` +
        'it points at the server (PODFLARE_HOST or the host option) and that `podflare serve` is running there'
      : `lost the connection to the Podflare server at ${this.host} during ${spec.method} ${spec.path} ` +
        `(${code}): check that \`podflare serve\` is still running there (from ${this.#hostSource})`;
    return new ConnectionError(message, { code: 'connection_error', status: 0, cause: err });
  }

  /**
   * Opens a WebSocket: sends the upgrade request and resolves with the socket once the server
   * answered 101 (any other answer is thrown as the matching PodflareError). @internal
   */
  upgrade(path: string, query: RequestSpec['query']): Promise<{ socket: Duplex; head: Buffer }> {
    const headers: OutgoingHttpHeaders = {
      'user-agent': this.#userAgent, connection: 'Upgrade', upgrade: 'websocket',
      'sec-websocket-version': '13', 'sec-websocket-key': randomBytes(16).toString('base64'),
    };
    if (this.#apiKey !== undefined) headers.authorization = `Bearer ${this.#apiKey}`;
    const what = `GET ${this.host}${path}`;
    return new Promise((resolve, reject) => {
      const req = this.#transport({ hostname: this.#hostname, port: this.#port, path: this.#pathWithQuery(path, query), method: 'GET', headers });
      req.once('upgrade', (res, socket, head) => {
        if (res.statusCode === 101) return resolve({ socket, head });
        socket.destroy();
        reject(new PodflareError(`${what}: unexpected ${res.statusCode}`, { code: 'invalid_response', status: res.statusCode ?? 0 }));
      });
      req.once('response', (res) => {
        readAll(res, MAX_ERROR_BODY).then(
          (body) => reject(errorFromResponse(res.statusCode ?? 0, body.toString('utf8'), res.headers, what)),
          (err: unknown) => reject(this.wrapError(err, { method: 'GET', path })),
        );
      });
      req.once('error', (err) => reject(this.wrapError(err, { method: 'GET', path })));
      req.end();
    });
  }

  #pathWithQuery(path: string, query: RequestSpec['query']): string {
    let full = this.#basePath + path;
    if (query) {
      const params = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) {
        if (v === undefined || v === false) continue;
        params.append(k, v === true ? '1' : String(v));
      }
      const qs = params.toString();
      if (qs) full += `?${qs}`;
    }
    return full;
  }

  #send(
    spec: RequestSpec,
    path: string,
    headers: OutgoingHttpHeaders,
    payload: Buffer | undefined,
    stream: Readable | undefined,
  ): Promise<[IncomingMessage, ClientRequest]> {
    const { signal } = spec;
    const timeoutMs = spec.timeoutMs ?? this.requestTimeoutMs;
    const scope = spec.timeoutScope ?? 'total';
    return new Promise((resolve, reject) => {
      const req = this.#transport({
        agent: this.#agent,
        hostname: this.#hostname,
        port: this.#port,
        method: spec.method,
        path,
        headers,
      });
      let res: IncomingMessage | undefined;
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      let sourceError: Error | undefined;

      const destroy = (err: Error): void => {
        res?.destroy(err);
        req.destroy(err);
      };
      const disarm = (): void => {
        if (timer !== undefined) clearTimeout(timer);
        timer = undefined;
      };
      const arm = (phase: 'connect' | 'answer'): void => {
        disarm();
        if (timeoutMs > 0) timer = setTimeout(() => destroy(this.#timeoutError(spec, phase, timeoutMs)), timeoutMs);
      };
      const onAbort = (): void => destroy(abortReason(signal as AbortSignal));
      const cleanup = (): void => {
        disarm();
        signal?.removeEventListener('abort', onAbort);
      };
      signal?.addEventListener('abort', onAbort, { once: true });

      if (scope === 'total') {
        arm('answer');
      } else {
        arm('connect');
        let connected = false;
        let sent = false;
        const onConnected = (): void => {
          connected = true;
          if (scope === 'connect') disarm();
          else if (sent && !res) arm('answer');
          else disarm();
        };
        req.once('socket', (socket) => {
          if (socket.connecting) socket.once('connect', onConnected);
          else onConnected();
        });
        if (scope === 'headers') {
          req.once('finish', () => {
            sent = true;
            if (connected && !res) arm('answer');
          });
        }
      }

      req.once('response', (r) => {
        res = r;
        if (scope !== 'total') disarm();
        // The 'total' timer and the abort listener live until the body has been consumed.
        r.once('close', cleanup);
        settled = true;
        resolve([r, req]);
      });
      req.on('error', (err) => {
        // After the answer arrived, errors surface on the answer's stream instead.
        if (settled) return;
        settled = true;
        cleanup();
        if (sourceError !== undefined) reject(new UploadSourceError(sourceError));
        else reject(req.reusedSocket && !res && isStaleSocketError(err) ? new StaleSocketError(err) : err);
      });

      if (stream !== undefined) {
        // pipe() keeps backpressure (the source is read only as fast as the socket drains). Not
        // pipeline(): it would abort() the request and the caller would see "socket hang up"
        // instead of their own stream's error.
        stream.once('error', (err) => {
          sourceError = err;
          req.destroy(err);
        });
        req.once('close', () => {
          // The server answered early (e.g. 404) or the request failed: stop reading the source.
          if (!stream.readableEnded) stream.destroy();
        });
        stream.pipe(req);
      } else {
        req.end(payload);
      }
    });
  }

  #timeoutError(spec: RequestSpec, phase: 'connect' | 'answer', ms: number): TimeoutError {
    const message =
      phase === 'connect'
        ? `could not connect to the Podflare server at ${this.host} within ${ms} ms (from ${this.#hostSource}): ` +
          'check that it points at the server (PODFLARE_HOST or the host option) and that `podflare serve` is running there'
        : `no answer from the Podflare server at ${this.host} within ${ms} ms (${spec.method} ${spec.path}); ` +
          'raise requestTimeoutMs if the call is legitimately slow';
    return new TimeoutError(message, { code: 'timeout', status: 0 });
  }
}

/**
 * The Client used when neither `client`, `host` nor `apiKey` is given. Created on first use (so env
 * vars set before the first call count) and shared afterwards; this lazy slot is the SDK's only
 * module-level state.
 */
let defaultClient: Client | undefined;

/** The shared default {@link Client}, built from `PODFLARE_HOST` / `PODFLARE_API_KEY` on first use. */
export function getDefaultClient(): Client {
  return (defaultClient ??= new Client());
}

/** @internal The Client for a call's connection options. */
export function resolveClient(options: ConnectionOptions = {}): Client {
  if (options.client) return options.client;
  if (options.host !== undefined || options.apiKey !== undefined) {
    const init: ClientOptions = {};
    if (options.host !== undefined) init.host = options.host;
    if (options.apiKey !== undefined) init.apiKey = options.apiKey;
    return new Client(init);
  }
  return getDefaultClient();
}

/** @internal Reads a whole answer body (at most `limit` bytes; the rest is dropped with the socket). */
export async function readAll(res: Readable, limit = Infinity): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of res as AsyncIterable<Buffer>) {
    chunks.push(chunk);
    size += chunk.length;
    if (size >= limit) break; // leaving the loop destroys the stream
  }
  return Buffer.concat(chunks, size);
}

/** @internal The error a request fails with when its signal aborts (like fetch: the signal's reason). */
export function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  return new DOMException(reason === undefined ? 'This operation was aborted' : String(reason), 'AbortError');
}

function isStaleSocketError(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ECONNRESET' || code === 'EPIPE' || code === 'ECONNABORTED';
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value.trim() === '' ? undefined : value.trim();
}

/**
 * The server's address and where it came from: the `host` option, else `PODFLARE_HOST`, else
 * `PODFLARE_HOSTD_URL` (what the hosted product's SDKs read, so their users' settings work
 * unchanged), else the default.
 */
function hostSetting(option: string | undefined): { raw: string; source: string } {
  if (option !== undefined) return { raw: option, source: 'the host option' };
  for (const name of ['PODFLARE_HOST', 'PODFLARE_HOSTD_URL']) {
    const value = nonEmpty(process.env[name]);
    if (value !== undefined) return { raw: value, source: name };
  }
  return { raw: DEFAULT_HOST, source: 'the default host' };
}

function parseHost(raw: string, source: string): URL {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `http://${raw}`;
  let url: URL | undefined;
  try {
    url = new URL(withScheme);
  } catch {
    url = undefined;
  }
  if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:')) {
    throw new BadRequestError(
      `invalid Podflare host ${JSON.stringify(raw)} (from ${source}): ` +
        'expected a URL like http://127.0.0.1:7070',
      { code: 'bad_request', status: 0, field: 'host' },
    );
  }
  return url;
}

/** A Buffer for what can be sent with a Content-Length, else a Readable to pipe. */
function toBody(data: UploadData): Buffer | Readable {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (data instanceof Uint8Array) {
    return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  }
  if (data instanceof Readable) return data;
  if (typeof (data as { getReader?: unknown }).getReader === 'function') {
    return Readable.fromWeb(data as import('node:stream/web').ReadableStream<Uint8Array>);
  }
  if (typeof (data as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === 'function') {
    return Readable.from(data as AsyncIterable<Uint8Array>, { objectMode: false });
  }
  throw new BadRequestError(
    'upload data must be a string, Uint8Array/Buffer, Readable, web ReadableStream or AsyncIterable<Uint8Array>',
    { code: 'bad_request', status: 0, field: 'data' },
  );
}
