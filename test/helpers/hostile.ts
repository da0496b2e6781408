/**
 * Turns a sandbox's agent hostile from the inside: user code runs test/helpers/hostile_agent.py,
 * which takes over the real agent channel (see that file), and `mode` says how it misbehaves.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { NotFoundError, TimeoutError, type Sandbox } from 'podflare';

const HOSTILE = readFileSync(path.join(import.meta.dirname, 'hostile_agent.py'), 'utf8');

/**
 * Starts the hostile agent in `sbx`; unless `waitReady` is false, waits (up to `timeoutMs`) until it
 * holds the channel (it then writes /hostile-ready).
 */
export async function turnHostile(sbx: Sandbox, mode: string, opts: { waitReady?: boolean; timeoutMs?: number } = {}): Promise<void> {
  await sbx.upload('/tmp/hostile_agent.py', HOSTILE);
  const started = await sbx.runCode(`setsid python3 /tmp/hostile_agent.py ${mode} </dev/null >/tmp/hostile.log 2>&1 &`, 'bash');
  assert.equal(started.exitCode, 0, started.stderr);
  if (opts.waitReady === false) return;
  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  while (Date.now() < deadline) {
    try {
      // Bounded: a poll the real agent read just before it was stopped is never answered.
      await sbx.files.stat('/hostile-ready', { requestTimeoutMs: 3000 });
      return;
    } catch (err) {
      if (!(err instanceof NotFoundError) && !(err instanceof TimeoutError)) throw err;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const log = (await sbx.runCode('cat /tmp/hostile.log', 'bash').catch(() => null))?.stdout;
  throw new Error(`the hostile agent did not take the channel over${log ? `: ${log}` : ''}`);
}
