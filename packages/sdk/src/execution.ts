/**
 * The outcome of a `runCode` call, built from the exec's NDJSON events as they arrive. A non-zero
 * exit code and an uncaught exception are data here (`exitCode`, `error`), never thrown.
 */
import type { ExecErrorInfo, ExecEvent, MimeBundle } from '@podflare/protocol/events';
import { ConnectionError } from './errors.js';
import type { RunCodeOptions } from './types.js';

/**
 * One rich output of an exec: a MIME bundle (`text/plain` always, plus whatever representations the
 * object has). The getters are shortcuts into {@link Result.data}.
 */
export class Result {
  /** The raw MIME bundle, keyed by MIME type. */
  readonly data: MimeBundle;
  /** True for the value of the cell's last expression; false for figures and `display()` calls. */
  readonly isMainResult: boolean;

  constructor(data: MimeBundle, isMainResult: boolean) {
    this.data = data;
    this.isMainResult = isMainResult;
  }

  /** `text/plain`: the object's repr. */
  get text(): string | undefined {
    return this.#string('text/plain');
  }
  /** `text/html`. */
  get html(): string | undefined {
    return this.#string('text/html');
  }
  /** `image/png`, base64 encoded. */
  get png(): string | undefined {
    return this.#string('image/png');
  }
  /** `image/jpeg`, base64 encoded. */
  get jpeg(): string | undefined {
    return this.#string('image/jpeg');
  }
  /** `image/svg+xml`. */
  get svg(): string | undefined {
    return this.#string('image/svg+xml');
  }
  /** `application/json`: the JSON value itself (already parsed). */
  get json(): unknown {
    return this.data['application/json'];
  }
  /** `text/markdown`. */
  get markdown(): string | undefined {
    return this.#string('text/markdown');
  }
  /** `text/latex`. */
  get latex(): string | undefined {
    return this.#string('text/latex');
  }

  /** The MIME types present besides `text/plain`, e.g. `['image/png']` for a figure. */
  formats(): string[] {
    return Object.keys(this.data).filter((k) => k !== 'text/plain');
  }

  #string(mime: string): string | undefined {
    const v = this.data[mime];
    return typeof v === 'string' ? v : undefined;
  }
}

/** The output chunks of an exec, in arrival order. */
export interface Logs {
  stdout: string[];
  stderr: string[];
}

/**
 * What `runCode` resolves to.
 *
 * @example
 * ```ts
 * const ex = await sandbox.runCode('import math; print(math.pi); 6*7');
 * ex.stdout;        // '3.141592653589793\n'
 * ex.text;          // '42' (the main result)
 * ex.exitCode;      // 0
 * ```
 */
export class Execution {
  /** Everything the code wrote to stdout (file-descriptor level: child processes included). */
  readonly stdout: string;
  /** Everything the code wrote to stderr. */
  readonly stderr: string;
  /** 0 on success, 1 on an uncaught exception, n for `SystemExit(n)`, 124 when `timeoutMs` was hit. */
  readonly exitCode: number;
  /** Rich outputs in order: figures, `display()` calls and the last expression's value. */
  readonly results: Result[];
  /** The uncaught exception, if any (it is not thrown). */
  readonly error?: ExecErrorInfo;
  /** The interpreter's execution counter after this call (python), else null. */
  readonly executionCount: number | null;
  /** True when the interpreter had to be restarted (timeout or crash): earlier variables are gone. */
  readonly stateLost: boolean;
  /** True when an atomic call failed and everything it did was undone. */
  readonly rolledBack: boolean;
  /** stdout and stderr as the chunks they arrived in. */
  readonly logs: Logs;

  constructor(init: {
    logs: Logs;
    exitCode: number;
    results: Result[];
    error?: ExecErrorInfo | undefined;
    executionCount: number | null;
    stateLost: boolean;
    rolledBack?: boolean;
  }) {
    this.logs = init.logs;
    this.stdout = init.logs.stdout.join('');
    this.stderr = init.logs.stderr.join('');
    this.exitCode = init.exitCode;
    this.results = init.results;
    if (init.error !== undefined) this.error = init.error;
    this.executionCount = init.executionCount;
    this.stateLost = init.stateLost;
    this.rolledBack = init.rolledBack === true;
  }

  /** The main result's `text/plain` (the value of the cell's last expression), if there is one. */
  get text(): string | undefined {
    return this.results.find((r) => r.isMainResult)?.text;
  }
}

type Callbacks = Pick<RunCodeOptions, 'onStdout' | 'onStderr' | 'onResult' | 'onError'>;

/**
 * Folds exec events into an {@link Execution}, calling the user's callbacks on the way. Unknown event
 * types (from a newer server) are ignored.
 */
export class ExecutionBuilder {
  readonly #callbacks: Callbacks;
  readonly #logs: Logs = { stdout: [], stderr: [] };
  readonly #results: Result[] = [];
  #error: ExecErrorInfo | undefined;
  #exit: Extract<ExecEvent, { type: 'exit' }> | undefined;

  constructor(callbacks: Callbacks = {}) {
    this.#callbacks = callbacks;
  }

  /** Adds one event; resolves once its callback (if any) has finished. */
  async add(event: ExecEvent): Promise<void> {
    const cb = this.#callbacks;
    switch (event.type) {
      case 'stdout':
        this.#logs.stdout.push(event.data);
        if (cb.onStdout) await cb.onStdout(event.data);
        break;
      case 'stderr':
        this.#logs.stderr.push(event.data);
        if (cb.onStderr) await cb.onStderr(event.data);
        break;
      case 'result': {
        const result = new Result(event.data, event.is_main_result === true);
        this.#results.push(result);
        if (cb.onResult) await cb.onResult(result);
        break;
      }
      case 'error':
        this.#error = event.data;
        if (cb.onError) await cb.onError(event.data);
        break;
      case 'exit':
        this.#exit = event;
        break;
    }
  }

  /** True once the `exit` event (always the last) has been seen. */
  get done(): boolean {
    return this.#exit !== undefined;
  }

  /** The finished execution; fails with a {@link ConnectionError} if the stream ended before `exit`. */
  finish(host: string): Execution {
    const exit = this.#exit;
    if (!exit) throw truncatedStreamError(host);
    return new Execution({
      logs: this.#logs,
      exitCode: exit.data,
      results: this.#results,
      error: this.#error,
      executionCount: exit.execution_count ?? null,
      stateLost: exit.state_lost === true,
      rolledBack: exit.rolled_back === true,
    });
  }
}

/** The error for an exec stream that ended without its `exit` event (the server or the connection died). */
export function truncatedStreamError(host: string): ConnectionError {
  return new ConnectionError(
    `the exec stream from the Podflare server at ${host} ended before its exit event ` +
      '(the connection dropped or the server stopped); the code may or may not have finished',
    { code: 'connection_error', status: 0 },
  );
}
