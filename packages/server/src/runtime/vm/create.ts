/**
 * Whether this server offers the VM runtime, and with which acceleration: QEMU and busybox-static
 * must be installed; KVM is used only when it is hardware virtualization (not nested PVM),
 * otherwise TCG. The guest image is built on first use (seconds), or at start-up when the VM
 * runtime is the server's default.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import type { ServerConfig } from '../../config.js';
import { detectKvm } from '../../doctor.js';
import type { ImagePaths, ImageProgress } from '../../image/index.js';
import { ensureVmImage, type VmImagePaths } from '../../image/vm-image.js';
import type { Logger } from '../../log.js';
import type { Spawner } from '../../spawner.js';
import type { Acceleration } from './qemu-args.js';
import { VmRuntime } from './vm-runtime.js';

export interface VmRuntimeSetup {
  runtime: VmRuntime;
  image: () => Promise<VmImagePaths>;
}

function hasCommand(cmd: string): Promise<boolean> {
  return new Promise((resolve) => execFile(cmd, ['--version'], { timeout: 10_000 }, (err) => resolve(!err)));
}

export async function detectAcceleration(): Promise<Acceleration> {
  const kvm = await detectKvm();
  return kvm.kind === 'hardware' ? { kind: 'kvm', reason: kvm.detail } : { kind: 'tcg', reason: kvm.detail };
}

export async function createVmRuntime(
  config: ServerConfig, image: ImagePaths, log: Logger, spawner: Spawner, onProgress?: (p: ImageProgress) => void,
): Promise<VmRuntimeSetup | null> {
  const missing = [];
  if (!(await hasCommand('qemu-system-x86_64'))) missing.push('qemu-system-x86');
  if (!(await hasCommand('qemu-img'))) missing.push('qemu-utils');
  if (!existsSync('/bin/busybox')) missing.push('busybox-static');
  if (missing.length) {
    if (config.runtime === 'vm') throw new Error(`the vm runtime needs ${missing.join(', ')} (bash scripts/setup.sh installs them)`);
    log.debug('vm runtime not offered', { missing: missing.join(',') });
    return null;
  }
  const accel = await detectAcceleration();
  let building: Promise<VmImagePaths> | null = null;
  const vmImage = () => {
    building ??= ensureVmImage({ imagesDir: config.imagesDir, image, onProgress, log: (m) => log.info(m) });
    building.catch(() => { building = null; });
    return building;
  };
  const runtime = new VmRuntime({
    stateDir: config.stateDir, accel, image: vmImage, spawner, startTimeoutMs: Math.max(config.startTimeoutMs, 30_000), log,
    // Apart from the namespace sandboxes' ids (config.ts checks): a QEMU is nobody to them, and they to it.
    ids: { base: config.vmUidBase, count: config.vmUidCount },
  });
  return { runtime, image: vmImage };
}
