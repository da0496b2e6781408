/**
 * The bubblewrap command line of a namespace sandbox. Kept apart from process handling so the
 * isolation policy reads in one place:
 * - bwrap runs unprivileged, as the first uid of the sandboxes' host range, never as host root;
 *   its user namespace maps root inside to that uid and 65535 more after it (the server writes
 *   the map while bwrap waits on `--userns-block-fd`), so whatever runs inside — even after an
 *   escape from the namespaces — is an ordinary host user with no capability over the host;
 * - own user, mount, pid, ipc, uts, net and cgroup namespaces (`--unshare-*`);
 * - the root is the sandbox's overlay (image + its own layer) and nothing else of the host: no
 *   /root, no checkout, no state directory, no other sandbox; /tmp is part of the overlay, so it is
 *   private and inherited by forks;
 * - fresh /proc and a minimal /dev;
 * - a seccomp filter (`--seccomp`) refusing what sandboxes never need, inherited by everything
 *   inside, forks included;
 * - `--die-with-parent`: nothing outlives the sandbox's holder (its parent, which outlives the server:
 *   runtime/namespace/holder.ts); `--new-session`: no TIOCSTI into a terminal;
 * - a cleared environment.
 */
export interface BwrapOptions {
  root: string;
  hostname: string;
  env: Record<string, string>;
  /** fd (in bwrap) where bwrap writes its JSON info (child pid). */
  infoFd: number;
  /** fd (in bwrap) bwrap reads one byte from once its user namespace's id maps are written. */
  userNsBlockFd: number;
  /** fd (in bwrap) of the compiled seccomp filter (host/podflare_seccomp.py). */
  seccompFd: number;
  command: string[];
}

export const SANDBOX_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export function bwrapArgs(o: BwrapOptions): string[] {
  const args = [
    '--die-with-parent',
    '--new-session',
    // The agent is PID 1 (no bwrap reaper): it must outlive forked children nested in its pid
    // namespace even after its sandbox is deleted, which bwrap's own init would not.
    '--as-pid-1',
    // Capabilities inside the sandbox's own user namespace only: a forked child needs them to
    // enter new namespaces and switch its root. They grant nothing over the host.
    '--cap-add', 'ALL',
    '--unshare-user', '--userns-block-fd', String(o.userNsBlockFd), '--uid', '0', '--gid', '0',
    '--unshare-pid', '--unshare-ipc', '--unshare-uts', '--unshare-net', '--unshare-cgroup-try',
    '--hostname', o.hostname,
    '--bind', o.root, '/',
    '--proc', '/proc',
    '--dev', '/dev',
    '--info-fd', String(o.infoFd),
    '--seccomp', String(o.seccompFd),
    '--clearenv',
    '--chdir', '/root',
  ];
  for (const [k, v] of Object.entries(o.env)) args.push('--setenv', k, v);
  args.push('--', ...o.command);
  return args;
}
