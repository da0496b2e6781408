/**
 * What a model is shown of an execution, shared by the framework adapters: one text (stdout, stderr,
 * the rich results' text, the exception) plus the images the code produced. Kept free of any
 * framework import so every adapter can use it without pulling in another's peer dependency.
 */
import type { ExecErrorInfo, MimeBundle } from '@podflare/protocol/events';
import { TIMEOUT_EXIT_CODE } from '@podflare/protocol/events';

/**
 * The parts of an execution the formatter reads. Both an {@link Execution} and its plain JSON copy
 * (what the AI SDK tool returns) have this shape.
 */
export interface ExecutionSnapshot {
  stdout: string;
  stderr: string;
  exitCode: number;
  results: ReadonlyArray<{ readonly data: MimeBundle; readonly isMainResult: boolean }>;
  error?: ExecErrorInfo | null | undefined;
  executionCount: number | null;
  stateLost: boolean;
  /** An atomic call that failed and was undone (its output is still shown). */
  rolledBack?: boolean;
}

/** An image an execution produced (a matplotlib figure, `display(Image(...))`), base64 encoded. */
export interface ExecutionImage {
  mediaType: 'image/png' | 'image/jpeg';
  data: string;
}

/** How much of an execution's text a model is shown. */
export interface FormatOptions {
  /**
   * The text is cut in the middle past this many characters (the head and the tail are kept, with a
   * note saying how much was left out), so one chatty cell cannot fill the model's context.
   * `Infinity` keeps everything.
   * @default 20000
   */
  maxOutputChars?: number;
  /**
   * Return the images the code produced apart, for the model to see (`true`), or only mention them
   * in the text (`false`, for models or providers that take no images in tool results).
   * @default true
   */
  images?: boolean;
}

/** The default of {@link FormatOptions.maxOutputChars}. */
export const DEFAULT_MAX_OUTPUT_CHARS = 20_000;

/** Shown instead of an empty text: the Messages API rejects empty text blocks, and models read it better. */
export const NO_OUTPUT = '(no output)';

const IMAGE_TYPES = ['image/png', 'image/jpeg'] as const;

/**
 * Formats an execution for a model: stdout, then stderr, then each rich result (`Out[n]: …` for the
 * cell's value, a placeholder for each image, which is returned apart), then the exception when
 * stderr does not already hold its traceback, then notes on a timeout, a restarted interpreter or a
 * bare non-zero exit code.
 */
export function formatExecution(ex: ExecutionSnapshot, options: FormatOptions = {}): { text: string; images: ExecutionImage[] } {
  const parts: string[] = [];
  const images: ExecutionImage[] = [];
  if (ex.stdout !== '') parts.push(ex.stdout);
  if (ex.stderr !== '') parts.push(ex.stderr);
  for (const result of ex.results) {
    const plain = typeof result.data['text/plain'] === 'string' ? result.data['text/plain'] : undefined;
    const image = IMAGE_TYPES.find((t) => typeof result.data[t] === 'string');
    if (image !== undefined && options.images !== false) {
      images.push({ mediaType: image, data: result.data[image] as string });
      parts.push(`[${image} image #${images.length} attached${plain ? `: ${plain}` : ''}]`);
    } else if (image !== undefined) {
      parts.push(`[${image} image, not shown${plain ? `: ${plain}` : ''}]`);
    } else if (result.isMainResult) {
      if (plain !== undefined) parts.push(`${ex.executionCount === null ? 'Out' : `Out[${ex.executionCount}]`}: ${plain}`);
    } else if (plain !== undefined) {
      parts.push(plain);
    } else {
      // A bundle without text/plain (rare: an SVG-only display): say it exists rather than drop it.
      parts.push(`[display output of type ${Object.keys(result.data).join(', ')}]`);
    }
  }
  if (ex.error && !ex.stderr.includes(ex.error.traceback.trim() || '\0')) {
    parts.push(ex.error.traceback.trim() !== '' ? ex.error.traceback : `${ex.error.name}: ${ex.error.value}`);
  }
  if (ex.stateLost) parts.push('[The interpreter was restarted: variables and imports from earlier calls are gone.]');
  if (ex.rolledBack) parts.push('[Rolled back: everything this call did (variables, files) was undone; the sandbox is as it was before it.]');
  if (ex.exitCode === TIMEOUT_EXIT_CODE) parts.push(`[Timed out: the code was interrupted (exit code ${TIMEOUT_EXIT_CODE}).]`);
  else if (ex.exitCode !== 0 && !ex.error) parts.push(`[exit code ${ex.exitCode}]`);
  const text = parts.map((p) => p.replace(/\n+$/, '')).join('\n');
  return { text: truncateMiddle(text === '' ? NO_OUTPUT : text, options.maxOutputChars ?? DEFAULT_MAX_OUTPUT_CHARS), images };
}

/**
 * Keeps the first and last parts of a text longer than `max` characters, with a note in between
 * saying how many were left out. The tail matters as much as the head: it holds the traceback.
 */
export function truncateMiddle(text: string, max: number): string {
  if (!(text.length > max)) return text; // NaN and Infinity keep everything
  const head = Math.floor(Math.max(0, max) * 0.6);
  const tail = Math.max(0, max) - head;
  const omitted = text.length - head - tail;
  return `${text.slice(0, head)}\n[… ${omitted} characters omitted …]\n${text.slice(text.length - tail)}`;
}
