/**
 * Every process of a sandbox made by fork (a pool refill or a pool miss forked from the zygote, a
 * user's fork) runs in that sandbox's own cgroups, with the limits its creator asked for, from its
 * first exec on. What an attacker would try: create sandboxes in a burst with a small memory limit
 * and allocate past it at once, hoping for a process still in the zygote's (or the parent's)
 * groups, or a limit set before the sandbox had groups to set it on.
 *
 * Checked from the host: each process in the sandbox's pid namespace (found through the namespace
 * the sandbox reports) is in `podflare/<scope>/<id>` of every controller; and from the inside: an
 * allocation past the limit fails.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

const LIMIT_MB = 256;
/** Past the limit by far: succeeds only outside the sandbox's memory group (the default is 1 GB). */
const ALLOC_MB = 600;

/** The controllers (cgroup v1 hierarchies, or v2's one) whose membership is checked. */
function controllers(): string[] {
  if (existsSync('/sys/fs/cgroup/cgroup.controllers')) return [''];
  return ['memory', 'pids', 'cpu'];
}

/** This server's cgroup scope (cgroups.ts: a hash of its state directory). */
function scopeOf(server: TestServer): string {
  return createHash('sha256').update(path.resolve(server.stateDir)).digest('hex').slice(0, 12);
}

/** Host pids of the processes in the pid namespace named `ns` (`pid:[inode]`). */
function processesInNamespace(ns: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      if (readlinkSync(`/proc/${name}/ns/pid`) === ns) out.push(Number(name));
    } catch { /* gone, or a kernel thread */ }
  }
  return out;
}

/** The group of `pid` in each controller, from /proc/<pid>/cgroup (v1: `id:controllers:path`). */
function groupsOf(pid: number): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').filter(Boolean)) {
    const [, names, group] = line.split(':') as [string, string, string];
    for (const c of names.split(',')) out.set(c, group);
  }
  return out;
}

/**
 * Processes of the sandbox not in its own groups, as `pid controller group` lines. The exec that
 * reports the namespace started the sandbox's interpreter, so its supervisor and worker both exist.
 */
async function strays(server: TestServer, sbx: Sandbox): Promise<string[]> {
  const r = await sbx.runCode("import os; print(os.readlink('/proc/self/ns/pid'))");
  assert.equal(r.error, undefined, r.stderr);
  const pids = processesInNamespace(r.stdout.trim());
  assert.ok(pids.length >= 2, `the sandbox's supervisor and worker (found ${pids.length})`);
  const want = `/podflare/${scopeOf(server)}/${sbx.id}`;
  const out: string[] = [];
  for (const pid of pids) {
    let groups: Map<string, string>;
    try {
      groups = groupsOf(pid);
    } catch {
      continue; // ended meanwhile
    }
    for (const c of controllers()) if (groups.get(c) !== want) out.push(`${pid} ${c || 'unified'} ${groups.get(c)}`);
  }
  return out;
}

/** Allocates (and touches) ALLOC_MB: it must fail under LIMIT_MB. Null when it did fail. */
async function allocationPastLimit(sbx: Sandbox): Promise<string | null> {
  const r = await sbx.runCode(`x = bytearray(${ALLOC_MB} * 1024 * 1024); print(len(x))`, { timeoutMs: 60_000 }).catch((e: Error) => e);
  if (r instanceof Error) return null; // the interpreter was killed: the limit held
  return r.error ? null : `${sbx.id}: a ${ALLOC_MB} MB allocation succeeded under a ${LIMIT_MB} MB limit`;
}

/** The sandboxes' findings: each is in its groups, and cannot allocate past its limit. */
async function check(server: TestServer, boxes: Sandbox[]): Promise<string[]> {
  const found: string[] = [];
  for (const sbx of boxes) {
    assert.equal((await sbx.info()).limits.memoryMb, LIMIT_MB);
    for (const s of await strays(server, sbx)) found.push(`${sbx.id}: ${s}`);
    const past = await allocationPastLimit(sbx);
    if (past) found.push(past);
  }
  return found;
}

describe('processes of forked sandboxes stay in their own cgroups', () => {
  let server: TestServer;
  let poolOff: TestServer;
  const opened: Sandbox[] = [];

  before(async () => {
    // A pool smaller than the burst (and kept at its size): some creates are served by refills
    // forked from the zygote, the others are misses forked from it on demand.
    server = await startTestServer({ poolSize: 2, poolMaxSize: 2 });
    // Without a pool every create is a miss forked from the zygote.
    poolOff = await startTestServer({ poolSize: 0 });
    await server.manager.waitPoolFull(120_000);
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await server?.stop();
    await poolOff?.stop();
  });

  it('a burst of creates with a memory limit: every process in its own groups, the limit enforced', async () => {
    const findings: string[] = [];
    const served = { hits: 0, misses: 0 };
    for (let round = 0; round < 3; round++) {
      const boxes = await Promise.all(Array.from({ length: 6 }, () => Sandbox.create({ host: server.url, limits: { memoryMb: LIMIT_MB } })));
      opened.push(...boxes);
      for (const b of boxes) served[b.pool?.hit ? 'hits' : 'misses']++;
      findings.push(...await check(server, boxes));
      await Promise.all(boxes.map((b) => b.close()));
    }
    assert.ok(served.hits > 0 && served.misses > 0, `both pooled sandboxes and misses were checked (${JSON.stringify(served)})`);
    assert.deepEqual(findings, []);
  });

  it('the first exec of a sandbox created on a miss already runs under its limit', async () => {
    const findings: string[] = [];
    for (let round = 0; round < 2; round++) {
      const boxes = await Promise.all(Array.from({ length: 4 }, () => Sandbox.create({ host: poolOff.url, limits: { memoryMb: LIMIT_MB } })));
      opened.push(...boxes);
      assert.ok(boxes.every((b) => b.pool?.hit === false));
      // The allocation is the very first exec: nothing has waited for the sandbox to settle.
      for (const past of await Promise.all(boxes.map(allocationPastLimit))) if (past) findings.push(past);
      for (const b of boxes) for (const s of await strays(poolOff, b)) findings.push(`${b.id}: ${s}`);
      await Promise.all(boxes.map((b) => b.close()));
    }
    assert.deepEqual(findings, []);
  });

  it('a burst of forks of a limited sandbox: every child in its own groups, the limit enforced', async () => {
    const parent = await Sandbox.create({ host: server.url, limits: { memoryMb: LIMIT_MB } });
    opened.push(parent);
    await parent.runCode('state = 41');
    const findings: string[] = [];
    for (let round = 0; round < 2; round++) {
      const children = (await Promise.all([parent.fork(3), parent.fork(2)])).flat();
      opened.push(...children);
      // First exec of each child: the allocation, all at once.
      for (const past of await Promise.all(children.map(allocationPastLimit))) if (past) findings.push(past);
      findings.push(...await check(server, children));
      await Promise.all(children.map((c) => c.close()));
    }
    assert.deepEqual(findings, []);
  });
});
