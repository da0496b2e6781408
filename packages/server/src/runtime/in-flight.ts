/**
 * A runtime's starts and forks in flight: refused once it shuts down, and waited for by that
 * shutdown, so none of them leaves a process, mount or file behind a closed runtime.
 */
export class InFlight {
  private readonly running = new Set<Promise<unknown>>();
  private shut = false;

  get closed(): boolean {
    return this.shut;
  }

  async track<T>(work: () => Promise<T>): Promise<T> {
    if (this.shut) throw new Error('the runtime is shut down');
    const p = work();
    this.running.add(p);
    try {
      return await p;
    } finally {
      this.running.delete(p);
    }
  }

  /** Clean-up that need not hold up its caller, waited for by the shutdown all the same. */
  background(p: Promise<unknown>): void {
    const settled = p.catch(() => undefined);
    this.running.add(settled);
    void settled.then(() => this.running.delete(settled));
  }

  /** Refuses new work and waits for what runs (finishing or failing). */
  async close(): Promise<void> {
    this.shut = true;
    await Promise.allSettled([...this.running]);
  }
}
