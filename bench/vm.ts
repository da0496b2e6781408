/**
 * The microVM measure (name for --only: vm), beside the same operations on the namespace runtime.
 * Under TCG (this machine: KVM is nested PVM) absolute VM times are emulation-bound; the ratios
 * (fork(5) against one restore, the pool hiding restores) are what carries over to hardware KVM.
 *
 *   cold boot       the first create on a fresh server: guest image check, boot to the agent,
 *                   interpreter start, freeze (stop + migration of device state), first restore
 *   pool create     Sandbox.create({ runtime: 'vm' }) served from the warm pool of clones
 *   restore         create on a server with the pool off: one clone restored from the template,
 *                   alternating with the fork(5)s (the same host state for both)
 *   fork(1/5)       of an idle VM sandbox holding a small interpreter state: forked by copy (its
 *                   ~8 MB of own pages read from its QEMU's memory, its device state saved alone),
 *                   its disk overlay copied; the children start meanwhile and restore like clones
 *                   of the template with those pages. Under TCG on 2 cores the 5 children's own
 *                   restores alone are ~2.5 restores of CPU.
 *   5 restores      five creates at once with the pool off (five clones restored side by side),
 *                   alternating with the fork(5)s: what a fork(5)'s children cost at the least
 *   clone PSS       private memory of an idle pooled clone against its RAM size
 * Two servers of their own: one with a pool (pool create, PSS), one without (restore, forks).
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Sandbox, type Client } from 'podflare';
import type { RunningServer } from '@podflare/server';
import { processes } from './memory.js';
import { Failures, failLimit, notes, rows, status, timingRow } from './report.js';
import { fmtMB, fmtMs, summarize } from './stats.js';

export interface VmBenchServer {
  server: RunningServer;
  client: Client;
}

export interface VmOptions {
  quick: boolean;
  n: number;
}

const VM_RAM_BYTES = 512 * 1024 * 1024;
export const VM_TARGET = { poolCreateP50: 20, fork5VsRestore: 3, fork5Ms: 1500, clonePssShare: 0.3 };

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** CPU time (ms) the whole machine spent busy and idle so far, from /proc/stat (USER_HZ = 100). */
function machineCpuMs(): { busy: number; idle: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  return { busy: (user + nice + system + irq + softirq + steal) * 10, idle: (idle + iowait) * 10 };
}

/** CPU time (ms) so far of the QEMUs running these sandboxes (NaN for one not found): one /proc scan. */
async function qemuCpuMs(ids: string[]): Promise<number[]> {
  const qemus = (await processes()).filter((p) => path.basename(p.args[0] ?? '') === 'qemu-system-x86_64');
  return ids.map((id) => qemus.find((p) => p.args.some((a) => a.includes(`/vm/${id}/`)))?.cpuMs ?? NaN);
}

/**
 * Waits (up to a minute) for a machine that stays ≥ 90% idle for a second: the VM figures are
 * CPU-bound ratios on few cores, and work the earlier measures left behind (the load and crash
 * runs' sandboxes being removed, the kernel's own clean-up) would be counted against them.
 */
async function quietMachine(): Promise<void> {
  const t0 = performance.now();
  for (;;) {
    const a = machineCpuMs();
    await sleep(1000);
    const b = machineCpuMs();
    const idleShare = (b.idle - a.idle) / Math.max(1, b.busy - a.busy + b.idle - a.idle);
    const waited = performance.now() - t0;
    if (idleShare >= 0.9 || waited > 60_000) {
      if (waited > 1500) notes.push(`vm: waited ${(waited / 1000).toFixed(0)} s for a quiet machine before the restores and forks (${(idleShare * 100).toFixed(0)}% idle then)`);
      return;
    }
  }
}

const median = (xs: number[]) => summarize(xs.filter((x) => !Number.isNaN(x))).p50;

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t = performance.now();
  const value = await fn();
  return { ms: performance.now() - t, value };
}

