/**
 * A sandbox's filesystem: uploads and downloads as streamed raw bodies (no base64, no size cap beyond
 * the sandbox's disk), plus listing, stat, remove and mkdir. Paths are absolute inside the sandbox;
 * relative ones are taken from `/root` by the server.
 */
import type { Readable } from 'node:stream';
import type { Client } from './client.js';
import { readAll } from './client.js';
import { BadRequestError, NotFoundError } from './errors.js';
import type { FileOptions, FileStat, RemoveOptions, UploadData, UploadResult } from './types.js';

/**
 * File operations on one sandbox, reached as `sandbox.files`.
 *
 * @example
 * ```ts
 * await sandbox.files.mkdir('/root/data');
 * await sandbox.upload('/root/data/in.csv', fs.createReadStream('in.csv'));
 * for (const entry of await sandbox.files.list('/root/data')) console.log(entry.name, entry.size);
 * ```
 */
export class Files {
  readonly #client: Client;
  readonly #base: string;

  /** @internal Made by {@link Sandbox}; use `sandbox.files`. */
  constructor(client: Client, sandboxId: string) {
    this.#client = client;
    this.#base = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/files`;
  }

  /**
   * Writes a file, creating parent directories; the file appears atomically once the upload is
   * complete. Streams and async iterables are sent chunk by chunk as they are read, never held whole.
   *
   * @example
   * ```ts
   * await sandbox.files.upload('/root/hello.txt', 'hello\n');
   * await sandbox.files.upload('/root/big.bin', fs.createReadStream('big.bin'));
   * ```
   *
   * The path comes first. Code written as `upload(data, path)` (an order some of the hosted
   * product's docs show) works too when the data is not a string: the path is the one string.
   */
  async upload(path: string, data: UploadData, options: FileOptions = {}): Promise<UploadResult> {
    [path, data] = uploadArguments(path, data);
    const answer = await this.#client.json<{ path: string; size: number }>({
      method: 'PUT',
      path: this.#base,
      query: { path },
      body: data,
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
      timeoutScope: 'headers',
    });
    return { path: answer.path, size: answer.size };
  }

  /**
   * Reads a whole file into a Buffer. For big files prefer {@link Files.downloadStream}.
   *
   * @example
   * ```ts
   * const csv = (await sandbox.files.download('/root/out.csv')).toString('utf8');
   * ```
   */
  async download(path: string, options: FileOptions = {}): Promise<Buffer> {
    const spec = this.#downloadSpec(path, options);
    const res = await this.#client.request(spec);
    try {
      return await readAll(res);
    } catch (err) {
      throw this.#client.wrapError(err, spec);
    }
  }

  /**
   * Streams a file: resolves once the server has answered (so a missing file rejects here, with a
   * {@link NotFoundError}), then yields its bytes as they arrive. Read it to the end or destroy it.
   *
   * @example
   * ```ts
   * const stream = await sandbox.files.downloadStream('/root/big.bin');
   * await pipeline(stream, fs.createWriteStream('big.bin'));
   * ```
   */
  async downloadStream(path: string, options: FileOptions = {}): Promise<Readable> {
    return this.#client.request(this.#downloadSpec(path, options));
  }

  /**
   * Unpacks a tar stream (uncompressed) into the directory `path`, creating it. The archive is
   * streamed, never held whole; `tar` runs inside the sandbox.
   *
   * @example
   * ```ts
   * await sandbox.files.uploadTar('/root/project', fs.createReadStream('project.tar'));
   * ```
   */
  async uploadTar(path: string, data: UploadData, options: FileOptions = {}): Promise<void> {
    await this.#client.json({ method: 'PUT', path: `${this.#base}/tar`, query: { path }, body: data, signal: options.signal,
      timeoutMs: options.requestTimeoutMs, timeoutScope: 'headers' });
  }

  /**
   * The directory `path` as an uncompressed tar stream (its contents, relative to it).
   *
   * @example
   * ```ts
   * (await sandbox.files.downloadTar('/root/project')).pipe(fs.createWriteStream('project.tar'));
   * ```
   */
  async downloadTar(path: string, options: FileOptions = {}): Promise<Readable> {
    return this.#client.request({ method: 'GET', path: `${this.#base}/tar`, query: { path }, signal: options.signal,
      timeoutMs: options.requestTimeoutMs, timeoutScope: 'headers' });
  }

  /**
   * Lists a directory.
   *
   * @example
   * ```ts
   * const names = (await sandbox.files.list('/root')).map((e) => e.name);
   * ```
   */
  async list(path = '/root', options: FileOptions = {}): Promise<FileStat[]> {
    const answer = await this.#client.json<{ entries: FileStat[] }>({
      method: 'GET',
      path: `${this.#base}/list`,
      query: { path },
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
    });
    return answer.entries;
  }

  /**
   * Describes one path.
   * @throws {NotFoundError} when it does not exist (see {@link Files.exists}).
   *
   * @example
   * ```ts
   * const { size, type } = await sandbox.files.stat('/root/out.csv');
   * ```
   */
  async stat(path: string, options: FileOptions = {}): Promise<FileStat> {
    const answer = await this.#client.json<{ stat: FileStat }>({
      method: 'GET',
      path: `${this.#base}/stat`,
      query: { path },
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
    });
    return answer.stat;
  }

  /**
   * Whether a path exists (a file, a directory or anything else).
   *
   * @example
   * ```ts
   * if (!(await sandbox.files.exists('/root/model.pt'))) await sandbox.upload('/root/model.pt', weights);
   * ```
   */
  async exists(path: string, options: FileOptions = {}): Promise<boolean> {
    try {
      await this.stat(path, options);
      return true;
    } catch (err) {
      if (err instanceof NotFoundError) return false;
      throw err;
    }
  }

  /**
   * Removes a file, or a directory with `{ recursive: true }`.
   *
   * @example
   * ```ts
   * await sandbox.files.remove('/root/tmp', { recursive: true });
   * ```
   */
  async remove(path: string, options: RemoveOptions = {}): Promise<void> {
    await this.#client.empty({
      method: 'DELETE',
      path: this.#base,
      query: { path, recursive: options.recursive === true },
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
    });
  }

  /**
   * Creates a directory and its missing parents; resolves to its absolute path.
   *
   * @example
   * ```ts
   * await sandbox.files.mkdir('/root/a/b');
   * ```
   */
  async mkdir(path: string, options: FileOptions = {}): Promise<string> {
    const answer = await this.#client.json<{ path: string }>({
      method: 'POST',
      path: `${this.#base}/mkdir`,
      query: { path },
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
    });
    return answer.path;
  }

  #downloadSpec(path: string, options: FileOptions) {
    return {
      method: 'GET' as const,
      path: this.#base,
      query: { path },
      signal: options.signal,
      timeoutMs: options.requestTimeoutMs,
      timeoutScope: 'headers' as const,
    };
  }
}

/**
 * `upload(path, data)`, or `upload(data, path)` where the data is bytes or a stream: told apart by
 * type, never guessed from contents. Two strings are path first. Anything else is refused, never
 * written under a name made from the data.
 */
function uploadArguments(path: unknown, data: unknown): [string, UploadData] {
  if (typeof path === 'string') return [path, data as UploadData];
  if (typeof data === 'string' && path !== null && path !== undefined) return [data, path as UploadData];
  throw new BadRequestError(
    `upload(path, data) needs the sandbox path as a string; got ${describe(path)} and ${describe(data)}`,
    { code: 'bad_request', status: 0, field: 'path' },
  );
}

function describe(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  if (typeof value === 'object') return value.constructor?.name ?? 'an object';
  return typeof value;
}
