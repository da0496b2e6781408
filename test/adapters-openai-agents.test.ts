/**
 * `podflare/openai-agents` with the real `@openai/agents` runner, a real server and real sandboxes.
 * The model is a scripted implementation of the SDK's `Model` interface (no network, no API key):
 * each step sees the request the runner built, tool outputs included, and answers with tool calls
 * or text.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { Agent, RunContext, Usage, run, setTracingDisabled } from '@openai/agents';
import type { AgentOutputItem, Model, ModelRequest, ModelResponse, StreamEvent, StreamEventResponseCompleted } from '@openai/agents';
import { Sandbox, SandboxGoneError, NotFoundError } from 'podflare';
import { podflareCodeInterpreter, podflareForkTool, podflareProcessTools } from 'podflare/openai-agents';
import { startTestServer, type TestServer } from './helpers/server.js';

type Step = (request: ModelRequest) => AgentOutputItem[];

/** A `Model` that plays back one step per model call and keeps the requests it got. */
class ScriptedModel implements Model {
  readonly requests: ModelRequest[] = [];
  readonly #steps: Step[];

  constructor(steps: Step[]) {
    this.#steps = steps;
  }

  async getResponse(request: ModelRequest): Promise<ModelResponse> {
    this.requests.push(request);
    const step = this.#steps[this.requests.length - 1];
    if (!step) throw new Error(`the script has no step ${this.requests.length}`);
    return { usage: new Usage({ requests: 1 }), output: step(request), responseId: `resp_${this.requests.length}` };
  }

  async *getStreamedResponse(request: ModelRequest): AsyncIterable<StreamEvent> {
    const response = await this.getResponse(request);
    for (const item of response.output) {
      if (item.type === 'message' && item.role === 'assistant') {
        for (const part of item.content) if (part.type === 'output_text') yield { type: 'output_text_delta', delta: part.text };
      }
    }
    yield {
      type: 'response_done',
      response: {
        id: response.responseId!,
        usage: { requests: 1, inputTokens: 0, outputTokens: 0, totalTokens: 0 },
        output: response.output as StreamEventResponseCompleted['response']['output'],
      },
    };
  }
}

let callCount = 0;
function call(name: string, args: Record<string, unknown>): AgentOutputItem {
  const callId = `call_${++callCount}`;
  return { type: 'function_call', id: callId, callId, name, status: 'completed', arguments: JSON.stringify(args) };
}

function say(text: string): AgentOutputItem {
  return { type: 'message', role: 'assistant', status: 'completed', content: [{ type: 'output_text', text }] };
}

/** The text of the newest tool output in a request: what the model was shown. */
function lastToolOutput(request: ModelRequest): string {
  const items = typeof request.input === 'string' ? [] : request.input;
  const result = [...items].reverse().find((i) => i.type === 'function_call_result');
  assert.ok(result && result.type === 'function_call_result', 'no tool output in the request');
  const { output } = result;
  if (typeof output === 'string') return output;
  if (Array.isArray(output)) return output.map((o) => (o.type === 'input_text' ? o.text : '')).join('');
  return output.type === 'text' ? output.text : '';
}

