/**
 * Progress of an image build, and a reporter that shows it: on a terminal one line redrawn in
 * place (stage, elapsed seconds, mmdebstrap's current step); elsewhere (CI logs, a server's stderr)
 * plain timestamped lines, one per change.
 */
import type { Writable } from 'node:stream';

export type ImageStage =
  /** Looking for an existing image. */
  | 'check'
  /** Another process holds the build lock; waiting for it. */
  | 'wait'
  /** Running mmdebstrap for the Debian base (tens of seconds to minutes). */
  | 'base'
  /** Copying the agent's Python files into their layer (well under a second). */
  | 'agent'
  /** The microVM guest (kernel, initramfs, ext4 root) from Debian packages (seconds). */
  | 'vm'
  /** A template's layer over the base: apt-get, pip, files, setup script (seconds to minutes). */
  | 'template'
  /** The image is ready. */
  | 'done';

export interface ImageProgress {
  stage: ImageStage;
  /** What is happening, for humans. */
  message: string;
  /** mmdebstrap's latest `I: …` line while the base builds. */
  step?: string;
  /** The package dpkg is working on; shown on terminals only (hundreds per build). */
  detail?: string;
  /** Since ensureImage() was called. */
  elapsedMs: number;
}

export interface ProgressReporter {
  /** Pass as ensureImage's onProgress. */
  onProgress(p: ImageProgress): void;
  /** Pass as ensureImage's log: a line printed above the progress line. */
  log(msg: string): void;
  /** Clears the progress line (terminal) and prints `msg` if given. Stops the redraw timer. */
  finish(msg?: string): void;
}

export interface ProgressReporterOptions {
  /** @default process.stderr */
  stream?: Writable & { isTTY?: boolean; columns?: number };
  /** Force the terminal (redrawn line) or plain (log lines) style. @default stream.isTTY */
  tty?: boolean;
  /** Prefix of plain lines. @default "image" */
  label?: string;
}

const STAGE_LABEL: Record<ImageStage, string> = {
  check: 'checking',
  wait: 'waiting',
  base: 'building base',
  agent: 'agent layer',
  vm: 'vm image',
  template: 'building template',
  done: 'ready',
};

export function createProgressReporter(opts: ProgressReporterOptions = {}): ProgressReporter {
  const stream = opts.stream ?? process.stderr;
  const tty = opts.tty ?? Boolean(stream.isTTY);
  const label = opts.label ?? 'image';
  return tty ? ttyReporter(stream) : plainReporter(stream, label);
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)}s`;
}

function ttyReporter(stream: Writable & { columns?: number }): ProgressReporter {
  let last: ImageProgress | undefined;
  // Elapsed time keeps counting between events (mmdebstrap can be silent for 20 s while dpkg runs).
  let lastAt = 0;
  let drawn = false;
  let timer: NodeJS.Timeout | undefined;

  const draw = () => {
    if (!last) return;
    const elapsed = last.elapsedMs + (Date.now() - lastAt);
    // The step replaces the message here: the message was logged when the stage began, and a
    // terminal line has no room for both.
    let line = `${STAGE_LABEL[last.stage]} [${seconds(elapsed)}] ${last.step ? last.step.replace(/\.\.\.$/, '') : last.message}`;
    if (last.detail) line += ` · ${last.detail}`;
    // columns is 0 or missing on some pseudo-terminals (script, CI runners that fake a TTY).
    const width = Math.max(20, (stream.columns || 100) - 1);
    if (line.length > width) line = line.slice(0, width - 1) + '…';
    stream.write(`\r\x1b[2K${line}`);
    drawn = true;
  };
  const clear = () => {
    if (drawn) stream.write('\r\x1b[2K');
    drawn = false;
  };

  return {
    onProgress(p) {
      last = p;
      lastAt = Date.now();
      if (p.stage === 'done') {
        clear();
        return;
      }
      draw();
      if (!timer) {
        timer = setInterval(draw, 1000);
        timer.unref();
      }
    },
    log(msg) {
      clear();
      stream.write(`${msg}\n`);
      if (last && last.stage !== 'done') draw();
    },
    finish(msg) {
      if (timer) clearInterval(timer);
      timer = undefined;
      clear();
      last = undefined;
      if (msg) stream.write(`${msg}\n`);
    },
  };
}

function plainReporter(stream: Writable, label: string): ProgressReporter {
  let lastKey = '';
  const line = (text: string) => stream.write(`${new Date().toISOString()} ${label}: ${text}\n`);
  return {
    onProgress(p) {
      // One line per change: waiting for a lock reports every poll, which would flood a CI log.
      const key = `${p.stage}\0${p.message}\0${p.step ?? ''}`;
      if (key === lastKey) return;
      lastKey = key;
      line(`${STAGE_LABEL[p.stage]} [${seconds(p.elapsedMs)}] ${p.message}${p.step ? ` — ${p.step}` : ''}`);
    },
    log(msg) {
      line(msg);
    },
    finish(msg) {
      if (msg) line(msg);
    },
  };
}
