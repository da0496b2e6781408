/**
 * Every runtime driver passes the conformance suite (test/helpers/conformance.ts): the namespace
 * runtime, a toy third driver that runs the agent as a plain host process (test/drivers/
 * host-process, plugged in with one registry line), and the VM runtime (TCG here: one server, its
 * template booted once). Also: the registry's own rules, and the runtime names written in one place.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { describe, it } from 'node:test';
import { builtinRuntimes } from '@podflare/server';
import { Sandbox } from 'podflare';
import { runtimeConformance } from './helpers/conformance.js';
import { startTestServer } from './helpers/server.js';
import { hostProcessDriver } from './drivers/host-process/driver.js';

/** The one line that plugs the toy driver in. */
const withToy = () => builtinRuntimes().with('host', hostProcessDriver);

runtimeConformance({ runtime: 'ns', start: () => startTestServer({ runtime: 'ns', poolSize: 1 }) });

runtimeConformance({ runtime: 'host', start: () => startTestServer({ runtime: 'host', poolSize: 1 }, { runtimes: withToy() }) });

runtimeConformance({ runtime: 'vm', timeoutMs: 300_000, start: () => startTestServer({ runtime: 'vm', poolSize: 1 }) });

describe('the runtime registry', () => {
  it('a driver plugged in beside the built-in ones is offered alongside them; unknown names get the same 400 as before', async () => {
    const server = await startTestServer({ poolSize: 0 }, { runtimes: withToy() });
    try {
      const toy = await Sandbox.create({ host: server.url, runtime: 'host' });
      assert.equal((await toy.info()).runtime, 'host');
      assert.equal((await toy.runCode('import os; os.getuid()')).text, '65534', 'the toy agent runs as nobody');
      await toy.close();
      const res = await fetch(`${server.url}/v1/sandboxes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"runtime":"nope"}' });
      assert.equal(res.status, 400);
      assert.deepEqual(await res.json(), { code: 'bad_request', field: 'runtime', error: 'runtime: Invalid option: expected one of "ns"|"vm"|"host"|"auto"' });
    } finally {
      await server.stop();
    }
  });

  it('refuses a duplicate or malformed driver name, and a configured runtime no driver has, naming the choices', async () => {
    assert.throws(() => builtinRuntimes().with('ns', hostProcessDriver), /already registered/);
    assert.throws(() => builtinRuntimes().with('auto', hostProcessDriver), /invalid runtime driver name/);
    assert.throws(() => builtinRuntimes().with('Bad Name', hostProcessDriver), /invalid runtime driver name/);
    await assert.rejects(startTestServer({ runtime: 'nope' }), /runtime must be ns, vm or auto, got "nope"/);
  });

  it('writes the built-in runtime names in one place (packages/server/src/runtime/drivers.ts)', () => {
    // A closed set of names spelt out ('ns' | 'vm', ['ns', 'vm', ...]) anywhere else in the code.
    const closedSet = String.raw`'ns' \| 'vm'|\['ns', 'vm'|[!=]== '(ns|vm)'|"ns" \| "vm"`;
    let hits = '';
    try {
      hits = execFileSync('grep', ['-rnE', closedSet, 'packages', '--include=*.ts', '--include=*.tsx', '--exclude-dir=dist', '--exclude-dir=node_modules'],
        { encoding: 'utf8', cwd: new URL('..', import.meta.url).pathname });
    } catch (err) {
      if ((err as { status?: number }).status !== 1) throw err; // 1: no line matched
    }
    assert.equal(hits.trim(), '');
  });
});
