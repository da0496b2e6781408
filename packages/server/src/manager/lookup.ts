/** Finding sandboxes by id (with the error a user should see) and listing their records and infos. */
import type { SandboxInfo } from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import { limitsInfo } from '../limits.js';
import type { SandboxRecord } from '../store/store.js';
import type { ManagerContext } from './context.js';
import type { LiveSandbox } from './live-sandbox.js';

export class SandboxLookup {
  constructor(private readonly ctx: ManagerContext) {}

  /**
   * The live sandbox, or the record of a frozen one (for the caller to resume), or the error a user
   * should see: 404 never existed (or retired by a merge), 410 ended.
   */
  async find(id: string, owner?: string): Promise<LiveSandbox | SandboxRecord> {
    const s = this.ctx.live.get(id);
    if (s && (owner === undefined || s.record.owner === owner)) return s;
    const record = await this.ctx.store.get(id);
    if (!record || (owner !== undefined && record.owner !== owner) || record.state === 'merged') {
      throw new SandboxError('not_found', `sandbox ${id} not found`);
    }
    if (record.state === 'frozen') return record;
    throw new SandboxError('sandbox_gone', `sandbox ${id} is gone (${record.state}${record.endReason ? `: ${record.endReason}` : ''})`);
  }

  /** A live sandbox's record, else the store's (ended ones too). */
  async record(id: string): Promise<SandboxRecord | undefined> {
    return this.ctx.live.get(id)?.record ?? (await this.ctx.store.get(id));
  }

  async info(id: string, owner?: string): Promise<SandboxInfo> {
    const record = await this.record(id);
    if (!record || (owner !== undefined && record.owner !== owner) || record.state === 'merged') {
      throw new SandboxError('not_found', `sandbox ${id} not found`);
    }
    return this.toInfo(record, await this.ctx.store.children(id));
  }

  async list(filter: { ancestor?: string; state?: SandboxRecord['state']; all?: boolean }, owner?: string): Promise<SandboxInfo[]> {
    const { store, live } = this.ctx;
    const records = await store.list({ ancestor: filter.ancestor, state: filter.state, includeEnded: filter.all, owner });
    return Promise.all(records.map(async (r) => this.toInfo(live.get(r.id)?.record ?? r, await store.children(r.id))));
  }

  /** Records as the store has them, with live state overlaid (the dashboard shows ended ones too). */
  async records(filter: { all?: boolean }, owner?: string): Promise<SandboxRecord[]> {
    const records = await this.ctx.store.list({ includeEnded: filter.all, owner });
    return records.map((r) => this.ctx.live.get(r.id)?.record ?? r);
  }

  private toInfo(r: SandboxRecord, children: string[]): SandboxInfo {
    return {
      id: r.id, state: r.state, template: r.template, runtime: r.runtime, egress: r.egress, persistent: r.persistent,
      parent: r.parentId, children, created_at: new Date(r.createdAt).toISOString(),
      last_active_at: new Date(r.lastActiveAt).toISOString(), idle_timeout_seconds: r.idleTimeoutSeconds,
      limits: limitsInfo(r.limits ?? this.ctx.config.defaultLimits), metadata: r.metadata, end_reason: r.endReason,
    };
  }
}
