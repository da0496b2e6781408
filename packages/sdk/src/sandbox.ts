/**
 * A sandbox on a Podflare server: a persistent Python interpreter (plus bash) in its own filesystem,
 * that can be forked into copies, diffed against them and merged back. Every method is one REST call
 * through the sandbox's {@link Client}.
 */
import type { Readable } from 'node:stream';
import type { ExecEvent, SandboxEvent } from '@podflare/protocol/events';
import { resolveClient } from './client.js';
import type { Client, RequestSpec } from './client.js';
import { NotFoundError, SandboxGoneError } from './errors.js';
import { Execution, ExecutionBuilder, truncatedStreamError } from './execution.js';
import { Files } from './files.js';
import { Commands } from './commands.js';
import { Pty } from './pty.js';
import { parseNdjson } from './ndjson.js';
import { toCheckpointInfo, toSandboxInfo, toSavedTemplate } from './types.js';
import type {
  CheckpointInfo,
  WireCheckpoint,
  ConnectionOptions,
  DiffOptions,
  DiffResult,
  ExecOptions,
  ExecRequest,
  FileOptions,
  Language,
  MergeOptions,
  RunCodeOptions,
  RunCodeRequest,
  SandboxCreateOptions,
  SandboxInfo,
  SandboxListOptions,
  SavedTemplate,
  TemplateInfo,
  UploadData,
  UploadResult,
  WireSandboxInfo,
  WireSavedTemplate,
} from './types.js';

// Node 20 has Symbol.asyncDispose from 20.4 on; older builds get the symbol Node itself uses, so
// `await using sandbox = …` works wherever the runtime supports the syntax.
if (typeof Symbol.asyncDispose !== 'symbol') {
  Object.defineProperty(Symbol, 'asyncDispose', { value: Symbol.for('nodejs.asyncDispose') });
}

/**
 * A sandbox. Make one with {@link Sandbox.create} (or attach to an existing one with
 * {@link Sandbox.connect}), run code with {@link Sandbox.runCode}, destroy it with
 * {@link Sandbox.close} — or let `await using` do it.
 *
 * @example
 * ```ts
 * import { Sandbox } from 'podflare';
 *
 * await using sandbox = await Sandbox.create();
 * await sandbox.runCode('x = 6 * 7');
 * const { stdout } = await sandbox.runCode('print(x)');   // '42\n'
 * ```
 */
export class Sandbox {
  /** The sandbox's id, `sbx_` followed by 32 hex digits. */
  readonly id: string;
  /** The Client this sandbox talks through (shared with its fork children). */
  readonly client: Client;
  /** File operations: list, stat, exists, remove, mkdir, upload, download. */
  readonly files: Files;
  /**
   * Shell commands beside the interpreter: foreground, or background processes (stream output,
   * stdin, kill, reconnect by pid). A fork's children do not get this sandbox's processes.
   */
  readonly commands: Commands;
  /** Interactive terminals (bash on a PTY over a WebSocket). */
  readonly pty: Pty;
  /**
   * How {@link Sandbox.create} got it: from the server's warm pool (`hit`), or started cold and why
   * (`missReason`: `pool_off`, `cold_key`, `refilling` — creates came faster than the pool
   * refills —, `starts_failing`, `empty`, `egress_policy`). Undefined for connected or forked
   * sandboxes. With `PODFLARE_DEBUG` set, a cold create is also written to stderr.
   */
  pool?: { hit: boolean; missReason?: string };
  /** The in-flight or finished DELETE; shared by concurrent close() calls. */
  #closing: Promise<void> | undefined;
  /** Set once this sandbox's id was retired by merging it into its parent: close() has nothing to do. */
  #retired = false;

  /** @internal Use {@link Sandbox.create}, {@link Sandbox.connect} or {@link Sandbox.fork}. */
  protected constructor(id: string, client: Client) {
    this.id = id;
    this.client = client;
    this.files = new Files(client, id);
    this.commands = new Commands(client, id);
    this.pty = new Pty(client, id);
  }

