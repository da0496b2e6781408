/**
 * What ran in each sandbox, for the dashboard: the code, its streamed output, rich results and
 * errors, and how it ended. In memory and bounded three ways (execs per sandbox, bytes per exec,
 * bytes overall, oldest dropped first), so a sandbox printing a gigabyte costs the server nothing
 * more than the caps. Emits every step as it happens, so a watcher can stream it live.
 */
import { EventEmitter } from 'node:events';
import type { ExecRecord, ExecStreamMessage, ExecUpdate as WireExecUpdate, HistoryOutput } from '@podflare/protocol';

export type { ExecRecord, HistoryOutput };

/** A step of an exec, as emitted on 'exec': the dashboard's update plus whose sandbox it is. */
export type ExecUpdate = WireExecUpdate & { owner: string };

export interface HistoryLimits {
  execsPerSandbox: number;
  bytesPerExec: number;
  totalBytes: number;
  codeBytes: number;
}

const DEFAULT_LIMITS: HistoryLimits = { execsPerSandbox: 50, bytesPerExec: 1024 * 1024, totalBytes: 64 * 1024 * 1024, codeBytes: 64 * 1024 };

interface Entry {
  record: ExecRecord;
  owner: string;
  bytes: number;
}

/** Roughly what one kept exec costs beyond its code and output (record, ids, list slots). */
const ENTRY_OVERHEAD_BYTES = 512;

const sizeOf = (o: HistoryOutput) => (typeof o.data === 'string' ? o.data.length : JSON.stringify(o.data).length);

export class ExecHistory extends EventEmitter<{ exec: [ExecUpdate] }> {
  private readonly bySandbox = new Map<string, Entry[]>();
  /** Every kept exec, oldest first: the eviction order for the overall cap. */
  private readonly order: Entry[] = [];
  private totalBytes = 0;
  private nextId = 1;

  constructor(private readonly limits: HistoryLimits = DEFAULT_LIMITS) {
    super();
  }

  /** Starts recording an exec; the returned recorder takes its stream messages. */
  begin(sandbox: string, owner: string, language: 'python' | 'bash' | 'javascript', code: string) {
    const record: ExecRecord = {
      id: this.nextId++, sandbox, language,
      code: code.length > this.limits.codeBytes ? code.slice(0, this.limits.codeBytes) + '\n# … (code truncated)' : code,
      started_at: Date.now(), ended_at: null, exit_code: null, execution_count: null, state_lost: false, outputs: [], truncated: false,
    };
    // The fixed cost counts too, so a flood of tiny execs is bounded by the overall cap as well.
    const entry: Entry = { record, owner, bytes: ENTRY_OVERHEAD_BYTES + record.code.length };
    const list = this.bySandbox.get(sandbox) ?? [];
    this.bySandbox.set(sandbox, list);
    list.push(entry);
    this.order.push(entry);
    this.totalBytes += entry.bytes;
    while (list.length > this.limits.execsPerSandbox) this.drop(list[0]!);
    this.emit('exec', { phase: 'start', sandbox, owner, exec: record });
    return {
      message: (msg: ExecStreamMessage) => this.message(entry, msg),
      end: (exit: { code: number; execution_count?: number | null; state_lost?: boolean }) => this.end(entry, exit),
    };
  }

  /** Newest last; empty for a sandbox nothing ran in, whose history was dropped, or (with `owner`) someone else's. */
  list(sandbox: string, owner?: string): ExecRecord[] {
    return (this.bySandbox.get(sandbox) ?? []).filter((e) => owner === undefined || e.owner === owner).map((e) => e.record);
  }

  get bytes(): number {
    return this.totalBytes;
  }

  private message(entry: Entry, msg: ExecStreamMessage): void {
    let output: HistoryOutput;
    switch (msg.type) {
      case 'stdout':
      case 'stderr':
        output = { type: msg.type, data: msg.data };
        break;
      case 'result':
        output = { type: 'result', data: msg.data, is_main_result: msg.is_main_result };
        break;
      case 'error':
        output = { type: 'error', data: msg.data };
        break;
      default:
        return;
    }
    const r = entry.record;
    if (r.truncated || !this.bySandbox.get(r.sandbox)?.includes(entry)) return;
    let size = sizeOf(output);
    if (entry.bytes + size > this.limits.bytesPerExec) {
      r.truncated = true;
      // Keep what fits of text; a rich result that does not fit is replaced by its plain text.
      const room = Math.max(0, this.limits.bytesPerExec - entry.bytes);
      if (output.type === 'stdout' || output.type === 'stderr') output = { ...output, data: output.data.slice(0, room) };
      else if (output.type === 'result') output = { ...output, data: { 'text/plain': String(output.data['text/plain'] ?? '').slice(0, room) } };
      else if (output.type === 'error') output = { type: 'error', data: { ...output.data, traceback: output.data.traceback.slice(0, room) } };
      size = sizeOf(output);
    }
    const last = r.outputs[r.outputs.length - 1];
    if ((output.type === 'stdout' || output.type === 'stderr') && last?.type === output.type) (last as { data: string }).data += output.data;
    else r.outputs.push(output);
    entry.bytes += size;
    this.totalBytes += size;
    this.emit('exec', { phase: 'output', sandbox: r.sandbox, owner: entry.owner, id: r.id, output });
    this.enforceTotal();
  }

  private end(entry: Entry, exit: { code: number; execution_count?: number | null; state_lost?: boolean }): void {
    const r = entry.record;
    r.ended_at = Date.now();
    r.exit_code = exit.code;
    r.execution_count = exit.execution_count ?? null;
    r.state_lost = exit.state_lost ?? false;
    this.emit('exec', { phase: 'end', sandbox: r.sandbox, owner: entry.owner, exec: r });
  }

  private enforceTotal(): void {
    while (this.totalBytes > this.limits.totalBytes && this.order.length > 1) this.drop(this.order[0]!);
  }

  private drop(entry: Entry): void {
    const list = this.bySandbox.get(entry.record.sandbox);
    if (list) {
      const i = list.indexOf(entry);
      if (i !== -1) list.splice(i, 1);
      if (list.length === 0) this.bySandbox.delete(entry.record.sandbox);
    }
    const j = this.order.indexOf(entry);
    if (j !== -1) this.order.splice(j, 1);
    this.totalBytes -= entry.bytes;
  }
}
