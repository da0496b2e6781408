/** Whether this host's KVM is hardware virtualization (the VM runtime's acceleration; `podflare doctor`). */
import { access, constants } from 'node:fs/promises';
import { existsSync } from 'node:fs';

export type KvmKind = 'hardware' | 'pvm' | 'absent' | 'unusable';

export interface KvmInfo {
  kind: KvmKind;
  detail: string;
}

/**
 * Whether /dev/kvm is hardware virtualisation. PVM (kvm_pvm) is a software-assisted nested
 * hypervisor: an unmodified guest kernel does not boot usefully on it, so a VM runtime must fall
 * back to TCG there.
 */
export async function detectKvm(): Promise<KvmInfo> {
  const present = existsSync('/dev/kvm');
  if (existsSync('/sys/module/kvm_pvm')) {
    return { kind: 'pvm', detail: 'nested PVM hypervisor: not hardware virtualization, VM runtime will use TCG' };
  }
  if (!present) return { kind: 'absent', detail: 'no /dev/kvm: a VM runtime would use TCG (software emulation, ~20x slower)' };
  const vendor = existsSync('/sys/module/kvm_intel') ? 'kvm_intel' : existsSync('/sys/module/kvm_amd') ? 'kvm_amd' : undefined;
  if (!vendor) return { kind: 'unusable', detail: '/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded: VM runtime will use TCG' };
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { kind: 'unusable', detail: `hardware KVM (${vendor}) present but /dev/kvm is not read/writable by this user` };
  }
  return { kind: 'hardware', detail: `hardware KVM usable (${vendor})` };
}