/** On the pooled server: cold boot (first create), pool creates, idle clone PSS. */
export async function measureVmPooled(bs: VmBenchServer, opts: VmOptions): Promise<void> {
  const cold = await timed(() => Sandbox.create({ client: bs.client, runtime: 'vm' }));
  rows.push(timingRow('vm: cold boot → template → first clone', summarize([cold.ms]), '– (TCG)', '–', '–'));
  await cold.value.close();
  const failures = new Failures('vm pool create', failLimit(opts.n));
  const samples: number[] = [];
  const runs = Math.min(opts.n, opts.quick ? 5 : 20);
  for (let i = 0; i < runs; i++) {
    await bs.server.manager.waitPoolFull(120_000);
    const t = performance.now();
    const sbx = await failures.attempt('create', () => Sandbox.create({ client: bs.client, runtime: 'vm' }));
    const ms = performance.now() - t;
    if (!sbx) continue;
    samples.push(ms);
    await failures.attempt('close', () => sbx.close());
  }
  const s = summarize(samples);
  rows.push(timingRow('vm: create (warm pool of clones)', s, `p50 ≤ ${VM_TARGET.poolCreateP50} ms`, '–', failures.report(status(s.p50 <= VM_TARGET.poolCreateP50))));

  // An idle clone straight from the pool: how much of its RAM is its own.
  await bs.server.manager.waitPoolFull(120_000);
  const idle = await Sandbox.create({ client: bs.client, runtime: 'vm' });
  try {
    await sleep(1000);
    const pss = await bs.server.manager.memoryOf(idle.id);
    const share = pss / VM_RAM_BYTES;
    rows.push({
      measure: 'vm: idle pooled clone PSS (QEMU + slirp)', n: '1', p50: fmtMB(pss), p99: '–',
      target: `≤ ${VM_TARGET.clonePssShare * 100}% of ${fmtMB(VM_RAM_BYTES)} RAM`, peer: '–', status: status(share <= VM_TARGET.clonePssShare),
    });
    notes.push(`vm clone PSS ${fmtMB(pss)} = ${(share * 100).toFixed(0)}% of its ${fmtMB(VM_RAM_BYTES)} RAM (template pages shared copy-on-write; QEMU's own heap and TCG code buffer included)`);
  } finally {
    await idle.close();
  }
}

/**
 * On the pool-less server: restores, and fork(1)/fork(5) on both runtimes side by side. The VM's
 * restores, its fork(5)s and its five restores at once alternate, so all see the same host.
 */
export async function measureVmUnpooled(bs: VmBenchServer, opts: VmOptions): Promise<void> {
  const runs = opts.quick ? 3 : 9;
  // The first VM create boots the template (not timed here).
  await (await Sandbox.create({ client: bs.client, runtime: 'vm' })).close();
  const nsRestores: number[] = [];
  for (let i = 0; i < runs; i++) nsRestores.push((await restoreOnce(bs, 'ns')).ms);

  await quietMachine();
  const parent = await Sandbox.create({ client: bs.client, runtime: 'vm' });
  let fork1: ForkSample[] = [];
  const restores: RestoreSample[] = [];
  const fork5: ForkSample[] = [];
  const restores5: number[] = [];
  const checkpoints: number[] = [];
  const restoresOfCheckpoint: number[] = [];
  try {
    await parent.runCode('import random\nstate = list(range(100000))');
    fork1 = await forkRuns(parent, 1, runs, 'vm');
    // Checkpoints (issue 23): a checkpoint is a fork child kept aside; a restore promotes it.
    for (let i = 0; i < runs; i++) {
      const { ms, value: cp } = await timed(() => parent.checkpoint());
      checkpoints.push(ms);
      restoresOfCheckpoint.push((await timed(() => parent.restore(cp))).ms);
      await parent.deleteCheckpoint(cp); // waits for the copy the restore keeps (untimed)
    }
    for (let i = 0; i < runs; i++) {
      restores.push(await restoreOnce(bs, 'vm'));
      await sleep(500);
      fork5.push(await forkOnce(parent, 5, 'vm'));
      restores5.push(await restoresAtOnce(bs, 5));
      await sleep(500);
    }
  } finally {
    await parent.close();
  }
  const rv = summarize(restores.map((r) => r.ms));
  rows.push(timingRow('vm: create, pool off (template restore)', rv, '– (TCG)', `ns: ${fmtMs(summarize(nsRestores).p50)} (bwrap start)`, '–'));
  rows.push(timingRow('vm: fork(1)', summarize(fork1.map((f) => f.ms)), '– (side by side)', '–', '–'));
  rows.push(timingRow('vm: checkpoint()', summarize(checkpoints), '– (beside fork(1))', '–', '–'));
  rows.push(timingRow('vm: restore(checkpoint)', summarize(restoresOfCheckpoint), '– (beside fork(1))', '–', '–'));
  const s = summarize(fork5.map((f) => f.ms));
  const ratio = s.p50 / rv.p50;
  const ok = ratio <= VM_TARGET.fork5VsRestore && s.p50 <= VM_TARGET.fork5Ms;
  rows.push(timingRow('vm: fork(5)', s, `≤ ${VM_TARGET.fork5VsRestore}× restore, ≤ ${VM_TARGET.fork5Ms} ms`, `${ratio.toFixed(1)}× restore`, status(ok)));
  // What five VMs restored side by side take on this host: the floor under a fork(5), whose
  // children are five restores running at once.
  const r5 = summarize(restores5);
  rows.push(timingRow('vm: 5 restores at once (pool off)', r5, '– (side by side)', `${(r5.p50 / rv.p50).toFixed(1)}× restore; fork(5) ${(s.p50 / r5.p50).toFixed(2)}× this`, '–'));
  // Where the time goes: under TCG the work is CPU-bound, so the CPU a fork(5) uses, spread over
  // every core, is as fast as it can be on this host.
  const cores = os.availableParallelism();
  const forkCpu = median(fork5.map((f) => f.machineCpu));
  notes.push(`vm CPU, p50 of ${runs} (/proc, 10 ms ticks; restores and fork(5)s alternate): one restore ${fmtMs(median(restores.map((r) => r.machineCpu)))} on the machine (its QEMU ${fmtMs(median(restores.map((r) => r.qemuCpu)))}); ` +
    `one fork(5) ${fmtMs(forkCpu)} (the 5 children's QEMUs ${fmtMs(median(fork5.map((f) => f.childrenCpu)))}, the parent's QEMU ${fmtMs(median(fork5.map((f) => f.parentCpu)))}, the rest: the server taking the parent's memory and its bookkeeping, launch helpers), machine idle meanwhile ${fmtMs(median(fork5.map((f) => f.idle)))}; ` +
    `that CPU over ${cores} cores alone takes ${fmtMs(forkCpu / cores)} = ${(forkCpu / cores / rv.p50).toFixed(1)}× the restore`);

  const nsParent = await Sandbox.create({ client: bs.client, runtime: 'ns' });
  try {
    await nsParent.runCode('import random\nstate = list(range(100000))');
    for (const n of [1, 5]) {
      rows.push(timingRow(`ns: fork(${n})`, summarize((await forkRuns(nsParent, n, runs, 'ns')).map((f) => f.ms)), '– (side by side)', '–', '–'));
    }
  } finally {
    await nsParent.close();
  }
}