  /**
   * Starts a sandbox (from the server's warm pool when one is ready) and resolves once its
   * interpreter answers.
   *
   * @example
   * ```ts
   * const sandbox = await Sandbox.create({ egress: false, idleTimeoutSeconds: 600, metadata: { user: 'ada' } });
   * ```
   */
  static async create(options: SandboxCreateOptions = {}): Promise<Sandbox> {
    const client = resolveClient(options);
    const body: Record<string, unknown> = {
      template: options.template,
      egress: options.egress,
      persistent: options.persistent,
      idle_timeout_seconds: options.idleTimeoutSeconds,
      max_lifetime_seconds: options.maxLifetimeSeconds,
      runtime: options.runtime,
      limits: options.limits && {
        cpus: options.limits.cpus, memory_mb: options.limits.memoryMb, disk_mb: options.limits.diskMb, processes: options.limits.processes,
      },
      metadata: options.metadata,
      history: options.history,
    };
    for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
    const t0 = performance.now();
    const answer = await client.json<{ id: string; pool?: { hit?: boolean; miss_reason?: string } }>({ method: 'POST', path: '/v1/sandboxes', json: body });
    const sandbox = new Sandbox(answer.id, client);
    if (answer.pool && typeof answer.pool.hit === 'boolean') {
      sandbox.pool = { hit: answer.pool.hit, ...(typeof answer.pool.miss_reason === 'string' ? { missReason: answer.pool.miss_reason } : {}) };
      if (!answer.pool.hit && process.env.PODFLARE_DEBUG) {
        process.stderr.write(`podflare: ${answer.id} missed the warm pool (${answer.pool.miss_reason ?? 'unknown'}): ` +
          `created cold in ${Math.round(performance.now() - t0)} ms\n`);
      }
    }
    return sandbox;
  }

  /**
   * Attaches to an existing sandbox, e.g. one made by another process.
   * @throws {NotFoundError} for an unknown (or merged-away) id.
   * @throws {SandboxGoneError} when the server remembers it but it was destroyed.
   *
   * @example
   * ```ts
   * const sandbox = await Sandbox.connect('sbx_0123456789abcdef0123456789abcdef');
   * ```
   */
  static async connect(id: string, options: ConnectionOptions = {}): Promise<Sandbox> {
    const client = resolveClient(options);
    const info = await getInfo(client, id);
    if (info.state === 'stopped' || info.state === 'error') {
      throw new SandboxGoneError(`sandbox ${id} was destroyed (state: ${info.state})`, {
        code: 'sandbox_gone',
        status: 410,
      });
    }
    if (info.state === 'merged') {
      throw new NotFoundError(`sandbox ${id} was retired by a merge`, { code: 'not_found', status: 404 });
    }
    return new Sandbox(id, client);
  }

  /**
   * Lists the sandboxes the server knows, optionally only the descendants of one or those in a state.
   *
   * @example
   * ```ts
   * const children = await Sandbox.list({ ancestor: parent, state: 'ready' });
   * ```
   */
  static async list(options: SandboxListOptions = {}): Promise<SandboxInfo[]> {
    const client = resolveClient(options);
    const ancestor = typeof options.ancestor === 'string' ? options.ancestor : options.ancestor?.id;
    const answer = await client.json<{ sandboxes: WireSandboxInfo[] }>({
      method: 'GET',
      path: '/v1/sandboxes',
      query: { ancestor, state: options.state, all: options.all === true },
    });
    return answer.sandboxes.map(toSandboxInfo);
  }

  /**
   * What the server knows about this sandbox: state, lineage, timestamps, metadata.
   *
   * @example
   * ```ts
   * const { state, children } = await sandbox.info();
   * ```
   */
  info(): Promise<SandboxInfo> {
    return getInfo(this.client, this.id);
  }

