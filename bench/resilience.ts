/**
 * Load and crash measures, each against `podflare serve` run as a child process (the load
 * generator then does not share the server's event loop, and the server can be killed):
 *
 *   load   50 sandboxes, 8 concurrent clients each running `print(6*7)` in a loop for
 *          PODFLARE_BENCH_LOAD_SECONDS (default 60; 10 with --quick): zero errors expected;
 *          exec latency p50/p99 (queueing behind the sandbox's other clients included).
 *   crash  PODFLARE_BENCH_CRASH_CYCLES (default 100; 10 with --quick) cycles of: sandboxes at work
 *          (execs in flight, a fork, child processes), kill -9, restart on the same state dir;
 *          after each restart every sandbox must be working or fully cleaned up (no process,
 *          mount, cgroup, directory or fork layer left). p50/p99 of the restart (reconciliation included).
 *          The cycle's sandboxes that were adopted are deleted after it (they would pile up).
 *   survive PODFLARE_BENCH_SURVIVE_CYCLES (default 100; 10 with --quick) cycles of kill -9 and
 *          restart with PODFLARE_BENCH_SURVIVE_SANDBOXES (default 50) live sandboxes, each holding
 *          a variable, a quarter of them in the middle of an exec: every one must come back with
 *          its state (0 lost), nothing may pile up (holders, sandboxes' processes), and after the
 *          final destroy nothing is left. p50/p99 of restart-to-first-exec: the new server's
 *          spawn until an exec on an adopted sandbox has answered (aim: ≤ 500 ms p50).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Client, Sandbox } from 'podflare';
import { crashCycle, startServe, type ServeProcess } from '../test/helpers/serve.js';
import { forkLayersIn, overlayMountsUnder, processesMentioning, sandboxDirsIn } from '../test/helpers/leaks.js';
import { Failures, notes, rows, status, timingRow } from './report.js';
import { summarize } from './stats.js';

export const RESILIENCE_MEASURES = ['load', 'crash', 'survive'] as const;

const LOAD_SANDBOXES = Number(process.env.PODFLARE_BENCH_LOAD_SANDBOXES ?? 50);
const LOAD_CLIENTS = Number(process.env.PODFLARE_BENCH_LOAD_CLIENTS ?? 8);

/**
 * `onStop` 'keep' (the kill -9 measures: what they measure is adoption; a destroy-mode server's
 * sandboxes end with it): at the end a destroying server takes over what is left and ends it.
 */
async function withServe<T>(prefix: string, fn: (serve: ServeProcess, stateDir: string, swap: (s: ServeProcess) => void) => Promise<T>,
  onStop: 'keep' | 'destroy' = 'destroy'): Promise<T> {
  const stateDir = await mkdtemp(path.join(os.tmpdir(), prefix));
  let serve: ServeProcess | undefined;
  try {
    serve = await startServe(stateDir, { poolSize: 8, onStop });
    return await fn(serve, stateDir, (s) => { serve = s; });
  } finally {
    await serve?.stop().catch(() => serve?.kill9());
    if (onStop === 'keep') {
      const last = await startServe(stateDir, { poolSize: 0 }).catch(() => undefined);
      await last?.stop().catch(() => last.kill9());
    }
    await rm(stateDir, { recursive: true, force: true });
  }
}

export async function measureLoad(opts: { quick: boolean }): Promise<void> {
  const seconds = Number(process.env.PODFLARE_BENCH_LOAD_SECONDS ?? (opts.quick ? 10 : 60));
  await withServe('pf-load-', async (serve) => {
    const client = new Client({ host: serve.url, requestTimeoutMs: 120_000 });
    const failures = new Failures('load', Number.POSITIVE_INFINITY);
    const sandboxes: Sandbox[] = [];
    try {
      for (let i = 0; i < LOAD_SANDBOXES; i++) sandboxes.push(await Sandbox.create({ client }));
      const samples: number[] = [];
      const deadline = performance.now() + seconds * 1000;
      const loop = async (sbx: Sandbox) => {
        while (performance.now() < deadline) {
          const t0 = performance.now();
          const ex = await failures.attempt('runCode', () => sbx.runCode('print(6*7)'));
          if (!ex) continue;
          if (ex.stdout !== '42\n' || ex.exitCode !== 0) failures.record('runCode', new Error(`wrong answer: ${JSON.stringify(ex.stdout)} exit ${ex.exitCode}`));
          else samples.push(performance.now() - t0);
        }
      };
      const t0 = performance.now();
      await Promise.all(sandboxes.flatMap((s) => Array.from({ length: LOAD_CLIENTS }, () => loop(s))));
      const elapsed = (performance.now() - t0) / 1000;
      const s = summarize(samples);
      const label = `load: ${LOAD_SANDBOXES} sandboxes × ${LOAD_CLIENTS} clients, ${seconds} s`;
      rows.push(timingRow(label, s, 'zero errors', '–', failures.report(status(failures.count === 0))));
      notes.push(`load: ${s.n} execs in ${elapsed.toFixed(1)} s (${(s.n / elapsed).toFixed(0)}/s), ${failures.count} errors; ` +
        `latency includes waiting behind the same sandbox's other ${LOAD_CLIENTS - 1} clients (one exec at a time per sandbox)` +
        (failures.count ? `; errors: ${[...failures.messages].map(([m, n]) => `${n}× ${m}`).join('; ')}` : ''));
    } finally {
      await Promise.allSettled(sandboxes.map((s) => s.close()));
      client.close();
    }
  });
}

