/**
 * The QEMU command line of a microVM: the `microvm` machine (virtio-mmio devices only, the device
 * model Firecracker uses), guest RAM in a file so a frozen template can be mapped by its clones,
 * the root disk as the VM's own qcow2 overlay, the agent on a virtio-serial port whose host end is
 * a unix socket, and QEMU's user-mode network only when the sandbox may reach out.
 *
 * A template and its clones must have the same devices (migration restores device state into
 * them); only file paths, `share` and `-incoming` differ.
 */
import { readFileSync } from 'node:fs';
import { AGENT_PORT_NAME } from '../../image/vm-image.js';

export interface Acceleration {
  kind: 'kvm' | 'tcg';
  /** Why this one (from detectKvm). */
  reason: string;
}

export interface QemuArgsOptions {
  accel: Acceleration;
  memoryMb: number;
  vmlinux: string;
  initrd: string;
  /** The VM's own overlay (qcow2). */
  disk: string;
  /**
   * Guest RAM: /dev/fd/3 (shared RAM, shared-ram.ts: written by a template, share=on; mapped
   * copy-on-write by clones once sealed), or a resumed VM's own RAM file on /dev/shm.
   */
  ramFile: string;
  shareRam: boolean;
  /** The agent's and QMP's sockets: a path QEMU binds, or a socket listening already, passed at this fd. */
  agentSocket: string | { fd: number };
  qmpSocket: string | { fd: number };
  consoleLog: string;
  network: boolean;
  /** Clone: wait for migrate-incoming instead of booting. */
  incoming: boolean;
}

/** The host's TSC rate in kHz: under TCG the guest's TSC is the host's, and calibrating it against
 * the emulated PIT fails under load (the boot then hangs), so the guest is told. */
function hostTscKhz(): number | undefined {
  try {
    const mhz = /^cpu MHz\s*:\s*([\d.]+)/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1];
    return mhz ? Math.round(Number(mhz) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

export function kernelCommandLine(accel: Acceleration): string {
  // Without tsc=reliable/lpj/no_timer_check a TCG guest hangs after "tsc: No reference
  // (HPET/PMTIMER) available" (microvm has neither); panic=-1 + -no-reboot: a dead guest ends QEMU.
  const args = ['console=ttyS0', 'quiet', 'panic=-1', 'tsc=reliable', 'lpj=2000000', 'no_timer_check', 'random.trust_cpu=on'];
  if (accel.kind === 'tcg') {
    const khz = hostTscKhz();
    if (khz) args.push(`tsc_early_khz=${khz}`);
  }
  return args.join(' ');
}

function socketOption(s: string | { fd: number }): string {
  return typeof s === 'string' ? `path=${s}` : `fd=${s.fd}`;
}

export function qemuArgs(o: QemuArgsOptions): string[] {
  const args = [
    '-M', 'microvm,pit=on,pic=on,rtc=on,isa-serial=on',
    ...(o.accel.kind === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,tb-size=128', '-cpu', 'max']),
    '-m', `${o.memoryMb}M`, '-smp', '1',
    '-nodefaults', '-no-user-config', '-no-reboot', '-display', 'none', '-monitor', 'none',
    // seccomp: no obsolete syscalls, no privilege changes, no scheduler/affinity games. Spawning
    // stays allowed: migrations to and from files run `cat` (exec: URIs; QEMU 7.2 has no file:).
    '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny',
    '-object', `memory-backend-file,id=mem,size=${o.memoryMb}M,mem-path=${o.ramFile},share=${o.shareRam ? 'on' : 'off'}`,
    '-machine', 'memory-backend=mem',
    '-kernel', o.vmlinux, '-initrd', o.initrd, '-append', kernelCommandLine(o.accel),
    '-serial', `file:${o.consoleLog}`,
    '-drive', `id=root,file=${o.disk},format=qcow2,if=none,cache=unsafe,discard=unmap`,
    '-device', 'virtio-blk-device,drive=root',
    '-device', 'virtio-serial-device',
    '-chardev', `socket,id=agent,${socketOption(o.agentSocket)},server=on,wait=off`,
    '-device', `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
    // A server socket: when one server's connection ends, QEMU accepts the next server's.
    '-chardev', `socket,id=qmp,${socketOption(o.qmpSocket)},server=on,wait=off`, '-mon', 'chardev=qmp,mode=control',
  ];
  // No network device at all without egress: nothing to reach out with.
  // A restored VM would announce itself five times over its first second (the guest sends
  // gratuitous ARPs and unsolicited neighbour advertisements, for switches to learn where a
  // migrated VM went): a clone has a user-mode network of its own, with nobody to tell, and under
  // TCG each round costs its guest (and a fork's siblings) CPU: ~10% of a fork(5).
  if (o.network) args.push('-netdev', 'user,id=net0', '-device', 'virtio-net-device,netdev=net0', '-global', 'migration.announce-rounds=0');
  if (o.incoming) args.push('-incoming', 'defer');
  return args;
}
