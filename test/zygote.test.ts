/**
 * Zygotes (packages/server/src/zygote.ts): pool refills and pool misses are forks of a pre-warmed
 * sandbox that has imported the template's modules. What a user can check: the sandboxes come with
 * pandas already imported, yet each is an independent, fresh sandbox (its own hostname, randomness,
 * files, no parent); without a pool a create is still served by the zygote; a zygote that dies is
 * replaced; a stopped server leaves nothing behind.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { cgroupScopesOf, forkLayersIn, overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer, type TestServer } from './helpers/server.js';

/** What the tests' zygotes import (the data stack, as an operator of a data-heavy server sets it). */
const DATA_STACK = ['numpy', 'pandas', 'matplotlib', 'matplotlib.pyplot'];

const PROBE = [
  'import sys, os, socket, random, uuid, json, time',
  "preloaded = [m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules]",
  "t = time.perf_counter(); import pandas; pandas_ms = (time.perf_counter() - t) * 1000",
  "def walk(top):",
  "    out = []",
  "    for d, dirs, files in os.walk(top):",
  "        out += [os.path.join(d, n) for n in dirs + files]",
  "    return sorted(out)",
  'print(json.dumps({',
  "  'hostname': socket.gethostname(), 'random': random.random(), 'uuid': str(uuid.uuid4()),",
  "  'numpy_random': float(__import__('numpy').random.rand()),",
  "  'preloaded': preloaded,",
  "  'pandas_ms': pandas_ms, 'env': sorted(k for k in os.environ if 'ZYGOTE' in k or 'PRELOAD' in k),",
  "  'user_globals': sorted(k for k in globals() if not k.startswith('_')),",
  "  'files': walk('/root') + walk('/tmp') + walk('/home'),",
  '}))',
].join('\n');

interface Probe {
  hostname: string; random: number; uuid: string; numpy_random: number; preloaded: string[]; pandas_ms: number;
  env: string[]; user_globals: string[]; files: string[];
}

async function probe(sbx: Sandbox): Promise<Probe> {
  // A fresh namespace first: the probe's own names are not what a new sandbox holds.
  const seen = await sbx.runCode("print(sorted(k for k in globals() if not k.startswith('_')))");
  const r = await sbx.runCode(PROBE);
  assert.equal(r.error, undefined, r.stderr);
  return { ...(JSON.parse(r.stdout) as Probe), user_globals: JSON.parse(seen.stdout.replace(/'/g, '"')) as string[] };
}

async function metric(server: TestServer, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(server.url + '/v1/metrics')).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  const line = text.split('\n').find((l) => l.startsWith(name + '{') && want.every((w) => l.includes(w)));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
}

async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Host pids of the zygotes of this server: PID 1 of a sandbox whose own environment names the preload. */
function zygotePids(server: TestServer): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const env = readFileSync(`/proc/${name}/environ`, 'latin1').split('\0');
      if (!env.some((e) => e.startsWith('PODFLARE_ZYGOTE_PRELOAD='))) continue;
      const id = env.find((e) => e.startsWith('PODFLARE_SANDBOX_ID='))?.split('=')[1];
      const nspid = /^NSpid:\s+(.+)$/m.exec(readFileSync(`/proc/${name}/status`, 'utf8'))?.[1]?.trim().split(/\s+/) ?? [];
      // The zygote's PID 1 is one level down; its children (same environment block) two.
      if (id && nspid.length === 2 && nspid[1] === '1' && existsSync(`${server.stateDir}/sandboxes/${id}`)) out.push(Number(name));
    } catch { /* gone */ }
  }
  return out;
}

