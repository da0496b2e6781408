/**
 * Per-sandbox event logs (`GET /v1/sandboxes/:id/events`): what happened to a sandbox outside its
 * execs, today its egress decisions. In memory, the most recent MAX_EVENTS per sandbox, numbered
 * from 0 so a reader can ask for what came after the last one it saw.
 */
import type { SandboxEvent } from '@podflare/protocol';

const MAX_EVENTS = 1000;

type EventBody = SandboxEvent extends infer E ? (E extends SandboxEvent ? Omit<E, 'seq' | 'ts'> : never) : never;

export class SandboxEventLog {
  private readonly logs = new Map<string, { next: number; events: SandboxEvent[] }>();

  record(sandboxId: string, event: EventBody): void {
    let log = this.logs.get(sandboxId);
    if (!log) this.logs.set(sandboxId, (log = { next: 0, events: [] }));
    log.events.push({ ...event, seq: log.next++, ts: Date.now() } as SandboxEvent);
    if (log.events.length > MAX_EVENTS) log.events.splice(0, log.events.length - MAX_EVENTS);
  }

  /** Events with seq > `after` (all kept ones without it). */
  list(sandboxId: string, after = -1): SandboxEvent[] {
    return (this.logs.get(sandboxId)?.events ?? []).filter((e) => e.seq > after);
  }

  drop(sandboxId: string): void {
    this.logs.delete(sandboxId);
  }
}

export type { EventBody as SandboxEventBody };
