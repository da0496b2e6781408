/** What a sandbox can leave behind on the host: processes, overlay mounts, directories. */
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';

export function bwrapProcesses(): number[] {
  try {
    return execFileSync('pgrep', ['-x', 'bwrap'], { encoding: 'utf8' }).trim().split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

export function overlayMountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(dir));
}

export function sandboxDirsIn(stateDir: string): string[] {
  const dir = `${stateDir}/sandboxes`;
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** Processes whose command line mentions this state dir (bwrap, slirp4netns) — none may remain. */
export function processesMentioning(text: string): string[] {
  const out: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
      if (cmd.includes(text)) out.push(`${pid}: ${cmd.slice(0, 200)}`);
    } catch { /* gone */ }
  }
  return out;
}

/** Fork layers still on disk (none may outlive the sandboxes that use them). */
export function forkLayersIn(stateDir: string): string[] {
  const dir = `${stateDir}/layers`;
  return existsSync(dir) ? readdirSync(dir) : [];
}
