/**
 * Crash safety: `podflare serve` killed with SIGKILL while its sandboxes work (execs in flight, a
 * fork, child processes), then restarted on the same state directory, several times over. After
 * each restart every sandbox of the killed server is either working (adopted: its holder kept it
 * alive) or recorded `lost` with nothing left of it: no process, no mount, no directory, no fork layer. The 100-cycle version
 * under load is in the bench (`npm run bench -- --only crash`).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startServe, crashCycle, type ServeProcess } from './helpers/serve.js';
import { Sandbox } from 'podflare';
import { cgroupScopesOf, forkLayersIn, overlayMountsUnder, processesMentioning, sandboxDirsIn } from './helpers/leaks.js';
import { startTestServer } from './helpers/server.js';

const CYCLES = Number(process.env.PODFLARE_CRASH_CYCLES ?? 5);

describe('crash safety', () => {
  let stateDir: string;
  let serve: ServeProcess | undefined;

  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-crash-'));
  });
  after(async () => {
    // A keep-mode server leaves its sandboxes running: a destroying one takes them over and ends them.
    await serve?.kill9();
    const last = await startServe(stateDir, { poolSize: 0 });
    await last.stop().catch(() => last.kill9());
    await rm(stateDir, { recursive: true, force: true });
  });

  it(`reconciles after ${CYCLES} kill -9 / restart cycles: every sandbox working or fully cleaned up`, async () => {
    // A neighbour: another server on this host, with its own state directory, a sandbox with
    // egress (slirp4netns) and a fork (the host helper). Reconciliation must leave it alone.
    const neighbour = await startTestServer({ poolSize: 0 });
    const next = await Sandbox.create({ host: neighbour.url });
    await next.runCode('y = 7');
    const [nextChild] = await next.fork(1);
    // Keep mode: the killed server's sandboxes live on under their holders, for the next one to adopt.
    serve = await startServe(stateDir, { onStop: 'keep' });
    let previous: Awaited<ReturnType<typeof crashCycle>> | null = null;
    for (let cycle = 0; cycle < CYCLES; cycle++) {
      const result = await crashCycle(serve, stateDir);
      serve = result.restarted;
      assert.ok(result.sandboxes.length >= 4, 'the cycle made its sandboxes');
      assert.deepEqual(result.problems, [], `cycle ${cycle}: nothing left of the killed server's sandboxes`);
      for (const s of result.verdicts) {
        assert.ok(s.state === 'lost' || s.working, `${s.id}: state ${s.state}, working ${s.working}`);
      }
      // Sandboxes of earlier cycles: adopted again (still working), or lost for good, never resurrected.
      if (previous) {
        for (const v of previous.verdicts) {
          const { state } = await serve.info(v.id);
          if (!v.working) assert.equal(state, 'lost');
          else assert.ok(state === 'lost' || (await serve.run(v.id, 'print(1)').catch(() => '')) === '1\n', `${v.id}: ${state}`);
        }
      }
      previous = result;
    }
    assert.equal((await next.runCode('print(y * 6)')).stdout, '42\n', "the neighbour's sandbox lives on");
    assert.equal((await nextChild!.runCode('print(y)')).stdout, '7\n', "the neighbour's fork lives on");
    await neighbour.stop();
    // And the last server, stopped normally (a destroying one, taking over the keeping one's
    // sandboxes), leaves nothing at all.
    await serve.kill9();
    serve = await startServe(stateDir, { poolSize: 0 });
    await serve.stop();
    serve = undefined;
    assert.deepEqual(processesMentioning(stateDir), []);
    assert.deepEqual(overlayMountsUnder(stateDir), []);
    assert.deepEqual(sandboxDirsIn(stateDir), []);
    assert.deepEqual(forkLayersIn(stateDir), []);
    assert.deepEqual(cgroupScopesOf(stateDir), []);
  });

  it('refuses a second server on a state directory in use', async () => {
    serve ??= await startServe(stateDir);
    const second = await startServe(stateDir).then((s) => s.stop().then(() => 'started'), (err: Error) => err.message);
    assert.match(second, /another podflare server \(pid \d+\) uses the state directory/);
    // The first one was not disturbed.
    const id = await serve.create();
    assert.equal(await serve.run(id, 'print(2+2)'), '4\n');
  });
});
