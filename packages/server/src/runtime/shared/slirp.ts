/**
 * Outbound network for a namespace sandbox: slirp4netns in user mode, attached to the sandbox's own
 * network namespace. The sandbox gets 10.0.2.100 behind a NAT, DNS at 10.0.2.3, and
 * `--disable-host-loopback` keeps the host's 127.0.0.1 (the server's API included) out of reach.
 * Nothing listens inbound. With egress off no slirp is attached: the namespace has only `lo`.
 */
import type { Spawner } from './spawner.js';

export interface Slirp {
  pid: number;
  stop(): void;
}

/**
 * `ownUserNamespace: false` for a process that has only its own network namespace (a VM's QEMU):
 * there is no user namespace of its own to enter.
 */
export async function startSlirp(
  spawner: Spawner, sandboxPid: number, timeoutMs: number, opts: { ownUserNamespace?: boolean; outliveServer?: boolean } = {},
): Promise<Slirp> {
  // fd 3: slirp writes "1" when the tap device is configured. fd 4: slirp exits when it closes,
  // which happens when the spawner (and so the server) dies; a sandbox that outlives the server
  // (`outliveServer`: under a holder) has its slirp detached instead, killed by pid when the
  // sandbox ends (or by the next server's reconcile once its sandbox is gone). Started by the
  // spawner: a fork of the server would stall it for milliseconds (see spawner.ts).
  const outlive = opts.outliveServer === true;
  const child = await spawner.spawn([
    'slirp4netns', '--configure', '--mtu=65520', '--disable-host-loopback',
    ...(opts.ownUserNamespace === false ? [] : [`--userns-path=/proc/${sandboxPid}/ns/user`]),
    '--ready-fd=3', ...(outlive ? [] : ['--exit-fd=4']),
    String(sandboxPid), 'tap0',
  ], outlive ? { readyFd: 3, detach: true } : { readyFd: 3, exitFd: 4 }).catch((err: Error) => {
    throw new Error(`cannot start slirp4netns: ${err.message}`);
  });
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('slirp4netns did not get ready in time')), timeoutMs);
  });
  try {
    await Promise.race([child.ready, timeout]);
  } catch (err) {
    child.kill();
    throw err;
  } finally {
    clearTimeout(timer);
  }
  return { pid: child.pid, stop: () => child.kill() };
}

/**
 * A detached slirp4netns of an adopted sandbox (not a child of this server's spawner): stopped by
 * pid, once its command line is checked to still be slirp's for that sandbox.
 */
export function adoptedSlirp(pid: number, sandboxPid: number, kill: (pid: number, mark: string) => boolean): Slirp {
  return { pid, stop: () => void kill(pid, String(sandboxPid)) };
}
