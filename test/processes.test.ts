/** Background processes: started beside the interpreter, streamed from any offset, stdin, kill, fork. */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { BadRequestError, NotFoundError, Sandbox } from 'podflare';
import { type TestServer, useServerAndSandbox } from './helpers/server.js';

/** Host processes whose command line contains `marker` (the sandbox's processes are visible from the host). */
function hostProcessesWith(marker: string): number[] {
  const found: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(marker)) found.push(Number(name));
    } catch { /* gone */ }
  }
  return found;
}

async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(100);
  }
  assert.fail(`timed out waiting for ${what}`);
}

describe('background processes', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  useServerAndSandbox((s, b) => { server = s; sbx = b; });

  it('a dev server runs in the background across execs and answers inside the sandbox', async () => {
    const dev = await sbx.commands.run('exec python3 -u -m http.server 8123 --bind 127.0.0.1', { background: true, cwd: '/tmp' });
    await until('the dev server', async () => (await sbx.runCode(
      'import urllib.request\ntry:\n    print(urllib.request.urlopen("http://127.0.0.1:8123/").status)\nexcept OSError:\n    print("no")')).stdout === '200\n');
    for (let i = 0; i < 3; i++) assert.equal((await sbx.runCode(`print(${i} * 2)`)).stdout, `${i * 2}\n`);
    const listed = (await sbx.commands.list()).find((p) => p.pid === dev.pid);
    assert.ok(listed?.running, 'listed as running');
    assert.equal(listed.cwd, '/tmp');
    // A reconnecting client (a fresh handle from the pid) reads the log from offset 0.
    const again = await sbx.commands.connect(dev.pid);
    await until('the request log line', () => again.stderr.includes('"GET / HTTP/1.1" 200'));
    assert.equal(await dev.kill(), true);
    const result = await dev.wait();
    assert.equal(result.exitCode, 137);
    assert.match(result.stderr, /GET \/ HTTP\/1\.1" 200/);
    assert.equal((await again.wait()).stderr, result.stderr);
  });

  it('foreground commands return output and exit code; cwd, envs and stdin work', async () => {
    const r = await sbx.commands.run('echo "$PWD $GREETING"; echo oops >&2; exit 3', { cwd: '/etc', envs: { GREETING: 'hi' } });
    assert.deepEqual([r.stdout, r.stderr, r.exitCode], ['/etc hi\n', 'oops\n', 3]);
    const cat = await sbx.commands.run('read a; read b; echo "$b-$a"', { background: true });
    await cat.sendStdin('one\n');
    await sbx.commands.sendStdin(cat.pid, 'two\n', { eof: true });
    assert.equal((await cat.wait()).stdout, 'two-one\n');
  });

  it('runs while an exec is busy (it does not wait in the exec queue)', async () => {
    const busy = sbx.runCode('import time\ntime.sleep(3)\nprint("slept")');
    await sleep(300);
    const t0 = Date.now();
    const r = await sbx.commands.run('echo beside');
    assert.equal(r.stdout, 'beside\n');
    assert.ok(Date.now() - t0 < 2500, `took ${Date.now() - t0} ms: it waited for the exec`);
    assert.equal((await busy).stdout, 'slept\n');
  });

  it('output from any offset, and what the bounded log dropped is reported', async () => {
    const p = await sbx.commands.run('for i in $(seq 1 2000); do echo line-$i; done', { background: true, logChars: 4096 });
    const r = await p.wait();
    assert.equal(r.exitCode, 0);
    const info = await sbx.commands.get(p.pid);
    assert.equal(info.logEnd, Array.from({ length: 2000 }, (_, i) => `line-${i + 1}\n`).join('').length);
    const events = [];
    for await (const ev of sbx.commands.output(p.pid, { offset: 0 })) events.push(ev);
    assert.equal(events[0]!.type, 'lost');
    assert.equal(events[0]!.data, info.logStart);
    const kept = events.filter((e) => e.type === 'stdout').map((e) => e.data).join('');
    assert.ok(kept.length <= 4096 && kept.endsWith('line-2000\n'), kept.slice(-50));
    const from = info.logEnd - 10;
    const tail = [];
    for await (const ev of sbx.commands.output(p.pid, { offset: from })) if (ev.type === 'stdout') tail.push(ev.data);
    assert.equal(tail.join(''), 'line-2000\n');
  });

  it('a process that floods its log does not block the sandbox', async () => {
    const flood = await sbx.commands.run('yes flooding-the-log', { background: true, logChars: 64 * 1024 });
    await sleep(1000);
    const t0 = Date.now();
    assert.equal((await sbx.runCode('print(6 * 7)')).stdout, '42\n');
    assert.equal((await sbx.commands.run('echo still')).stdout, 'still\n');
    assert.ok(Date.now() - t0 < 20_000);
    const info = await sbx.commands.get(flood.pid);
    assert.ok(info.running && info.logEnd > 64 * 1024, `logEnd ${info.logEnd}`);
    assert.ok(info.logEnd - info.logStart <= 64 * 1024);
    await flood.kill();
    flood.disconnect();
  });

  it('kill takes the process group: nothing is left behind', async () => {
    const p = await sbx.commands.run('sleep 301 & sleep 302 & wait', { background: true });
    await until('the sleeps', () => hostProcessesWith('sleep\u0000301').length === 1 && hostProcessesWith('sleep\u0000302').length === 1);
    assert.equal(await sbx.commands.kill(p.pid), true);
    assert.equal((await p.wait()).exitCode, 137);
    await until('no sleep left', () => hostProcessesWith('sleep\u0000301').length + hostProcessesWith('sleep\u0000302').length === 0, 10_000);
    assert.equal(await sbx.commands.kill(p.pid), false, 'a second kill finds it ended');
  });

  it('a fork child does not get its parent\'s processes; the parent keeps them', async () => {
    const p = await sbx.commands.run('sleep 303', { background: true });
    const [child] = await sbx.fork(1);
    try {
      assert.deepEqual(await child!.commands.list(), []);
      await assert.rejects(child!.commands.get(p.pid), NotFoundError);
      assert.equal((await sbx.commands.get(p.pid)).running, true);
      assert.equal(hostProcessesWith('sleep\u0000303').length, 1, 'the sleep is not copied');
    } finally {
      await child!.close();
    }
    await p.kill();
  });

  it('processes die with their sandbox', async () => {
    const other = await Sandbox.create({ host: server.url });
    await other.commands.run('sleep 304', { background: true });
    await until('the sleep', () => hostProcessesWith('sleep\u0000304').length === 1);
    await other.close();
    await until('no orphan', () => hostProcessesWith('sleep\u0000304').length === 0, 10_000);
  });

  it('bad input is a 4xx naming the problem', async () => {
    await assert.rejects(sbx.commands.get(999_999), NotFoundError);
    await assert.rejects(sbx.commands.run(''), BadRequestError);
    await assert.rejects(sbx.commands.run('true', { cwd: '/no/such/dir' }), (e: Error) => e instanceof BadRequestError && /cwd/.test(e.message));
    await assert.rejects(sbx.commands.signal(1, 'SIGNOPE'), BadRequestError);
    const res = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/processes/abc/output`);
    assert.equal(res.status, 400);
    assert.match(((await res.json()) as { error: string }).error, /process id/);
  });
});
