/**
 * Can the sandboxes' unprivileged uids reach the state directory?
 *
 * Sandboxes (bubblewrap as the sandboxes' uid range) and VMs (QEMU as its own uid) open their roots,
 * sockets and disks below the state directory, so every directory above it must let "others"
 * search it (the x bit). A state directory under a 0700 parent (what `mktemp -d` makes) used to let
 * the server start and then fail every sandbox with "the sandbox's agent is gone: channel closed".
 * The server refuses to start instead, and `podflare doctor` says which directory to change.
 * (The state directory itself is the runtime's to set up: it gets search-only access.)
 */
import { stat } from 'node:fs/promises';
import path from 'node:path';

export interface UnreachableParent {
  /** The first directory, from `/` down, that others may not search. */
  dir: string;
  mode: number;
}

/** The first parent of `stateDir` (from `/` down) that a non-owner uid cannot search, or null. */
export async function unreachableParent(stateDir: string): Promise<UnreachableParent | null> {
  const chain: string[] = [];
  for (let dir = path.dirname(path.resolve(stateDir)); ; dir = path.dirname(dir)) {
    chain.unshift(dir);
    if (dir === path.dirname(dir)) break;
  }
  for (const dir of chain) {
    let mode: number;
    try {
      mode = (await stat(dir)).mode & 0o7777;
    } catch {
      return null; // not made yet: it will be made with the default mode (0755)
    }
    if ((mode & 0o001) === 0) return { dir, mode };
  }
  return null;
}

/** What to tell an operator whose state directory is out of the sandboxes' reach. */
export function unreachableMessage(stateDir: string, p: UnreachableParent): string {
  const mode = p.mode.toString(8).padStart(4, '0');
  return `the state directory ${stateDir} is out of the sandboxes' reach: ${p.dir} is mode ${mode}, and the ` +
    `sandboxes' unprivileged uids need to search every directory above it. ` +
    `Run \`chmod o+x ${p.dir}\` (search only, no listing), or choose a state directory elsewhere (--state-dir)`;
}

/** Throws the message above when a parent of `stateDir` cannot be searched by others. */
export async function assertStateDirReachable(stateDir: string): Promise<void> {
  const p = await unreachableParent(stateDir);
  if (p) throw new Error(unreachableMessage(stateDir, p));
}