  /**
   * Runs code and resolves once it has finished, with its output, rich results and exit code. A
   * non-zero exit code or an uncaught exception is NOT thrown: check `exitCode` / `error`. HTTP-level
   * failures are thrown (e.g. {@link SandboxGoneError}). Python state persists between calls.
   *
   * @example
   * ```ts
   * const ex = await sandbox.runCode('1/0');
   * ex.exitCode;      // 1
   * ex.error?.name;   // 'ZeroDivisionError'
   * await sandbox.runCode('ls /root', 'bash');
   * await sandbox.runCode('import time; [print(i) or time.sleep(1) for i in range(3)]', {
   *   onStdout: (text) => process.stdout.write(text),
   *   timeoutMs: 10_000,
   * });
   * ```
   */
  runCode(code: string, language?: Language): Promise<Execution>;
  runCode(code: string, options?: RunCodeOptions): Promise<Execution>;
  runCode(request: RunCodeRequest): Promise<Execution>;
  async runCode(codeOrRequest: string | RunCodeRequest, languageOrOptions?: Language | RunCodeOptions): Promise<Execution> {
    const request = normalizeRequest<RunCodeOptions>(codeOrRequest, languageOrOptions);
    const builder = new ExecutionBuilder(request);
    for await (const event of this.#exec(request)) await builder.add(event);
    return builder.finish(this.client.host);
  }

  /**
   * Runs code and yields its events as the server produces them: `stdout`/`stderr` chunks, `result`
   * MIME bundles, an `error` (an uncaught exception: an event, not a throw) and always, last, `exit`
   * with the exit code. Breaking out of the loop early aborts the request (the server then
   * interrupts the code, as for any caller that hangs up).
   *
   * @example
   * ```ts
   * for await (const event of sandbox.runCodeStream('for i in range(3): print(i)')) {
   *   if (event.type === 'stdout') process.stdout.write(event.data);
   *   if (event.type === 'exit') console.log('exit code', event.data);
   * }
   * ```
   */
  runCodeStream(code: string, language?: Language): AsyncGenerator<ExecEvent, void, undefined>;
  runCodeStream(code: string, options?: ExecOptions): AsyncGenerator<ExecEvent, void, undefined>;
  runCodeStream(request: ExecRequest): AsyncGenerator<ExecEvent, void, undefined>;
  runCodeStream(codeOrRequest: string | ExecRequest, languageOrOptions?: Language | ExecOptions): AsyncGenerator<ExecEvent, void, undefined> {
    return this.#exec(normalizeRequest<ExecOptions>(codeOrRequest, languageOrOptions));
  }

  async *#exec(request: ExecRequest): AsyncGenerator<ExecEvent, void, undefined> {
    const body: Record<string, unknown> = { code: request.code };
    if (request.language !== undefined) body.language = request.language;
    if (request.timeoutMs !== undefined) body.timeout_ms = request.timeoutMs;
    if (request.env !== undefined) body.env = request.env;
    if (request.cwd !== undefined) body.cwd = request.cwd;
    if (request.atomic !== undefined) body.atomic = request.atomic;
    const spec: RequestSpec = {
      method: 'POST',
      path: `${this.#path}/exec`,
      json: body,
      signal: request.signal,
      timeoutMs: request.requestTimeoutMs,
      // Without an explicit bound only connecting is timed: a long cell, or one queued behind
      // another on this sandbox, is legitimate.
      timeoutScope: request.requestTimeoutMs === undefined ? 'connect' : 'total',
    };
    const res = await this.client.request(spec);
    let sawExit = false;
    try {
      const events = parseNdjson<ExecEvent>(res);
      while (true) {
        let next: IteratorResult<ExecEvent, void>;
        try {
          next = await events.next();
        } catch (err) {
          throw this.client.wrapError(err, spec);
        }
        if (next.done) break;
        if (next.value.type === 'exit') sawExit = true;
        yield next.value;
      }
    } finally {
      // Left early (break, a throwing callback): drop the connection so the rest is not read.
      if (!res.complete) res.destroy();
    }
    if (!sawExit) throw truncatedStreamError(this.client.host);
  }

  /**
   * Interrupts the running exec (a KeyboardInterrupt; the interpreter is restarted if it does not
   * yield). Resolves to false when nothing was running.
   *
   * @example
   * ```ts
   * const run = sandbox.runCode('import time; time.sleep(60)');
   * await sandbox.interrupt();   // true
   * (await run).error?.name;     // 'KeyboardInterrupt'
   * ```
   */
  async interrupt(): Promise<boolean> {
    const answer = await this.client.json<{ interrupted: boolean }>({ method: 'POST', path: `${this.#path}/interrupt` });
    return answer.interrupted === true;
  }

  /**
   * The sandbox's events (the server keeps the latest 1000): today, what its egress allowlist let
   * through (`egress_allowed`) or stopped (`egress_denied`). Pass `after` (the last `seq` seen) to
   * get only newer ones.
   *
   * @example
   * ```ts
   * const denied = (await sandbox.events()).filter((e) => e.type === 'egress_denied');
   * ```
   */
  async events(options: { after?: number } = {}): Promise<SandboxEvent[]> {
    const answer = await this.client.json<{ events: SandboxEvent[] }>({ method: 'GET', path: `${this.#path}/events`, query: { after: options.after } });
    return answer.events;
  }