interface RestoreSample {
  ms: number;
  /** CPU the whole machine used meanwhile, and the new VM's QEMU. */
  machineCpu: number;
  qemuCpu: number;
}

/** One create with the pool off (a VM: a clone restored from the template), closed after. */
async function restoreOnce(bs: VmBenchServer, runtime: 'vm' | 'ns'): Promise<RestoreSample> {
  const before = machineCpuMs();
  const { ms, value } = await timed(() => Sandbox.create({ client: bs.client, runtime }));
  const machineCpu = machineCpuMs().busy - before.busy;
  const [qemuCpu = NaN] = runtime === 'vm' ? await qemuCpuMs([value.id]) : [];
  await value.close();
  return { ms, machineCpu, qemuCpu };
}

/** Five creates at once with the pool off (five clones restored side by side), closed after. */
async function restoresAtOnce(bs: VmBenchServer, n: number): Promise<number> {
  const { ms, value } = await timed(() => Promise.all(Array.from({ length: n }, () => Sandbox.create({ client: bs.client, runtime: 'vm' }))));
  await Promise.all(value.map((v) => v.close()));
  return ms;
}

interface ForkSample {
  ms: number;
  machineCpu: number;
  idle: number;
  childrenCpu: number;
  parentCpu: number;
}

/** One fork(n) of `parent`; the children are closed (and their teardown let finish) after. */
async function forkOnce(parent: Sandbox, n: number, runtime: 'vm' | 'ns'): Promise<ForkSample> {
  // The /proc scans stay out of the machine's figures: before it is read, and after.
  const [parentBefore = NaN] = runtime === 'vm' ? await qemuCpuMs([parent.id]) : [];
  const before = machineCpuMs();
  const { ms, value: kids } = await timed(() => parent.fork(n));
  const after = machineCpuMs();
  const [parentAfter = NaN, ...children] = runtime === 'vm' ? await qemuCpuMs([parent.id, ...kids.map((k) => k.id)]) : [];
  const sample = {
    ms,
    machineCpu: after.busy - before.busy,
    idle: after.idle - before.idle,
    childrenCpu: runtime === 'vm' ? children.reduce((sum, c) => sum + c, 0) : NaN,
    parentCpu: parentAfter - parentBefore,
  };
  await Promise.all(kids.map((k) => k.close()));
  await sleep(runtime === 'vm' ? 500 : 100); // let the teardowns finish before the next timed fork
  return sample;
}

async function forkRuns(parent: Sandbox, n: number, runs: number, runtime: 'vm' | 'ns'): Promise<ForkSample[]> {
  const samples: ForkSample[] = [];
  for (let i = 0; i < runs; i++) samples.push(await forkOnce(parent, n, runtime));
  return samples;
}
