/** The JavaScript REPL: `language: "javascript"` keeps its state across calls; a fork child starts afresh. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { useServerAndSandbox } from './helpers/server.js';

describe('javascript', () => {
  let sbx!: Sandbox;
  useServerAndSandbox((_s, b) => { sbx = b; });

  it('let x = 41, then x + 1 gives 42 across calls', async () => {
    assert.equal((await sbx.runCode('let x = 41', 'javascript')).exitCode, 0);
    const r = await sbx.runCode('x + 1', 'javascript');
    assert.deepEqual([r.stdout, r.exitCode], ['42\n', 0]);
    const logged = await sbx.runCode('console.log("sum", [1, 2, 3].reduce((a, b) => a + b)); console.error("e")', 'javascript');
    assert.deepEqual([logged.stdout, logged.stderr], ['sum 6\n', 'e\n']);
    const err = await sbx.runCode('undefinedThing()', 'javascript');
    assert.equal(err.exitCode, 1);
    assert.match(err.stderr, /ReferenceError: undefinedThing is not defined/);
    // Python is untouched by it, and the other way round.
    assert.equal((await sbx.runCode('print(6*7)')).stdout, '42\n');
    assert.equal((await sbx.runCode('x', 'javascript')).stdout, '41\n');
  });

  it('a synchronous endless loop is stopped by the exec timeout and by interrupt; the REPL and its state survive', async () => {
    assert.equal((await sbx.runCode('let held = 41; let counter = 0', 'javascript')).exitCode, 0);
    const timedOut = await sbx.runCode('while (true) { counter++ }', { language: 'javascript', timeoutMs: 2000 });
    assert.notEqual(timedOut.exitCode, 0);
    // The REPL is free again: the next cell runs (the loop did not keep it), with the state of before.
    const after = await sbx.runCode('held + 1', { language: 'javascript', timeoutMs: 60_000 });
    assert.deepEqual([after.stdout, after.exitCode], ['42\n', 0]);
    assert.equal((await sbx.runCode('counter > 0', 'javascript')).stdout, 'true\n', 'what the loop did before it was stopped stays');
    // Interrupt while it runs.
    const looping = sbx.runCode('for (;;) {}', { language: 'javascript', timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 1500));
    await sbx.interrupt();
    assert.notEqual((await looping).exitCode, 0);
    assert.equal((await sbx.runCode('held', { language: 'javascript', timeoutMs: 60_000 })).stdout, '41\n');
  });

  it('rich results: display() of HTML, SVG, a PNG, plain data and a MIME bundle', async () => {
    const r = await sbx.runCode([
      'display.html("<b>bold</b>")',
      'display.svg("<svg xmlns=\'http://www.w3.org/2000/svg\'/>")',
      'display.png(Buffer.from([0x89, 0x50, 0x4e, 0x47]))',
      'display({ rows: [1, 2], name: "t" })',
      'display({ "text/markdown": "# hi", "text/plain": "hi" })',
      'console.log("text still goes to stdout")',
    ].join('\n'), 'javascript');
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stdout, 'text still goes to stdout\n');
    assert.equal(r.results.length, 5);
    assert.equal(r.results[0]!.html, '<b>bold</b>');
    assert.match(String(r.results[1]!.svg), /^<svg/);
    assert.equal(r.results[2]!.png, Buffer.from([0x89, 0x50, 0x4e, 0x47]).toString('base64'));
    assert.deepEqual(r.results[3]!.json, { rows: [1, 2], name: 't' });
    assert.equal(r.results[3]!.text, "{ rows: [ 1, 2 ], name: 't' }");
    assert.equal(r.results[4]!.markdown, '# hi');
    assert.ok(r.results.every((x) => !x.isMainResult));
  });

  it('a fork child starts with an empty JavaScript state (the REPL is a process: not copied)', async () => {
    await sbx.runCode('globalThis.kept = "parent"', 'javascript');
    const [child] = await sbx.fork(1);
    try {
      const r = await child!.runCode('typeof kept', 'javascript');
      assert.equal(r.stdout, "'undefined'\n");
      assert.equal((await sbx.runCode('kept', 'javascript')).stdout, "'parent'\n");
    } finally {
      await child!.close();
    }
  });
});