  /**
   * Writes a file into the sandbox (parents created); streams are sent as they are read, never held in
   * memory. Same as `sandbox.files.upload`.
   *
   * @example
   * ```ts
   * await sandbox.upload('/root/data.csv', fs.createReadStream('data.csv'));
   * await sandbox.upload('/root/config.json', JSON.stringify(config));
   * ```
   */
  upload(path: string, data: UploadData, options?: FileOptions): Promise<UploadResult> {
    return this.files.upload(path, data, options);
  }

  /**
   * Reads a whole file into a Buffer. Same as `sandbox.files.download`.
   *
   * @example
   * ```ts
   * const png = await sandbox.download('/root/plot.png');
   * ```
   */
  download(path: string, options?: FileOptions): Promise<Buffer> {
    return this.files.download(path, options);
  }

  /**
   * Streams a file out of the sandbox. Same as `sandbox.files.downloadStream`.
   *
   * @example
   * ```ts
   * await pipeline(await sandbox.downloadStream('/root/big.bin'), fs.createWriteStream('big.bin'));
   * ```
   */
  downloadStream(path: string, options?: FileOptions): Promise<Readable> {
    return this.files.downloadStream(path, options);
  }

  /**
   * The address of a port the sandbox listens on, reachable through the Podflare server without
   * the API key: `<server>/v1/ports/<signed token>` (E2B's `getHost` shape: no scheme). Whoever holds
   * it reaches that port only (HTTP and WebSocket) until it expires (default 1 hour) or the server
   * restarts. Requests with the API key can also use `/v1/sandboxes/<id>/ports/<port>/proxy/`.
   *
   * @example
   * ```ts
   * await sandbox.commands.run('python3 -m http.server 8000', { background: true });
   * const res = await fetch(`http://${await sandbox.getHost(8000)}/`);
   * ```
   */
  async getHost(port: number, options: { expiresInSeconds?: number } = {}): Promise<string> {
    return (await this.getPortUrl(port, options)).host;
  }

  /** Like {@link Sandbox.getHost}, with the full URL (`http://…/`) and when it expires. */
  async getPortUrl(port: number, options: { expiresInSeconds?: number } = {}): Promise<{ url: string; host: string; expiresAt: Date }> {
    const json: Record<string, unknown> = {};
    if (options.expiresInSeconds !== undefined) json.expires_in_seconds = options.expiresInSeconds;
    const answer = await this.client.json<{ url: string; host: string; expires_at: number }>({
      method: 'POST', path: `${this.#path}/ports/${encodeURIComponent(String(port))}/url`, json,
    });
    return { url: answer.url, host: answer.host, expiresAt: new Date(answer.expires_at * 1000) };
  }

  /**
   * Forks this sandbox into `n` copies (1–32) of its interpreter memory and filesystem as of now.
   * Children share this sandbox's Client; each must be closed (or merged) on its own.
   *
   * @example
   * ```ts
   * const [a, b] = await sandbox.fork(2);
   * await Promise.all([a.runCode('x = try_plan_a()'), b.runCode('x = try_plan_b()')]);
   * ```
   */
  async fork(n = 1): Promise<Sandbox[]> {
    const answer = await this.client.json<{ children: string[] }>({
      method: 'POST',
      path: `${this.#path}/fork`,
      json: { n },
    });
    return answer.children.map((id) => new Sandbox(id, this.client));
  }

  /**
   * Makes a named template of this sandbox's current files (what it changed over its image) and
   * interpreter state: later `Sandbox.create({ template: name })` calls start with them, from a warm
   * pool of their own (`carries.interpreter` says whether the variables came along: they do until
   * the server restarts; then the files only). Background processes and terminals are not carried.
   * Only the caller's API key sees the template. Namespace runtime only (the VM runtime answers 422).
   * Waits for a running call to finish first.
   *
   * @example
   * ```ts
   * await sandbox.runCode('pip install -q mylib && git clone /srv/repo /root/repo', 'bash');
   * await sandbox.saveTemplate('repo-ready');
   * const next = await Sandbox.create({ template: 'repo-ready' });  // /root/repo is there
   * ```
   */
  async saveTemplate(name: string, options: { description?: string } = {}): Promise<SavedTemplate> {
    const w = await this.client.json<WireSavedTemplate>({ method: 'POST', path: `${this.#path}/template`, json: { name, ...options } });
    return toSavedTemplate(w);
  }

