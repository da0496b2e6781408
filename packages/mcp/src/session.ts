/**
 * The sandboxes one MCP session works with: its own sandbox (created on first use, so tools may leave
 * `sandbox_id` out), the ones it created with `create_sandbox` or `fork`, and handles to sandboxes it
 * was given by id. When the session ends, everything it created is destroyed; sandboxes it only
 * attached to by id are left alone (someone else owns them).
 */
import { isEndedState } from '@podflare/protocol/sandbox';
import { NotFoundError, Sandbox, SandboxGoneError } from 'podflare';
import type { Client, EgressSetting } from 'podflare';

/** A tool call on a session that has ended (the transport closed while the call was queued). */
export class SessionClosedError extends Error {
  override name = 'SessionClosedError';
}

/** A tool call that left `sandbox_id` out on a server made with `sessionSandbox: false`. */
export class MissingSandboxIdError extends Error {
  override name = 'MissingSandboxIdError';
}

export interface SandboxSessionOptions {
  client: Client;
  /** Whether calls without `sandbox_id` use a sandbox of the session's own. */
  sessionSandbox: boolean;
  /**
   * Leave the sandboxes this session creates alive when it ends (a stateless request: later
   * requests reach them by id; the server's idle timeout reaps forgotten ones).
   */
  keepSandboxes?: boolean;
  /** Idle timeout of the sandboxes this session creates (undefined: the server's default). */
  idleTimeoutSeconds: number | undefined;
  log: (message: string) => void;
}

/** The outcome of {@link SandboxSession.withSandbox}: the operation's value, and a note for the user if any. */
export interface WithSandbox<T> {
  value: T;
  /** Set when the session's own sandbox had been destroyed and a new one was started for this call. */
  note?: string;
}

export class SandboxSession {
  readonly #options: SandboxSessionOptions;
  /** Handles by id, so repeated calls skip `Sandbox.connect`'s lookup. */
  readonly #handles = new Map<string, Sandbox>();
  /** The sandboxes this session created (besides its own), destroyed when it ends. */
  readonly #owned = new Map<string, Sandbox>();
  /** The session's own sandbox, being created or made. Reset when creation failed or it was found gone. */
  #own: Promise<Sandbox> | undefined;
  #ownId: string | undefined;
  #closing: Promise<void> | undefined;

  constructor(options: SandboxSessionOptions) {
    this.#options = options;
  }

  get client(): Client {
    return this.#options.client;
  }

  /** The id of the session's own sandbox, once it exists. */
  get ownSandboxId(): string | undefined {
    return this.#ownId;
  }

  /** True once {@link dispose} was called. */
  get closed(): boolean {
    return this.#closing !== undefined;
  }

  /**
   * Runs `op` on the addressed sandbox: `id`, or the session's own when `id` is undefined. If the
   * session's own sandbox turns out to be gone (idle timeout, destroyed or retired by another client),
   * a new one is started and `op` is tried once more on it, with a note saying earlier state is lost.
   */
  async withSandbox<T>(id: string | undefined, op: (sandbox: Sandbox) => Promise<T>): Promise<WithSandbox<T>> {
    if (id !== undefined) {
      // A cached handle to a sandbox destroyed since fails on use with the server's 404/410, which
      // is the right answer; no need to look the id up again on every call.
      return { value: await op(await this.attach(id)) };
    }
    const own = await this.#ownSandbox();
    try {
      return { value: await op(own) };
    } catch (err) {
      // A 404/410 may be about a file rather than the sandbox: only a failing lookup of the sandbox
      // itself means it is gone.
      if (!isGone(err) || (await isAlive(own))) throw err;
      this.#forgetOwn(own.id);
      const fresh = await this.#ownSandbox();
      const note =
        `this session's sandbox ${own.id} had been destroyed (idle timeout, or destroyed elsewhere), so a ` +
        `new one (${fresh.id}) was started for this call: earlier variables and files are gone.`;
      this.#options.log(note);
      return { value: await op(fresh), note };
    }
  }

  /** A handle to an existing sandbox, looked up once per session. */
  async attach(id: string): Promise<Sandbox> {
    this.#assertOpen();
    const cached = this.#handles.get(id);
    if (cached) return cached;
    const sandbox = await Sandbox.connect(id, { client: this.client });
    this.#handles.set(id, sandbox);
    return sandbox;
  }

  /** Creates a sandbox that this session owns (destroyed when it ends). */
  async create(options: { template?: string | undefined; egress?: EgressSetting | undefined }): Promise<Sandbox> {
    this.#assertOpen();
    const sandbox = await Sandbox.create({
      client: this.client,
      template: options.template,
      egress: options.egress,
      idleTimeoutSeconds: this.#options.idleTimeoutSeconds,
      metadata: { created_by: 'podflare-mcp' },
    });
    return this.#adopt(sandbox);
  }

