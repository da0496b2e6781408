/**
 * Where a namespace sandbox's files live on the host:
 *   <stateDir>/sandboxes/<id>/upper   the sandbox's own overlay layer (its writes)
 *   <stateDir>/sandboxes/<id>/work    overlayfs's scratch directory
 *   <stateDir>/sandboxes/<id>/root    where the overlay is mounted on the host, only while starting
 *   <stateDir>/sandboxes/<id>/layers/fork-*   fork layers it made (frozen copies of its upper, the
 *                                     lowers of its children), counted against its disk limit
 *   <stateDir>/sandboxes/.trash/      directories of ended sandboxes, on their way out (trash.ts)
 */
import path from 'node:path';

export interface SandboxDirs {
  dir: string;
  upper: string;
  work: string;
  root: string;
}

export function sandboxesDir(stateDir: string): string {
  return path.join(stateDir, 'sandboxes');
}

export function sandboxDirs(stateDir: string, id: string): SandboxDirs {
  const dir = path.join(sandboxesDir(stateDir), id);
  return { dir, upper: path.join(dir, 'upper'), work: path.join(dir, 'work'), root: path.join(dir, 'root') };
}

export function trashDir(stateDir: string): string {
  return path.join(sandboxesDir(stateDir), '.trash');
}

/** overlayfs options separate paths with ':' and ','; refuse paths that would break them. */
export function assertMountablePath(p: string): void {
  if (/[:,\s]/.test(p)) throw new Error(`path "${p}" cannot be used in an overlay mount (no ':', ',' or spaces)`);
}
