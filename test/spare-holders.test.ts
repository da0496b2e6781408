/**
 * Fork children's holders started ahead of need (packages/server/src/runtime/namespace/spare-holders.ts).
 * What an operator (and the next server) relies on: a fork child's holder carries the child's name
 * (its command line, socket and log: how a holder is recognised and killed, and adopted after a
 * restart), ending the child ends its holder, and a stopped server leaves no spare behind.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { processesMentioning } from './helpers/leaks.js';
import { startTestServer } from './helpers/server.js';

/** Holder processes of this state directory: pid → command line. */
function holders(stateDir: string): Map<number, string> {
  const out = new Map<number, string>();
  for (const name of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').join(' ');
      if (cmd.includes('podflare_holder.py') && cmd.includes(`${stateDir}/holders/`)) out.set(Number(name), cmd);
    } catch { /* gone */ }
  }
  return out;
}

async function until(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('spare fork holders', () => {
  it('wait after a first fork; a fork child\'s holder carries its name and ends with it; a stop leaves none', async () => {
    const server = await startTestServer({ poolSize: 0, zygote: false });
    const stateDir = server.stateDir;
    try {
      const parent = await Sandbox.create({ host: server.url });
      await parent.runCode('x = 41');
      await parent.fork(1); // the first fork starts the spares
      const spares = () => [...holders(stateDir).values()].filter((c) => c.includes('--spare') && /\/spr_[0-9a-f]{32}\.sock/.test(c));
      await until('spare holders', () => spares().length > 0);
      const [child] = await parent.fork(1);
      assert.equal((await child!.runCode('print(x + 1)')).stdout, '42\n');
      // Its holder names the child: command line, control socket, log (adoption and clean-up find it so).
      const own = [...holders(stateDir).entries()].filter(([, c]) => c.includes(`/holders/${child!.id}.sock`));
      assert.equal(own.length, 1, 'one holder names the child');
      const [pid, cmd] = own[0]!;
      assert.doesNotMatch(cmd, /spr_/);
      assert.ok(existsSync(`${stateDir}/holders/${child!.id}.sock`));
      assert.ok(existsSync(`${stateDir}/holders/${child!.id}.log`));
      assert.ok(!readdirSync(`${stateDir}/holders`).some((n) => n.startsWith('spr_') && n.includes(child!.id)));
      await child!.close();
      await until('the child\'s holder ended', () => !existsSync(`/proc/${pid}`) || readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z'));
      await parent.close();
    } finally {
      await server.stop();
    }
    assert.deepEqual(holders(stateDir), new Map());
    assert.deepEqual(processesMentioning(stateDir), []);
  });
});