  /** Records fork children as owned by this session. */
  adoptAll(sandboxes: Sandbox[]): void {
    let closed: unknown;
    for (const s of sandboxes) {
      try {
        this.#adopt(s);
      } catch (err) {
        closed = err;
      }
    }
    if (closed !== undefined) throw closed;
  }

  /**
   * Bookkeeping after a whole-state merge: the winner's id is retired (the parent's id now drives
   * its state), so the session neither keeps a handle to it nor tries to destroy it.
   */
  retire(id: string): void {
    this.#handles.delete(id);
    this.#owned.delete(id);
    if (this.#ownId === id) this.#forgetOwn(id);
  }

  /**
   * Destroys a sandbox. Resolves to false when it was already destroyed; throws NotFoundError for an
   * id the server does not know.
   */
  async destroy(id: string): Promise<boolean> {
    let sandbox: Sandbox;
    try {
      sandbox = this.#handles.get(id) ?? (await Sandbox.connect(id, { client: this.client }));
    } catch (err) {
      if (err instanceof SandboxGoneError) {
        this.retire(id);
        return false;
      }
      throw err;
    }
    await sandbox.close();
    this.retire(id);
    return true;
  }

  /**
   * Ends the session: destroys its own sandbox and every sandbox it created, and refuses further
   * calls. Idempotent; failures are logged, not thrown (the session is over either way).
   */
  dispose(): Promise<void> {
    this.#closing ??= this.#destroyAll();
    return this.#closing;
  }

  async #destroyAll(): Promise<void> {
    if (this.#options.keepSandboxes) {
      this.#handles.clear();
      this.#owned.clear();
      return;
    }
    const doomed = new Map(this.#owned);
    if (this.#own) {
      try {
        const own = await this.#own;
        doomed.set(own.id, own);
      } catch {
        // Its creation failed: nothing to destroy.
      }
    }
    this.#handles.clear();
    this.#owned.clear();
    if (doomed.size === 0) return;
    const sandboxes = [...doomed.values()];
    // close() treats an already destroyed sandbox as closed, and is a no-op for one retired by a merge.
    const results = await Promise.allSettled(sandboxes.map((s) => s.close()));
    const failed = results.flatMap((r, i) =>
      r.status === 'rejected' ? [`${sandboxes[i]!.id}: ${r.reason instanceof Error ? r.reason.message : String(r.reason)}`] : [],
    );
    if (failed.length > 0) this.#options.log(`could not destroy ${failed.length} sandbox(es) at session end: ${failed.join('; ')}`);
    else this.#options.log(`session ended: destroyed ${[...doomed.keys()].join(', ')}`);
  }

  #ownSandbox(): Promise<Sandbox> {
    this.#assertOpen();
    if (!this.#options.sessionSandbox) {
      return Promise.reject(
        new MissingSandboxIdError('sandbox_id is required on this server: make a sandbox with create_sandbox and pass its id'),
      );
    }
    if (!this.#own) {
      const creating = Sandbox.create({
        client: this.client,
        idleTimeoutSeconds: this.#options.idleTimeoutSeconds,
        metadata: { created_by: 'podflare-mcp', role: 'session' },
      });
      this.#own = creating;
      creating.then(
        (sandbox) => {
          this.#ownId = sandbox.id;
          this.#handles.set(sandbox.id, sandbox);
          this.#options.log(`session sandbox ${sandbox.id} created`);
        },
        () => {
          // Let the next call try again rather than repeat this failure forever.
          if (this.#own === creating) this.#own = undefined;
        },
      );
    }
    return this.#own;
  }

  #forgetOwn(id: string): void {
    if (this.#ownId !== id) return;
    this.#own = undefined;
    this.#ownId = undefined;
    this.#handles.delete(id);
  }

  #adopt(sandbox: Sandbox): Sandbox {
    if (this.#closing) {
      // Made by a call that was still running when the session ended: it would outlive the session.
      sandbox.close().catch((err: unknown) => this.#options.log(`could not destroy ${sandbox.id}: ${String(err)}`));
      throw new SessionClosedError('this MCP session ended while the sandbox was being made; it was destroyed');
    }
    this.#handles.set(sandbox.id, sandbox);
    this.#owned.set(sandbox.id, sandbox);
    return sandbox;
  }

  #assertOpen(): void {
    if (this.#closing) throw new SessionClosedError('this MCP session has ended: its sandboxes were destroyed');
  }
}

/** The sandbox is unknown (never existed, or retired by a merge) or was destroyed. */
export function isGone(err: unknown): boolean {
  return err instanceof NotFoundError || err instanceof SandboxGoneError;
}

async function isAlive(sandbox: Sandbox): Promise<boolean> {
  try {
    const { state } = await sandbox.info();
    return !isEndedState(state);
  } catch (err) {
    if (isGone(err)) return false;
    throw err;
  }
}