export async function measureCrashCycles(opts: { quick: boolean }): Promise<void> {
  const cycles = Number(process.env.PODFLARE_BENCH_CRASH_CYCLES ?? (opts.quick ? 10 : 100));
  await withServe('pf-crash-', async (first, stateDir, swap) => {
    let serve = first;
    const restarts: number[] = [];
    const problems: string[] = [];
    let lost = 0;
    let working = 0;
    for (let i = 0; i < cycles; i++) {
      const result = await crashCycle(serve, stateDir, { inflight: 4 });
      serve = result.restarted;
      swap(serve);
      restarts.push(result.restartMs);
      problems.push(...result.problems.map((p) => `cycle ${i}: ${p}`));
      lost += result.verdicts.filter((v) => v.state === 'lost').length;
      working += result.verdicts.filter((v) => v.working).length;
      // Adopted sandboxes would pile up over the cycles: this measure is about what is cleaned.
      for (const v of [...result.verdicts].reverse()) if (v.working) await serve.destroy(v.id).catch(() => undefined);
    }
    // The last server, stopped normally (a destroying one, taking over the keeping one's sandboxes), leaves nothing at all.
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 0 });
    swap(serve);
    await serve.stop();
    const left = [...processesMentioning(stateDir), ...overlayMountsUnder(stateDir), ...sandboxDirsIn(stateDir), ...forkLayersIn(stateDir)];
    if (left.length) problems.push(`after the final stop: ${left.join('; ')}`);
    const s = summarize(restarts);
    rows.push(timingRow(`crash: kill -9 + restart (${cycles} cycles), restart time`, s, 'nothing leaked', '–', status(problems.length === 0)));
    notes.push(`crash: ${cycles} cycles, ${lost} sandboxes recorded lost and cleaned, ${working} re-adopted working; ` +
      `${problems.length ? `${problems.length} problems: ${problems.slice(0, 5).join('; ')}` : 'no process, mount, cgroup, directory or fork layer left'}`);
    if (problems.length) throw new Error(`crash: ${problems.length} problems, first: ${problems[0]}`);
  }, 'keep');
}

/** Holders of this state directory's sandboxes still running (see packages/server/src/runtime/namespace/holder.ts). */
function holdersOf(stateDir: string): string[] {
  return processesMentioning(`${stateDir}/holders/`).filter((p) => p.includes('podflare_holder.py'));
}

export async function measureSurvival(opts: { quick: boolean }): Promise<void> {
  const cycles = Number(process.env.PODFLARE_BENCH_SURVIVE_CYCLES ?? (opts.quick ? 10 : 100));
  const count = Number(process.env.PODFLARE_BENCH_SURVIVE_SANDBOXES ?? 50);
  await withServe('pf-surv-', async (first, stateDir, swap) => {
    let serve = first;
    const ids: string[] = [];
    for (let i = 0; i < count; i += 10) {
      ids.push(...(await Promise.all(Array.from({ length: Math.min(10, count - i) }, () => serve.create({ egress: false })))));
    }
    await Promise.all(ids.map((id, i) => serve.run(id, `x = ${i}`)));
    const toFirstExec: number[] = [];
    const problems: string[] = [];
    let lost = 0;
    for (let c = 0; c < cycles; c++) {
      // At work when the server dies: a quarter of them in the middle of an exec.
      for (const id of ids.filter((_, i) => i % 4 === c % 4)) serve.runInFlight(id, 'import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.01)');
      await new Promise((r) => setTimeout(r, 200));
      await serve.kill9();
      const t0 = performance.now();
      serve = await startServe(stateDir, { poolSize: 8, onStop: 'keep' });
      swap(serve);
      const probe = ids[c % ids.length]!;
      const answer = await serve.run(probe, 'print(x)').catch((e: Error) => e.message);
      toFirstExec.push(performance.now() - t0);
      if (answer !== `${c % ids.length}\n`) problems.push(`cycle ${c}: ${probe} answered ${answer.slice(0, 200)}`);
      const answers = await Promise.all(ids.map((id) => serve.run(id, 'print(x)').catch((e: Error) => e.message)));
      answers.forEach((a, i) => {
        if (a === `${i}\n`) return;
        lost++;
        problems.push(`cycle ${c}: ${ids[i]} answered ${a.slice(0, 200)}`);
      });
      // Only one holder per sandbox (the pool's are rebuilt: count them in).
      const holders = holdersOf(stateDir).length;
      if (holders > count + 8 + 2) problems.push(`cycle ${c}: ${holders} holders for ${count} sandboxes and a pool of 8`);
      if (problems.length > 20) break;
    }
    for (const id of ids) await serve.destroy(id).catch((e: Error) => problems.push(`destroy ${id}: ${e.message}`));
    // A destroying server takes over what the keeping one has left (its pool's zygote) and ends it.
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 0 });
    swap(serve);
    await serve.stop();
    const left = [...processesMentioning(stateDir), ...overlayMountsUnder(stateDir), ...sandboxDirsIn(stateDir), ...forkLayersIn(stateDir)];
    if (left.length) problems.push(`after the final destroy and stop: ${left.slice(0, 5).join('; ')}`);
    const s = summarize(toFirstExec);
    rows.push(timingRow(`survive: kill -9 + restart with ${count} live sandboxes (${cycles} cycles), restart to first exec`, s, '≤ 500 ms p50, 0 lost',
      '– (E2B, Daytona: a restart loses the sandbox)', status(problems.length === 0 && s.p50 <= 500)));
    notes.push(`survive: ${cycles} cycles × ${count} sandboxes, ${lost} answers lost; ` +
      `${problems.length ? `${problems.length} problems: ${problems.slice(0, 5).join('; ')}` : 'every sandbox answered with its state after every restart; nothing left after the final destroy'}`);
    if (problems.length) throw new Error(`survive: ${problems.length} problems, first: ${problems[0]}`);
  }, 'keep');
}
