/**
 * Outbound network for a namespace sandbox: slirp4netns in user mode, attached to the sandbox's own
 * network namespace. The sandbox gets 10.0.2.100 behind a NAT, DNS at 10.0.2.3, and
 * `--disable-host-loopback` keeps the host's 127.0.0.1 (the server's API included) out of reach.
 * Nothing listens inbound. With egress off no slirp is attached: the namespace has only `lo`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Readable } from 'node:stream';

export interface Slirp {
  process: ChildProcess;
  stop(): void;
}

/**
 * `ownUserNamespace: false` for a process that has only its own network namespace (a VM's QEMU):
 * there is no user namespace of its own to enter.
 */
export function startSlirp(sandboxPid: number, timeoutMs: number, opts: { ownUserNamespace?: boolean } = {}): Promise<Slirp> {
  // fd 3: slirp writes "1" when the tap device is configured. fd 4: slirp exits when it closes,
  // which the kernel does for us if the server dies.
  const child = spawn('slirp4netns', [
    '--configure', '--mtu=65520', '--disable-host-loopback',
    ...(opts.ownUserNamespace === false ? [] : [`--userns-path=/proc/${sandboxPid}/ns/user`]),
    '--ready-fd=3', '--exit-fd=4',
    String(sandboxPid), 'tap0',
  ], { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'] });
  const stop = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-2000); });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { stop(); reject(new Error('slirp4netns did not get ready in time')); }, timeoutMs);
    const ready = child.stdio[3] as Readable;
    ready.once('data', () => { clearTimeout(timer); resolve({ process: child, stop }); });
    child.once('error', (err) => { clearTimeout(timer); reject(new Error(`cannot start slirp4netns: ${err.message}`)); });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`slirp4netns exited (${code}): ${stderr.trim()}`)); });
  });
}
