/** The server's and each owner's sandbox caps, with room reserved for creates and forks in flight. */
import { SandboxError } from '@podflare/runtime';
import type { ManagerContext } from './context.js';

export class Capacity {
  /** Sandboxes being created or forked, counted against the caps before they are live. */
  private readonly reserved = { total: 0, byOwner: new Map<string, number>() };

  constructor(private readonly ctx: ManagerContext) {}

  /**
   * Reserves room for `more` new sandboxes of `owner` until the returned release is called (once
   * they are live, or failed): concurrent creates and forks cannot together overshoot a cap.
   * 429 when the server's cap or the owner's would be exceeded. Retry-After is a guess (sandboxes
   * end when their callers delete them or idle out): a few seconds.
   */
  reserve(owner: string, more: number): () => void {
    const { maxSandboxes, maxSandboxesPerKey } = this.ctx.config;
    const total = this.ctx.live.size + this.reserved.total;
    if (total + more > maxSandboxes) {
      throw new SandboxError('rate_limited', `the server runs ${total} sandboxes and allows ${maxSandboxes}: ` +
        `${more} more would exceed that; delete some or retry later`, { retryAfterSeconds: 5 });
    }
    let owned = this.reserved.byOwner.get(owner) ?? 0;
    for (const s of this.ctx.live.values()) if (s.record.owner === owner) owned++;
    if (owned + more > maxSandboxesPerKey) {
      // Without API keys every caller is the same (anonymous) owner.
      const who = owner ? 'this API key has' : 'callers of this server (it has no API keys, so they share one allowance) have';
      throw new SandboxError('rate_limited', `${who} ${owned} live sandboxes and may have ${maxSandboxesPerKey}: ` +
        `${more} more would exceed that; delete some or retry later`, { retryAfterSeconds: 5 });
    }
    this.reserved.total += more;
    this.reserved.byOwner.set(owner, (this.reserved.byOwner.get(owner) ?? 0) + more);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.reserved.total -= more;
      const left = this.reserved.byOwner.get(owner)! - more;
      if (left) this.reserved.byOwner.set(owner, left);
      else this.reserved.byOwner.delete(owner);
    };
  }
}
