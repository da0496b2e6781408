/**
 * Splits a stream of text into lines, holding at most `maxLineChars` of an unfinished line: a
 * peer that never ends its line (or sends an enormous one) gets an error, not the server's memory.
 * Each chunk is scanned once, so a long line arriving in many chunks costs linear time.
 */
export class LineTooLongError extends Error {
  override name = 'LineTooLongError';
  constructor(readonly maxLineChars: number) {
    super(`a reply line is longer than ${maxLineChars} characters`);
  }
}

export class LineReader {
  private parts: string[] = [];
  private size = 0;

  constructor(private readonly maxLineChars: number) {}

  /** The lines this chunk completes (without their newline); throws LineTooLongError. */
  push(chunk: string): string[] {
    const lines: string[] = [];
    let start = 0;
    let nl: number;
    while ((nl = chunk.indexOf('\n', start)) !== -1) {
      this.append(chunk.slice(start, nl));
      lines.push(this.parts.length === 1 ? this.parts[0]! : this.parts.join(''));
      this.parts = [];
      this.size = 0;
      start = nl + 1;
    }
    if (start < chunk.length) this.append(chunk.slice(start));
    return lines;
  }

  private append(piece: string): void {
    this.size += piece.length;
    if (this.size > this.maxLineChars) {
      this.parts = [];
      this.size = 0;
      throw new LineTooLongError(this.maxLineChars);
    }
    this.parts.push(piece);
  }
}
