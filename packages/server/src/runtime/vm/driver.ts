/**
 * The VM runtime's driver: usable where QEMU, qemu-img and busybox-static are installed; KVM is
 * used only when it is hardware virtualization (not nested PVM), otherwise TCG, and only hardware
 * KVM makes `auto` prefer it. The guest image is built on first use (seconds), or before the
 * server listens when the VM runtime is its default.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { ensureVmImage, type VmImagePaths } from '../../image/vm-image.js';
import type { ServerDriver } from '../driver-context.js';
import { detectKvm } from './kvm.js';
import type { Acceleration } from './qemu-args.js';
import { VmRuntime } from './vm-runtime.js';

function hasCommand(cmd: string): Promise<boolean> {
  return new Promise((resolve) => execFile(cmd, ['--version'], { timeout: 10_000 }, (err) => resolve(!err)));
}

export async function detectAcceleration(): Promise<Acceleration> {
  const kvm = await detectKvm();
  return kvm.kind === 'hardware' ? { kind: 'kvm', reason: kvm.detail } : { kind: 'tcg', reason: kvm.detail };
}

/** Packages the VM runtime needs that this host lacks. */
async function missingPackages(): Promise<string[]> {
  const missing = [];
  if (!(await hasCommand('qemu-system-x86_64'))) missing.push('qemu-system-x86');
  if (!(await hasCommand('qemu-img'))) missing.push('qemu-utils');
  if (!existsSync('/bin/busybox')) missing.push('busybox-static');
  return missing;
}

export const vmDriver: ServerDriver = {
  async detect() {
    const missing = await missingPackages();
    if (missing.length) return { usable: false, reason: `needs ${missing.join(', ')} (bash scripts/setup.sh installs them)` };
    const accel = await detectAcceleration();
    return { usable: true, preferred: accel.kind === 'kvm', detail: accel.reason };
  },
  async create(ctx, name) {
    const { settings, log } = ctx;
    const accel = await detectAcceleration();
    let building: Promise<VmImagePaths> | null = null;
    const vmImage = () => {
      building ??= ensureVmImage({ imagesDir: settings.imagesDir, image: ctx.image, onProgress: ctx.onImageProgress, log: (m) => log.info(m) });
      building.catch(() => { building = null; });
      return building;
    };
    const runtime = new VmRuntime({
      name, stateDir: settings.stateDir, accel, image: vmImage, spawner: ctx.spawner, startTimeoutMs: Math.max(settings.startTimeoutMs, 30_000), log,
      // Apart from the namespace sandboxes' ids (config.ts checks): a QEMU is nobody to them, and they to it.
      ids: { base: settings.vmUidBase, count: settings.vmUidCount },
      onIncompatible: settings.onIncompatible, interruptGraceMs: settings.interruptGraceMs, outliveServer: settings.onStop === 'keep',
    });
    return { runtime, prepareDefault: async () => { await vmImage(); }, logFields: { vm_accel: accel.kind } };
  },
  async buildImage(opts) {
    const vm = await ensureVmImage(opts);
    return [`vm image ${vm.id} (kernel ${vm.kernelVersion})`, `  kernel: ${vm.vmlinux}`, `  initrd: ${vm.initrd}`, `  root:   ${vm.rootfs}`];
  },
};
