/**
 * Runs a build command (mmdebstrap for the base image, a template's chroot script) with its output
 * handed over line by line, for the build log, the progress steps and the failure's tail.
 */
import { spawn } from 'node:child_process';

export interface RunLoggedOptions {
  env: NodeJS.ProcessEnv;
  /** Each line of stdout and stderr (split at \n, \r\n or \r: progress bars redraw with \r). */
  onLine: (line: string) => void;
  /** Aborting kills the command with `killSignal`. */
  signal?: AbortSignal;
  killSignal: NodeJS.Signals;
  /** What a failure to start it becomes (ENOENT: say what to install). */
  onSpawnError?: (err: NodeJS.ErrnoException) => Error;
}

/** The command's exit code (128 when a signal ended it), once its output has ended. */
export function runLogged(cmd: string, args: string[], opts: RunLoggedOptions): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env });
    const onAbort = () => child.kill(opts.killSignal);
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    for (const stream of [child.stdout, child.stderr]) {
      let buf = '';
      stream.setEncoding('utf8');
      stream.on('data', (chunk: string) => {
        buf += chunk;
        const lines = buf.split(/\r?\n|\r/);
        buf = lines.pop() ?? '';
        lines.forEach(opts.onLine);
      });
      stream.on('end', () => buf && opts.onLine(buf));
    }
    child.on('error', (err) => {
      opts.signal?.removeEventListener('abort', onAbort);
      reject(opts.onSpawnError?.(err) ?? err);
    });
    child.on('close', (c, sig) => {
      opts.signal?.removeEventListener('abort', onAbort);
      resolve(c ?? (sig ? 128 : 1));
    });
  });
}
