/** Image build progress for the CLI: the server's reporter, optionally silent when nothing happens. */
import { createProgressReporter, type ImageProgress } from '@podflare/server';

export interface CliImageProgress {
  onProgress(p: ImageProgress): void;
  log(msg: string): void;
  finish(msg?: string): void;
  /** True once something was built or waited for (not just found current). */
  readonly worked: boolean;
}

/**
 * With `quiet`, the "checking"/"ready" lines of an image that is already current are dropped, so a
 * setup script or the demo prints nothing about the image unless it builds (or waits for) one.
 */
export function imageProgress(opts: { quiet?: boolean } = {}): CliImageProgress {
  const reporter = createProgressReporter();
  let worked = false;
  return {
    onProgress(p) {
      if (p.stage !== 'check' && p.stage !== 'done') worked = true;
      if (!opts.quiet || worked) reporter.onProgress(p);
    },
    log: (msg) => {
      worked = true;
      reporter.log(msg);
    },
    finish: (msg) => reporter.finish(msg),
    get worked() {
      return worked;
    },
  };
}
