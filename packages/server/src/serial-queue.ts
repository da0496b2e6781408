/** Runs async jobs one at a time, in arrival order: one exec per sandbox, the rest wait. */
export class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private depth = 0;

  get length(): number {
    return this.depth;
  }

  run<T>(job: () => Promise<T>): Promise<T> {
    this.depth++;
    const result = this.tail.then(job, job);
    this.tail = result.then(() => undefined, () => undefined).finally(() => { this.depth--; });
    return result;
  }
}
