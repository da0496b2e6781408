/**
 * Splits a byte stream into lines, holding at most `maxLineBytes` of an unfinished line: a peer
 * that never ends its line (or sends an enormous one) gets an error, not the server's memory.
 *
 * Works on bytes, not text: a newline byte never occurs inside a multi-byte UTF-8 sequence, so a
 * character split across two reads is whole again once its line is complete, and each line is
 * decoded once. Each chunk is scanned once, so a long line arriving in many reads costs linear time.
 */

/** A line (finished or not) went over the cap; the framer has dropped what it held of it. */
export class LineTooLongError extends Error {
  override name = 'LineTooLongError';
  constructor(readonly maxLineBytes: number) {
    super(`a line is longer than ${maxLineBytes} bytes`);
  }
}

/**
 * Sees one complete line (UTF-8 decoded, without its newline). Returning `false` stops the
 * framing of the current chunk (its consumer is full): `push` then returns what is left of it.
 */
export type LineSink = (line: string) => boolean | void;

export class LineFramer {
  private parts: Buffer[] = [];
  private size = 0;

  constructor(readonly maxLineBytes: number) {}

  /**
   * Frames `chunk`, handing each line it completes to `onLine` in order. Returns the unframed rest
   * of the chunk when `onLine` asked to stop (push it again later), else null. Throws
   * LineTooLongError as soon as a line is over the cap, before holding more of it.
   */
  push(chunk: Buffer, onLine: LineSink): Buffer | null {
    let start = 0;
    let nl: number;
    while ((nl = chunk.indexOf(10, start)) !== -1) {
      this.append(chunk.subarray(start, nl));
      const line = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts, this.size);
      this.parts = [];
      this.size = 0;
      start = nl + 1;
      if (onLine(line.toString('utf8')) === false) return start < chunk.length ? chunk.subarray(start) : null;
    }
    if (start < chunk.length) this.append(chunk.subarray(start));
    return null;
  }

  /** Drops a partial line held (the stream is being abandoned). */
  reset(): void {
    this.parts = [];
    this.size = 0;
  }

  private append(piece: Buffer): void {
    if (piece.length === 0) return;
    this.size += piece.length;
    if (this.size > this.maxLineBytes) {
      this.reset();
      throw new LineTooLongError(this.maxLineBytes);
    }
    this.parts.push(piece);
  }
}