describe('podflare/openai-agents', () => {
  let server: TestServer;

  before(async () => {
    setTracingDisabled(true); // the SDK would otherwise try to export traces to OpenAI
    server = await startTestServer({ poolSize: 2 });
  });
  after(async () => {
    await server?.stop();
  });

  const liveIds = async (): Promise<string[]> => (await Sandbox.list({ host: server.url })).map((s) => s.id);

  it('runs code across turns in one lazily created sandbox, and closes it', async () => {
    const runCode = podflareCodeInterpreter({ host: server.url });
    // Read through a function: TypeScript would keep the narrowing of the first assertion.
    const current = (): Sandbox | undefined => runCode.currentSandbox;
    assert.equal(current(), undefined, 'no sandbox before the first call');
    const before = new Set(await liveIds());
    const seenSandboxIds: Array<string | undefined> = [];

    const model = new ScriptedModel([
      () => [call('run_code', { code: 'x = 41', language: null })],
      (req) => {
        seenSandboxIds.push(runCode.currentSandbox?.id);
        assert.equal(lastToolOutput(req), '(no output)');
        return [call('run_code', { code: 'print(x + 1)' })]; // language left out: the default applies
      },
      (req) => {
        seenSandboxIds.push(runCode.currentSandbox?.id);
        return [say(`x + 1 is ${lastToolOutput(req).trim()}`)];
      },
    ]);
    const agent = new Agent({ name: 'calculator', instructions: 'Use run_code.', model, tools: [runCode] });
    const result = await run(agent, 'Set x to 41, then print x + 1.');

    assert.equal(result.finalOutput, 'x + 1 is 42');
    assert.equal(model.requests.length, 3);
    // The model was offered the strict schema: language required but nullable.
    const offered = model.requests[0]!.tools.find((t) => 'name' in t && t.name === 'run_code');
    assert.ok(offered && offered.type === 'function');
    assert.equal(offered.strict, true);
    assert.deepEqual((offered.parameters as { required: string[] }).required, ['code', 'language']);

    const sandbox = current();
    assert.ok(sandbox, 'a sandbox exists after the run');
    assert.deepEqual(seenSandboxIds, [sandbox.id, sandbox.id], 'both calls ran in the same sandbox');
    assert.equal(await runCode.sandbox(), sandbox);
    const created = (await liveIds()).filter((id) => !before.has(id));
    assert.deepEqual(created, [sandbox.id], 'exactly one sandbox was created');

    // A later run, streamed this time, still finds the state.
    const model2 = new ScriptedModel([
      () => [call('run_code', { code: 'x', language: 'python' })],
      (req) => [say(`x is ${lastToolOutput(req)}`)],
    ]);
    const streamed = await run(agent.clone({ model: model2 }), 'What is x?', { stream: true });
    await streamed.completed;
    assert.match(String(streamed.finalOutput), /^x is Out\[\d+\]: 41$/);
    assert.equal(current(), sandbox);

    await runCode.close();
    assert.equal(current(), undefined);
    assert.ok(!(await liveIds()).includes(sandbox.id), 'the sandbox is destroyed');
    await assert.rejects(Sandbox.connect(sandbox.id, { host: server.url }), (err) => err instanceof SandboxGoneError || err instanceof NotFoundError);
    await runCode.close(); // idempotent
  });

  it('shows errors and bash output to the model, and leaves a given sandbox open', async () => {
    const own = await Sandbox.create({ host: server.url });
    try {
      const runCode = podflareCodeInterpreter({ sandbox: own });
      const outputs: string[] = [];
      const model = new ScriptedModel([
        () => [call('run_code', { code: 'def f():\n    return 1 / 0\nf()', language: null })],
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('run_code', { code: 'echo from bash; exit 3', language: 'bash' })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('run_code', { code: 5 })]; // ill-typed arguments
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [say('done')];
        },
      ]);
      await run(new Agent({ name: 'e', model, tools: [runCode] }), 'go');
      assert.match(outputs[0]!, /ZeroDivisionError/);
      assert.match(outputs[0]!, /in f/);
      assert.match(outputs[1]!, /^from bash\n\[exit code 3\]$/);
      assert.match(outputs[2]!, /^invalid arguments: expected \{"code": string/);
      await runCode.close(); // not the tool's sandbox: left alone
      assert.equal((await own.runCode('print("still here")')).stdout, 'still here\n');
    } finally {
      await own.close();
    }
  });

  it('replaces a sandbox it created that has gone, saying the state is lost', async () => {
    const runCode = podflareCodeInterpreter({ host: server.url });
    try {
      const invoke = (code: string) => runCode.invoke(new RunContext(), JSON.stringify({ code, language: null }));
      assert.equal(await invoke('x = 1'), '(no output)');
      const first = runCode.currentSandbox!;
      await (await Sandbox.connect(first.id, { host: server.url })).close(); // e.g. the idle timeout
      const output = await invoke('print("x" in globals())');
      assert.match(String(output), /^False\n\[the previous sandbox had expired; this ran in a new one/);
      assert.notEqual(runCode.currentSandbox?.id, first.id);
    } finally {
      await runCode.close();
    }
  });

  it('forks the shared sandbox, reports every branch and keeps the first success', async () => {
    const runCode = podflareCodeInterpreter({ host: server.url });
    const tryAll = podflareForkTool({ sandbox: runCode, merge: 'first-success' });
    let forkOutput = '';
    let parentId: string | undefined;
    const model = new ScriptedModel([
      () => [call('run_code', { code: 'base = 10', language: null })],
      () => {
        parentId = runCode.currentSandbox?.id;
        return [
          call('run_forked', {
            snippets: ['raise ValueError("plan a failed")', 'y = base * 2\nprint("b", y)', 'y = base * 3\nprint("c", y)'],
            language: null,
          }),
        ];
      },
      (req) => {
        forkOutput = lastToolOutput(req);
        return [call('run_code', { code: 'print(y)', language: null })];
      },
      (req) => [say(`y is ${lastToolOutput(req).trim()}`)],
    ]);
    try {
      const result = await run(new Agent({ name: 'explorer', model, tools: [runCode, tryAll] }), 'Try three plans.');
      assert.match(forkOutput, /--- branch 0 \(exit code 1\) ---\n[\s\S]*ValueError: plan a failed/);
      assert.match(forkOutput, /--- branch 1 \(exit code 0\) ---\nb 20\n/);
      assert.match(forkOutput, /--- branch 2 \(exit code 0\) ---\nc 30\n/);
      assert.match(forkOutput, /\[kept branch 1: /);
      assert.equal(result.finalOutput, 'y is 20', 'the session took over branch 1');
      assert.ok(parentId);
      assert.equal(runCode.currentSandbox?.id, parentId, 'the session keeps its id after the merge');
      assert.equal(tryAll.currentSandbox, runCode.currentSandbox, 'both tools share one sandbox');
      const descendants = await Sandbox.list({ host: server.url, ancestor: parentId });
      assert.deepEqual(descendants.map((d) => d.id), [], 'no branch outlives the call');
    } finally {
      await tryAll.close(); // closes the shared sandbox
    }
    assert.equal(runCode.currentSandbox, undefined);
    assert.ok(!(await liveIds()).includes(parentId!));
  });

  it('makes code calls atomic on request: a failed one is undone and the model is told', async () => {
    const own = await Sandbox.create({ host: server.url });
    try {
      const runCode = podflareCodeInterpreter({ sandbox: own, atomic: true });
      const invoke = (code: string) => runCode.invoke(new RunContext(), JSON.stringify({ code, language: null }));
      assert.equal(await invoke('total = 10'), '(no output)');
      const failed = String(await invoke('total += 5\nraise ValueError("bad step")'));
      assert.match(failed, /ValueError: bad step[\s\S]*\[Rolled back/);
      assert.equal(String(await invoke('print(total)')), '10');
    } finally {
      await own.close();
    }
  });

  it('lets the agent start a dev server, expose its port, read its output and kill it, in the code tool\'s sandbox', async () => {
    const runCode = podflareCodeInterpreter({ host: server.url });
    const processTools = podflareProcessTools({ sandbox: runCode, maxOutputChars: 2000 });
    try {
      const agent = new Agent({ name: 'dev', model: new ScriptedModel([]), tools: [runCode, ...processTools] });
      const outputs: string[] = [];
      const pidOf = () => (JSON.parse(outputs[1]!) as { pid: number }).pid;
      const headOf = (text: string) => JSON.parse(text.split('\n')[0]!) as { running: boolean; exitCode: number | null; nextOffset: number };
      // Turn 1: write a page with the code tool, serve it in the background, hand out a link.
      const model1 = new ScriptedModel([
        () => [call('run_code', { code: 'import os\nos.makedirs("/root/site", exist_ok=True)\nopen("/root/site/index.html", "w").write("<p>agent page</p>")', language: null })],
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('start_process', { command: 'exec python3 -u -m http.server 8000 --bind 127.0.0.1', cwd: '/root/site' })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('expose_port', { port: 8000, expires_in_seconds: null })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [say((JSON.parse(lastToolOutput(req)) as { url: string }).url)];
        },
      ]);
      const first = await run(agent.clone({ model: model1 }), 'Serve a page and give me the link.');
      const offered = model1.requests[0]!.tools.flatMap((t) => ('name' in t ? [t.name] : [])).sort();
      assert.deepEqual(offered, ['expose_port', 'kill_process', 'read_process_output', 'run_code', 'start_process']);
      const url = String(first.finalOutput);
      assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/v1\/ports\//);

      // A person opens the link (no API key); the server may still be starting.
      let page: string | undefined;
      const deadline = Date.now() + 60_000;
      while (page === undefined) {
        const res = await fetch(url).catch(() => undefined);
        if (res?.status === 200) page = await res.text();
        else if (Date.now() > deadline) throw new Error(`the exposed port never answered 200 (last: ${res?.status})`);
        else await new Promise((r) => setTimeout(r, 200));
      }
      assert.equal(page, '<p>agent page</p>');

      // Turn 2: read the server's log (the banner and the request), read again from nextOffset, kill it.
      const model2 = new ScriptedModel([
        () => [call('read_process_output', { pid: pidOf(), offset: null })],
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('read_process_output', { pid: pidOf(), offset: headOf(outputs[3]!).nextOffset })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('kill_process', { pid: pidOf() })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('read_process_output', { pid: pidOf(), offset: 0 })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [call('kill_process', { pid: 'not a pid' })];
        },
        (req) => {
          outputs.push(lastToolOutput(req));
          return [say('stopped')];
        },
      ]);
      await run(agent.clone({ model: model2 }), 'What did the server log? Then stop it.');
      const [, started, , log, again, killed, ended, bad] = outputs as [string, string, string, string, string, string, string, string];
      assert.match(started, /^\{"pid":\d+\}$/);
      assert.equal(headOf(log).running, true);
      assert.match(log, /Serving HTTP on 127\.0\.0\.1 port 8000/);
      assert.match(log, /"GET \/ HTTP\/1\.1" 200/);
      assert.doesNotMatch(again, /Serving HTTP/);
      assert.equal(killed, `Killed process ${pidOf()}.`);
      assert.equal(headOf(ended).running, false);
      assert.equal(headOf(ended).exitCode, 137);
      assert.match(ended, /Serving HTTP/);
      assert.match(bad, /^invalid arguments: expected \{"pid": integer\}/);
      assert.equal((await (await runCode.sandbox()).commands.get(pidOf())).running, false);
      assert.equal(processTools[0].currentSandbox, runCode.currentSandbox, 'the process tools share the code tool\'s sandbox');
    } finally {
      await runCode.close();
    }
  });
});