describe('sandboxes forked from a zygote', () => {
  let pooled: TestServer;
  let cold: TestServer;
  const opened: Sandbox[] = [];

  before(async () => {
    pooled = await startTestServer({ poolSize: 2, defaultTemplatePreload: DATA_STACK });
    cold = await startTestServer({ poolSize: 0, zygote: false });
    await pooled.manager.waitPoolFull(120_000);
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await pooled?.stop();
    await cold?.stop();
  });

  it('come with the template\'s modules imported, yet each is a fresh, independent sandbox', async () => {
    const [a, b] = await Promise.all([Sandbox.create({ host: pooled.url }), Sandbox.create({ host: pooled.url })]);
    const fresh = await Sandbox.create({ host: cold.url });
    opened.push(a!, b!, fresh);
    assert.deepEqual(a!.pool, { hit: true });
    const [pa, pb, pf] = [await probe(a!), await probe(b!), await probe(fresh)];
    // Imported in the zygote: already there, and `import pandas` is a lookup.
    assert.deepEqual(pa.preloaded, ['numpy', 'pandas', 'matplotlib']);
    assert.ok(pa.pandas_ms < 5, `import pandas took ${pa.pandas_ms} ms`);
    assert.deepEqual(pf.preloaded, []);
    // Their own identity and randomness.
    assert.notEqual(pa.hostname, pb.hostname);
    assert.equal(pa.hostname, `sbx-${a!.id.slice(4, 16)}`);
    assert.notEqual(pa.random, pb.random);
    assert.notEqual(pa.uuid, pb.uuid);
    assert.notEqual(pa.numpy_random, pb.numpy_random);
    // Nothing of the zygote's shows: no preload variable, no names in the user's namespace, the
    // files of a fresh sandbox (the probe's import of pandas aside, which writes nothing here).
    assert.deepEqual(pa.env, []);
    assert.deepEqual(pa.user_globals, pf.user_globals);
    assert.deepEqual(pa.files, pf.files);
    // No lineage: a new sandbox, not a fork of anything a user can see.
    const info = await a!.info();
    assert.equal(info.parent, null);
    assert.deepEqual(info.children, []);
  });

  it('share no files and keep their own limits', async () => {
    const a = await Sandbox.create({ host: pooled.url });
    const b = await Sandbox.create({ host: pooled.url, limits: { memoryMb: 300 } });
    opened.push(a, b);
    await a.runCode("open('/root/mine.txt', 'w').write('a')");
    const seen = await b.runCode("import os; print(os.path.exists('/root/mine.txt'))");
    assert.equal(seen.stdout, 'False\n');
    assert.equal((await b.info()).limits.memoryMb, 300);
    // 300 MB is enforced in b: a 400 MB allocation dies there, and a is untouched.
    const big = await b.runCode('x = bytearray(400 * 1024 * 1024)');
    assert.ok(big.error, 'a 400 MB allocation should fail under a 300 MB limit');
    assert.equal((await a.runCode("print(open('/root/mine.txt').read())")).stdout, 'a\n');
  });

  it('a fork of one is an ordinary fork: its child has it, not the zygote, as parent', async () => {
    const a = await Sandbox.create({ host: pooled.url });
    opened.push(a);
    await a.runCode('x = 41');
    const [child] = await a.fork(1);
    opened.push(child!);
    assert.equal((await child!.runCode('print(x + 1)')).stdout, '42\n');
    assert.equal((await child!.info()).parent, a.id);
  });

  it('without a pool, a create is served by the zygote (a pool miss, not a cold start)', async () => {
    const off = await startTestServer({ poolSize: 0, defaultTemplatePreload: DATA_STACK });
    try {
      await until('the zygote', async () => (await metric(off, 'podflare_zygote_ready', { template: 'default' })) === 1, 120_000);
      const sbx = await Sandbox.create({ host: off.url });
      assert.deepEqual(sbx.pool, { hit: false, missReason: 'pool_off' });
      assert.deepEqual((await probe(sbx)).preloaded, ['numpy', 'pandas', 'matplotlib']);
      assert.equal(await metric(off, 'podflare_zygote_forks_total', { template: 'default' }), 1);
      await sbx.close();
    } finally {
      await off.stop();
    }
  });

  it('a zygote that dies is replaced, and creates go on', async () => {
    const [pid] = zygotePids(pooled);
    assert.ok(pid, 'the zygote is running');
    process.kill(pid, 'SIGKILL');
    await until('a new zygote', async () => (await metric(pooled, 'podflare_zygote_starts_total', { template: 'default' })) === 2
      && (await metric(pooled, 'podflare_zygote_ready', { template: 'default' })) === 1, 120_000);
    const [other] = zygotePids(pooled);
    assert.ok(other && other !== pid);
    const forks = await metric(pooled, 'podflare_zygote_forks_total', { template: 'default' });
    const sbx = await Sandbox.create({ host: pooled.url });
    opened.push(sbx);
    assert.equal((await sbx.runCode("import sys; print('pandas' in sys.modules)")).stdout, 'True\n');
    await until('the pool refilled from the new zygote', async () => (await metric(pooled, 'podflare_zygote_forks_total', { template: 'default' })) > forks);
  });

  it('the default template preloads its light list; a stopped server leaves no process, mount, directory or cgroup behind', async () => {
    const server = await startTestServer({ poolSize: 2 });
    await server.manager.waitPoolFull(120_000);
    const sbx = await Sandbox.create({ host: server.url });
    // The default template's own list: light standard-library modules, not the data stack (forks stay small).
    const modules = await sbx.runCode("import sys; print('statistics' in sys.modules, 'decimal' in sys.modules, 'pandas' in sys.modules)");
    assert.equal(modules.stdout, 'True True False\n');
    await sbx.fork(1); // a grandchild of the zygote: its husk must go too
    const zygotes = zygotePids(server);
    assert.equal(zygotes.length, 1);
    await server.stop();
    assert.deepEqual(processesMentioning(server.stateDir), []);
    assert.ok(!existsSync(`/proc/${zygotes[0]}`) || readFileSync(`/proc/${zygotes[0]}/stat`, 'utf8').includes(') Z'), 'the zygote is gone');
    assert.deepEqual(overlayMountsUnder(server.stateDir), []);
    assert.deepEqual(sandboxDirsIn(server.stateDir), []);
    assert.deepEqual(forkLayersIn(server.stateDir), []);
    assert.deepEqual(cgroupScopesOf(server.stateDir), []);
  });
});

describe('a pool sized from the create rate', () => {
  it('grows while creates come faster than it refills, and shrinks back to its size once idle', async () => {
    const server = await startTestServer({ poolSize: 1, poolMaxSize: 4, poolIdleSeconds: 3 });
    try {
      await server.manager.waitPoolFull(120_000);
      const target = () => server.manager.poolStats.find((p) => p.template === 'default' && p.egress)?.target ?? 0;
      let grown = 0;
      for (let i = 0; i < 20; i++) {
        const sbx = await Sandbox.create({ host: server.url });
        await sbx.close();
        grown = Math.max(grown, target());
      }
      assert.ok(grown > 1 && grown <= 4, `the pool target went to ${grown}`);
      await until('the pool back at its size', () => target() === 1 && (server.manager.poolStats[0]?.ready ?? 0) <= 1, 60_000);
    } finally {
      await server.stop();
    }
  });
});