  /** The templates a create may name (yours among those made from sandboxes), with their warm pools. */
  static async listTemplates(options: ConnectionOptions = {}): Promise<TemplateInfo[]> {
    const client = resolveClient(options);
    const answer = await client.json<{ templates: Array<Omit<TemplateInfo, 'sizeBytes'> & { size_bytes: number | null }> }>({ method: 'GET', path: '/v1/templates' });
    return answer.templates.map(({ size_bytes, ...t }) => ({
      name: t.name, kind: t.kind, description: t.description, built: t.built, sizeBytes: size_bytes, runtimes: t.runtimes, pool: t.pool,
    }));
  }

  /**
   * Deletes a template made from a sandbox ({@link Sandbox.saveTemplate}). Refused (409) while
   * sandboxes started from it are live; recipe templates are the operator's (403).
   */
  static async deleteTemplate(name: string, options: ConnectionOptions = {}): Promise<void> {
    await resolveClient(options).empty({ method: 'DELETE', path: `/v1/templates/${encodeURIComponent(name)}` });
  }

  /**
   * Freezes this sandbox to the server's disk (memory and files; VM runtime): it stops costing CPU
   * and memory, and the next call on it — or `resume()` — brings it back as it was, even after a
   * server restart. Sandboxes created with `persistent: true` are frozen when idle instead of
   * being destroyed.
   */
  async freeze(): Promise<void> {
    await this.client.json({ method: 'POST', path: `${this.#path}/freeze` });
  }

  /** Resumes a frozen sandbox now (any other call would too). */
  async resume(): Promise<void> {
    await this.client.json({ method: 'POST', path: `${this.#path}/resume` });
  }

  /**
   * Freezes this sandbox's whole state (interpreter memory, files, cwd, env) copy-on-write, in
   * milliseconds, and returns the checkpoint: {@link Sandbox.restore} brings it back, as often as
   * wanted. Checkpoints count against the sandbox's limits and end with it.
   *
   * @example
   * ```ts
   * const cp = await sandbox.checkpoint('before-cleanup');
   * await sandbox.runCode('import shutil; shutil.rmtree("/root/work")');
   * await sandbox.restore(cp);  // /root/work is back, and every variable as it was
   * ```
   */
  async checkpoint(name?: string): Promise<CheckpointInfo> {
    const w = await this.client.json<WireCheckpoint>({ method: 'POST', path: `${this.#path}/checkpoints`, json: name === undefined ? {} : { name } });
    return toCheckpointInfo(w);
  }

  /** This sandbox's checkpoints (named ones and its history), oldest first. */
  async checkpoints(): Promise<CheckpointInfo[]> {
    const answer = await this.client.json<{ checkpoints: WireCheckpoint[] }>({ method: 'GET', path: `${this.#path}/checkpoints` });
    return answer.checkpoints.map(toCheckpointInfo);
  }

  /** Deletes a checkpoint (its memory and files are freed). */
  async deleteCheckpoint(checkpoint: CheckpointInfo | string): Promise<void> {
    const id = typeof checkpoint === 'string' ? checkpoint : checkpoint.id;
    await this.client.empty({ method: 'DELETE', path: `${this.#path}/checkpoints/${encodeURIComponent(id)}` });
  }

  /**
   * Puts this sandbox (same id) back to a checkpoint's state; the checkpoint stays. Waits for a
   * running call to finish first. Sockets opened since are closed.
   */
  async restore(checkpoint: CheckpointInfo | string): Promise<void> {
    const id = typeof checkpoint === 'string' ? checkpoint : checkpoint.id;
    await this.client.json({ method: 'POST', path: `${this.#path}/checkpoints/${encodeURIComponent(id)}/restore` });
  }

  /**
   * Undoes the last `steps` calls of a sandbox created with `history` (each call is undone once:
   * a second `rewind()` goes one step further back).
   *
   * @example
   * ```ts
   * const sandbox = await Sandbox.create({ history: 10 });
   * await sandbox.runCode('df = load()');
   * await sandbox.runCode('df = df[df.x > 0]  # oops');
   * await sandbox.rewind();  // df is the full frame again
   * ```
   */
  async rewind(steps = 1): Promise<void> {
    await this.client.json({ method: 'POST', path: `${this.#path}/rewind`, json: { steps } });
  }

