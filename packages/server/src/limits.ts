/**
 * Resource limits as the API speaks of them (cpus, memory_mb, disk_mb, processes) and as the
 * runtimes apply them (bytes, pids), plus how an exec that ran into one is reported.
 */
import type { ExecStreamMessage, LimitsBody, SandboxLimitsInfo } from '@podflare/protocol';
import { SandboxError } from '@podflare/runtime';
import type { LimitCounters, SandboxLimits } from './runtime/runtime.js';

export const MB = 1024 * 1024;

/** The creator's limits over the server's defaults; 400 naming the field past a maximum. */
export function resolveLimits(body: LimitsBody | undefined, defaults: SandboxLimits, max: SandboxLimits): SandboxLimits {
  const limits: SandboxLimits = {
    cpus: body?.cpus ?? defaults.cpus,
    memoryBytes: body?.memory_mb !== undefined ? body.memory_mb * MB : defaults.memoryBytes,
    diskBytes: body?.disk_mb !== undefined ? body.disk_mb * MB : defaults.diskBytes,
    pids: body?.processes ?? defaults.pids,
  };
  const over = (field: string, value: number, most: number, unit = '') => {
    if (value > most) throw new SandboxError('bad_request', `limits.${field} must be at most ${most}${unit} on this server, got ${value}${unit}`, { field: `limits.${field}` });
  };
  over('cpus', limits.cpus, max.cpus);
  over('memory_mb', limits.memoryBytes / MB, max.memoryBytes / MB);
  over('disk_mb', limits.diskBytes / MB, max.diskBytes / MB);
  over('processes', limits.pids, max.pids);
  return limits;
}

export function sameLimits(a: SandboxLimits, b: SandboxLimits): boolean {
  return a.cpus === b.cpus && a.memoryBytes === b.memoryBytes && a.diskBytes === b.diskBytes && a.pids === b.pids;
}

export function limitsInfo(l: SandboxLimits): SandboxLimitsInfo {
  return { cpus: l.cpus, memory_mb: Math.round(l.memoryBytes / MB), disk_mb: Math.round(l.diskBytes / MB), processes: l.pids };
}

type ErrorEvent = Extract<ExecStreamMessage, { type: 'error' }>;

/**
 * The error an exec should report, given the limit counters before and after it: a kill by the
 * memory limit becomes `MemoryLimitExceeded` (the interpreter's own report only says it died), a
 * refused process creation `ProcessLimitExceeded`. Null when no limit was hit.
 */
export function limitError(id: number, before: LimitCounters, after: LimitCounters, limits: SandboxLimits, original?: ErrorEvent): ErrorEvent | null {
  let name: string;
  let value: string;
  if (after.oomKills > before.oomKills) {
    name = 'MemoryLimitExceeded';
    value = `the sandbox exceeded its memory limit of ${Math.round(limits.memoryBytes / MB)} MB and the kernel killed the process using the most memory`;
  } else if (after.pidsRefused > before.pidsRefused) {
    name = 'ProcessLimitExceeded';
    value = `the sandbox reached its limit of ${limits.pids} processes and threads; new ones were refused`;
  } else {
    return null;
  }
  if (original) value += ` (${original.data.name}: ${original.data.value})`;
  const traceback = (original?.data.traceback ? original.data.traceback + '\n' : '') + `${name}: ${value}\n`;
  return { id, type: 'error', data: { name, value, traceback } };
}
