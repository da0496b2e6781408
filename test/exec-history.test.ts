/**
 * The dashboard's exec history stays within its caps whatever runs: execs per sandbox, output per
 * exec, bytes overall (oldest dropped first), and only the owner sees a sandbox's history.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ExecHistory, type ExecUpdate } from '../packages/server/src/exec-history.js';

const out = (data: string) => ({ id: 1, type: 'stdout' as const, data });

describe('exec history', () => {
  it('keeps the newest execs per sandbox', () => {
    const h = new ExecHistory({ execsPerSandbox: 3, bytesPerExec: 10_000, totalBytes: 1_000_000, codeBytes: 100 });
    for (let i = 0; i < 5; i++) h.begin('a', '', 'python', `print(${i})`).end({ code: 0 });
    assert.deepEqual(h.list('a').map((x) => x.code), ['print(2)', 'print(3)', 'print(4)']);
  });

  it('cuts the output of one exec at its cap and says so, joining text chunks', () => {
    const h = new ExecHistory({ execsPerSandbox: 3, bytesPerExec: 2000, totalBytes: 1_000_000, codeBytes: 100 });
    const rec = h.begin('a', '', 'python', 'x');
    for (let i = 0; i < 300; i++) rec.message(out('0123456789'));
    rec.end({ code: 0 });
    const [x] = h.list('a');
    assert.equal(x!.truncated, true);
    assert.equal(x!.outputs.length, 1, 'consecutive stdout chunks are one output');
    const kept = (x!.outputs[0] as { data: string }).data.length;
    assert.ok(kept > 1000 && kept < 2000, `kept ${kept}`);
  });

  it('drops the oldest execs of any sandbox to stay under the overall cap', () => {
    const h = new ExecHistory({ execsPerSandbox: 50, bytesPerExec: 100_000, totalBytes: 50_000, codeBytes: 100 });
    for (let s = 0; s < 200; s++) {
      const rec = h.begin(`s${s}`, '', 'bash', 'echo');
      rec.message(out('y'.repeat(1000)));
      rec.end({ code: 0 });
    }
    assert.ok(h.bytes <= 50_000, `${h.bytes} bytes kept`);
    assert.equal(h.list('s0').length, 0, 'the oldest went first');
    assert.equal(h.list('s199').length, 1, 'the newest stays');
  });

  it('shows a sandbox only to its owner and emits each step', () => {
    const h = new ExecHistory();
    const seen: ExecUpdate['phase'][] = [];
    h.on('exec', (u) => seen.push(u.phase));
    const rec = h.begin('a', 'owner-1', 'python', '1');
    rec.message(out('hi'));
    rec.message({ id: 1, type: 'result', data: { 'text/plain': '1' }, is_main_result: true });
    rec.end({ code: 0, execution_count: 1 });
    assert.deepEqual(seen, ['start', 'output', 'output', 'end']);
    assert.equal(h.list('a', 'owner-1').length, 1);
    assert.equal(h.list('a', 'owner-2').length, 0);
  });
});
