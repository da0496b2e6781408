/**
 * The REST exec stream, as a client reads it: output events in order, then exactly one `exit`,
 * last, numbered without gaps (the exit travels one path from the agent to the client), for a
 * clean run and for one that raises.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { Sandbox } from 'podflare';
import { useServerAndSandbox, type TestServer } from './helpers/server.js';

interface StreamEvent { type: string; seq: number; data: unknown }

async function execEvents(server: TestServer, id: string, code: string): Promise<StreamEvent[]> {
  const res = await fetch(`${server.url}/v1/sandboxes/${id}/exec`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ code }),
  });
  assert.equal(res.status, 200);
  return (await res.text()).trim().split('\n').map((line) => JSON.parse(line) as StreamEvent);
}

function assertOneExitLast(events: StreamEvent[]): StreamEvent {
  assert.deepEqual(events.map((e) => e.seq), events.map((_, i) => i), 'seq numbers without gaps');
  assert.equal(events.filter((e) => e.type === 'exit').length, 1, `one exit in ${JSON.stringify(events)}`);
  return events.at(-1)!;
}

describe('exec stream', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  useServerAndSandbox((s, b) => { server = s; sbx = b; });

  it('ends a clean run with one exit, after its output', async () => {
    const events = await execEvents(server, sbx.id, 'print("a")\nprint("b")\n6 * 7');
    const exit = assertOneExitLast(events);
    assert.equal(exit.type, 'exit');
    assert.equal(exit.data, 0);
    assert.equal(events.filter((e) => e.type === 'stdout').map((e) => e.data).join(''), 'a\nb\n');
    assert.ok(events.some((e) => e.type === 'result'));
  });

  it('ends a run that raises with its error, then one exit', async () => {
    const events = await execEvents(server, sbx.id, 'print("before")\nraise ValueError("boom")');
    const exit = assertOneExitLast(events);
    assert.equal(exit.type, 'exit');
    assert.notEqual(exit.data, 0);
    const errorAt = events.findIndex((e) => e.type === 'error');
    assert.ok(errorAt >= 0 && errorAt === events.length - 2, `error just before the exit: ${JSON.stringify(events)}`);
    assert.equal((events[errorAt]!.data as { name: string }).name, 'ValueError');
  });

  it('the exec history records each exit once, with its code', async () => {
    const res = await fetch(`${server.url}/v1/sandboxes/${sbx.id}/execs`);
    assert.equal(res.status, 200);
    const { execs } = await res.json() as { execs: Array<{ exit_code: number | null }> };
    assert.deepEqual(execs.slice(-2).map((e) => e.exit_code === 0), [true, false]);
  });
});