  /** Files (and with `vars: true`, variables) changed since a checkpoint. */
  async diffCheckpoint(checkpoint: CheckpointInfo | string, options: DiffOptions = {}): Promise<DiffResult> {
    const id = typeof checkpoint === 'string' ? checkpoint : checkpoint.id;
    return this.client.json<DiffResult>({
      method: 'GET',
      path: `${this.#path}/checkpoints/${encodeURIComponent(id)}/diff`,
      query: {
        paths: options.paths && options.paths.length > 0 ? options.paths.join(',') : undefined,
        content: options.content === true,
        vars: options.vars === true,
      },
    });
  }

  /**
   * Compares this sandbox's files (and optionally interpreter variables) with another's. The second
   * argument may be the list of paths to compare, as in the hosted SDK.
   *
   * @example
   * ```ts
   * const { added, modified } = await parent.diff(child, { paths: ['/root'], content: true });
   * ```
   */
  async diff(other: Sandbox | string, pathsOrOptions?: string[] | DiffOptions): Promise<DiffResult> {
    const options: DiffOptions = Array.isArray(pathsOrOptions) ? { paths: pathsOrOptions } : pathsOrOptions ?? {};
    const otherId = typeof other === 'string' ? other : other.id;
    return this.client.json<DiffResult>({
      method: 'GET',
      path: `${this.#path}/diff/${encodeURIComponent(otherId)}`,
      query: {
        paths: options.paths && options.paths.length > 0 ? options.paths.join(',') : undefined,
        content: options.content === true,
        vars: options.vars === true,
      },
    });
  }

  /**
   * Makes this sandbox take over `winner`'s state (typically a fork child that found the answer):
   * this id now drives the winner's interpreter and files, and the winner's id is retired — calling
   * `winner.close()` afterwards does nothing. With `paths`, only those paths are copied, this
   * sandbox's interpreter is kept and the winner stays alive.
   *
   * @example
   * ```ts
   * const children = await sandbox.fork(3);
   * const winner = await pickBest(children);
   * await sandbox.mergeInto(winner);
   * await Promise.all(children.map((c) => c.close()));  // the winner's close is a no-op
   * ```
   */
  async mergeInto(winner: Sandbox | string, options: MergeOptions = {}): Promise<void> {
    const winnerId = typeof winner === 'string' ? winner : winner.id;
    const selective = options.paths !== undefined;
    await this.client.empty({
      method: 'POST',
      path: `${this.#path}/merge_into/${encodeURIComponent(winnerId)}`,
      json: selective ? { paths: options.paths } : undefined,
    });
    if (!selective && typeof winner !== 'string') winner.#retired = true;
  }

  /**
   * Destroys the sandbox. Idempotent: later (or concurrent) calls share the first one's outcome, and
   * it does nothing for a sandbox retired by {@link Sandbox.mergeInto}. A failed attempt (e.g. the
   * server was unreachable) may be retried by calling again.
   *
   * @example
   * ```ts
   * const sandbox = await Sandbox.create();
   * try { await sandbox.runCode('print(1)'); } finally { await sandbox.close(); }
   * ```
   */
  close(): Promise<void> {
    if (this.#retired) return Promise.resolve();
    this.#closing ??= this.client.empty({ method: 'DELETE', path: this.#path }).catch((err: unknown) => {
      // Already gone counts as closed; anything else lets a later call try again.
      if (err instanceof NotFoundError || err instanceof SandboxGoneError) return;
      this.#closing = undefined;
      throw err;
    });
    return this.#closing;
  }

  /** Calls {@link Sandbox.close}, for `await using sandbox = await Sandbox.create()`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  get #path(): string {
    return `/v1/sandboxes/${encodeURIComponent(this.id)}`;
  }
}

async function getInfo(client: Client, id: string): Promise<SandboxInfo> {
  const wire = await client.json<WireSandboxInfo>({ method: 'GET', path: `/v1/sandboxes/${encodeURIComponent(id)}` });
  return toSandboxInfo(wire);
}

/** Folds the call forms `(code)`, `(code, 'bash')`, `(code, { … })` and `({ code, … })` into one request. */
function normalizeRequest<O extends ExecOptions>(
  codeOrRequest: string | (O & { code: string }),
  languageOrOptions: Language | O | undefined,
): O & { code: string } {
  if (typeof codeOrRequest !== 'string') return codeOrRequest;
  if (typeof languageOrOptions === 'string') return { code: codeOrRequest, language: languageOrOptions } as O & { code: string };
  return { ...(languageOrOptions ?? ({} as O)), code: codeOrRequest };
}
