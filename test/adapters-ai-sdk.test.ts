/**
 * `podflare/ai-sdk` with the real AI SDK (v6) driving the tool: `generateText` and `streamText` over
 * a scripted language model (ai/test's MockLanguageModelV3), the tool running in real sandboxes on a
 * real server. The scripted model reads the tool results it is given in its prompt, like a real one.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { generateText, stepCountIs, streamText } from 'ai';
import type { LanguageModelV3CallOptions, LanguageModelV3GenerateResult, LanguageModelV3StreamPart } from '@ai-sdk/provider';
import { convertArrayToReadableStream, MockLanguageModelV3 } from 'ai/test';
import { Sandbox } from 'podflare';
import { podflareProcessTools, podflareRewind, podflareRunCode } from 'podflare/ai-sdk';
import type { ProcessOutputRead, PodflareRunCodeOutput } from 'podflare/ai-sdk';
import { type TestServer, useServerAndSandbox } from './helpers/server.js';

const usage = {
  inputTokens: { total: 10, noCache: 10, cacheRead: undefined, cacheWrite: undefined },
  outputTokens: { total: 5, text: 5, reasoning: undefined },
};

type ToolOutputInPrompt = { type: string; value?: unknown };

/** The tool results the model was given in its prompt, in order. */
function toolResultsIn(options: LanguageModelV3CallOptions): ToolOutputInPrompt[] {
  return options.prompt.flatMap((m) => (m.role === 'tool' ? m.content.flatMap((p) => (p.type === 'tool-result' ? [p.output as ToolOutputInPrompt] : [])) : []));
}

/** The text of a tool result as the model sees it (a 'text' output, or the text part of 'content'). */
function textOf(output: ToolOutputInPrompt): string {
  if (output.type === 'text') return output.value as string;
  if (output.type === 'content') return (output.value as Array<{ type: string; text?: string }>).filter((p) => p.type === 'text').map((p) => p.text).join('\n');
  return JSON.stringify(output);
}

/**
 * A model that calls the tool once per entry of `codes`, one per step, then answers with a text
 * built from the tool results it received.
 */
function scriptedModel(toolName: string, codes: string[]) {
  return new MockLanguageModelV3({
    doGenerate: async (options): Promise<LanguageModelV3GenerateResult> => {
      const seen = toolResultsIn(options);
      const code = codes[seen.length];
      if (code !== undefined) {
        return {
          content: [{ type: 'tool-call', toolCallId: `call-${seen.length + 1}`, toolName, input: JSON.stringify({ code }) }],
          finishReason: { unified: 'tool-calls', raw: 'tool_calls' },
          usage,
          warnings: [],
        };
      }
      return {
        content: [{ type: 'text', text: `The sandbox said: ${seen.map(textOf).join(' | ')}` }],
        finishReason: { unified: 'stop', raw: 'stop' },
        usage,
        warnings: [],
      };
    },
  });
}

describe('podflare/ai-sdk', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  useServerAndSandbox((s, b) => { server = s; sbx = b; });

  it('runs the tool call of step 1 in the sandbox and feeds its output to step 2 (generateText)', async () => {
    const model = scriptedModel('runCode', ['x = 6*7; print(x)']);
    const result = await generateText({
      model,
      tools: { runCode: podflareRunCode({ sandbox: sbx }) },
      stopWhen: stepCountIs(2),
      prompt: 'What is six times seven? Use Python.',
    });

    // The model was offered the tool with its description and a {code: string} JSON schema.
    const offered = model.doGenerateCalls[0]!.tools?.find((t) => t.name === 'runCode');
    assert.ok(offered && offered.type === 'function', 'the tool was not offered to the model');
    assert.match(offered.description ?? '', /persist/);
    const schema = offered.inputSchema as { properties?: Record<string, { type?: string }>; required?: string[] };
    assert.equal(schema.properties?.code?.type, 'string');
    assert.deepEqual(schema.required, ['code']);

    assert.equal(result.steps.length, 2);
    const toolResult = result.steps[0]!.toolResults[0]!;
    assert.equal(toolResult.toolName, 'runCode');
    const output = toolResult.output as PodflareRunCodeOutput;
    assert.equal(output.stdout, '42\n');
    assert.equal(output.exitCode, 0);
    assert.equal(output.error, null);
    assert.match(result.text, /^The sandbox said: 42$/);
  });

  it('keeps interpreter state between two tool calls', async () => {
    const model = scriptedModel('python', ['secret = 6 * 7', 'print(secret + 1)\nsecret * 2']);
    const result = await generateText({
      model,
      tools: { python: podflareRunCode({ sandbox: sbx }) },
      stopWhen: stepCountIs(3),
      prompt: 'Compute things step by step.',
    });
    assert.equal(result.steps.length, 3);
    const second = result.steps[1]!.toolResults[0]!.output as PodflareRunCodeOutput;
    assert.equal(second.stdout, '43\n');
    assert.equal(second.results.find((r) => r.isMainResult)?.data['text/plain'], '84');
    // What the model read in its prompt: stdout, then the cell's value.
    assert.match(result.text, /\| 43\nOut\[\d+\]: 84$/);
  });

  it('shows an exception to the model as a result with its traceback, not as a tool failure', async () => {
    const model = scriptedModel('python', ['def f():\n    return 1 / 0\nf()']);
    const result = await generateText({ model, tools: { python: podflareRunCode({ sandbox: sbx }) }, stopWhen: stepCountIs(2), prompt: 'x' });
    const step = result.steps[0]!;
    assert.equal(step.content.filter((c) => c.type === 'tool-error').length, 0);
    const output = step.toolResults[0]!.output as PodflareRunCodeOutput;
    assert.equal(output.exitCode, 1);
    assert.equal(output.error?.name, 'ZeroDivisionError');
    assert.match(result.text, /Traceback[\s\S]*ZeroDivisionError: division by zero/);
    assert.equal((result.text.match(/ZeroDivisionError: division by zero/g) ?? []).length, 1, 'the traceback is shown once');
  });

  it('sends a matplotlib figure to the model as an image part', async () => {
    const model = scriptedModel('python', ['import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()']);
    await generateText({ model, tools: { python: podflareRunCode({ sandbox: sbx }) }, stopWhen: stepCountIs(2), prompt: 'plot' });
    const [output] = toolResultsIn(model.doGenerateCalls[1]!);
    assert.equal(output?.type, 'content');
    const parts = output!.value as Array<{ type: string; text?: string; data?: string; mediaType?: string }>;
    assert.equal(parts[0]?.type, 'text');
    assert.match(parts[0]!.text!, /image\/png image #1 attached/);
    const image = parts.find((p) => p.type === 'image-data');
    assert.equal(image?.mediaType, 'image/png');
    assert.deepEqual([...Buffer.from(image!.data!, 'base64').subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
  });

  it('creates the sandbox from a factory on first use only, and runs bash when asked', async () => {
    let made = 0;
    let lazy: Sandbox | undefined;
    const runBash = podflareRunCode({
      language: 'bash',
      sandbox: async () => {
        made++;
        lazy = await Sandbox.create({ host: server.url });
        return lazy;
      },
    });
    try {
      assert.equal(made, 0);
      const model = scriptedModel('sh', ['echo hello > /tmp/f.txt', 'cat /tmp/f.txt; exit 3']);
      const result = await generateText({ model, tools: { sh: runBash }, stopWhen: stepCountIs(3), prompt: 'x' });
      assert.equal(made, 1);
      const second = result.steps[1]!.toolResults[0]!.output as PodflareRunCodeOutput;
      assert.equal(second.stdout, 'hello\n');
      assert.equal(second.exitCode, 3);
      assert.match(result.text, /hello\n\[exit code 3\]$/);
      assert.match(model.doGenerateCalls[0]!.tools?.[0]?.type === 'function' ? model.doGenerateCalls[0]!.tools[0].description ?? '' : '', /bash/);
    } finally {
      await lazy?.close();
    }
  });

  it('delivers the tool result in the stream (streamText)', async () => {
    let call = 0;
    const model = new MockLanguageModelV3({
      doStream: async (options) => {
        call++;
        const chunks: LanguageModelV3StreamPart[] =
          call === 1
            ? [
                { type: 'stream-start', warnings: [] },
                { type: 'tool-input-start', id: 'call-1', toolName: 'runCode' },
                { type: 'tool-input-delta', id: 'call-1', delta: '{"code": "x = 6*7; ' },
                { type: 'tool-input-delta', id: 'call-1', delta: 'print(x)"}' },
                { type: 'tool-input-end', id: 'call-1' },
                { type: 'tool-call', toolCallId: 'call-1', toolName: 'runCode', input: JSON.stringify({ code: 'x = 6*7; print(x)' }) },
                { type: 'finish', finishReason: { unified: 'tool-calls', raw: 'tool_calls' }, usage },
              ]
            : [
                { type: 'stream-start', warnings: [] },
                { type: 'text-start', id: 't1' },
                { type: 'text-delta', id: 't1', delta: 'The answer is ' },
                { type: 'text-delta', id: 't1', delta: textOf(toolResultsIn(options)[0]!) },
                { type: 'text-end', id: 't1' },
                { type: 'finish', finishReason: { unified: 'stop', raw: 'stop' }, usage },
              ];
        return { stream: convertArrayToReadableStream(chunks) };
      },
    });
    const result = streamText({
      model,
      tools: { runCode: podflareRunCode({ sandbox: sbx }) },
      stopWhen: stepCountIs(2),
      prompt: 'What is six times seven?',
    });
    const seen: string[] = [];
    let streamed: PodflareRunCodeOutput | undefined;
    for await (const part of result.fullStream) {
      seen.push(part.type);
      if (part.type === 'tool-result' && part.toolName === 'runCode') streamed = part.output as PodflareRunCodeOutput;
      if (part.type === 'error') throw part.error;
    }
    assert.ok(streamed, `no tool-result in the stream: ${seen.join(', ')}`);
    assert.equal(streamed.stdout, '42\n');
    assert.ok(seen.indexOf('tool-call') < seen.indexOf('tool-result'));
    assert.ok(seen.indexOf('tool-result') < seen.indexOf('text-delta'));
    assert.equal(await result.text, 'The answer is 42');
    assert.equal(call, 2);
  });

  it('undoes a failed atomic call and lets the model rewind its own last step', async () => {
    const own = await Sandbox.create({ host: server.url, history: 5 });
    try {
      // The model's script: set x, break it atomically (undone), overwrite it (kept), then rewind that step.
      const calls: Array<[string, Record<string, unknown>]> = [
        ['runCode', { code: 'x = [1, 2, 3]' }],
        ['runCode', { code: 'x.append(4)\nraise RuntimeError("oops")' }],
        ['runCode', { code: 'x = None' }],
        ['undo', {}],
        ['runCode', { code: 'print(x)' }],
      ];
      const model = new MockLanguageModelV3({
        doGenerate: async (options): Promise<LanguageModelV3GenerateResult> => {
          const seen = toolResultsIn(options);
          const next = calls[seen.length];
          if (next) {
            return {
              content: [{ type: 'tool-call', toolCallId: `call-${seen.length + 1}`, toolName: next[0], input: JSON.stringify(next[1]) }],
              finishReason: { unified: 'tool-calls', raw: 'tool_calls' }, usage, warnings: [],
            };
          }
          return { content: [{ type: 'text', text: seen.map(textOf).join(' | ') }], finishReason: { unified: 'stop', raw: 'stop' }, usage, warnings: [] };
        },
      });
      const result = await generateText({
        model,
        tools: { runCode: podflareRunCode({ sandbox: own, atomic: true }), undo: podflareRewind({ sandbox: own }) },
        stopWhen: stepCountIs(calls.length + 1),
        prompt: 'Work on x.',
      });
      const outputs = result.steps.flatMap((s) => s.toolResults.map((r) => r.output as PodflareRunCodeOutput & { rewound?: number }));
      assert.equal(outputs[1]!.rolledBack, true);
      assert.equal(outputs[3]!.rewound, 1);
      assert.equal(outputs[4]!.stdout, '[1, 2, 3]\n');
      assert.match(result.text, /Rolled back/);
      assert.match(result.text, /Undid the last 1 call/);
    } finally {
      await own.close();
    }
  });

  it('lets the model start a dev server, read its output, expose its port and kill it', async () => {
    await sbx.files.upload('/root/site/index.html', '<h1>served by the agent</h1>\n');
    let url: string | undefined;
    let page: { status: number; body: string } | undefined;
    // The model's script: each step sees the results so far (as a real model would read them).
    const steps: Array<(results: string[]) => Promise<[string, Record<string, unknown>]>> = [
      async () => ['startProcess', { command: 'exec python3 -u -m http.server 8000 --bind 127.0.0.1', cwd: '/root/site' }],
      async () => ['exposePort', { port: 8000 }],
      async (results) => {
        // A person opens the URL the model handed over (no API key): the server may still be starting.
        url = (JSON.parse(results[1]!) as { url: string }).url;
        const deadline = Date.now() + 60_000;
        while (!page) {
          const res = await fetch(url).catch(() => undefined);
          if (res?.status === 200) page = { status: res.status, body: await res.text() };
          else if (Date.now() > deadline) throw new Error(`the exposed port never answered 200 (last: ${res?.status})`);
          else await new Promise((r) => setTimeout(r, 200));
        }
        return ['readProcessOutput', { pid: pidIn(results) }];
      },
      async (results) => ['readProcessOutput', { pid: pidIn(results), offset: headOf(results[2]!).nextOffset }],
      async (results) => ['killProcess', { pid: pidIn(results) }],
      async (results) => ['readProcessOutput', { pid: pidIn(results), offset: headOf(results[2]!).nextOffset }],
    ];
    const pidIn = (results: string[]) => (JSON.parse(results[0]!) as { pid: number }).pid;
    const headOf = (text: string) => JSON.parse(text.split('\n')[0]!) as Omit<ProcessOutputRead, 'output'>;
    const model = new MockLanguageModelV3({
      doGenerate: async (options): Promise<LanguageModelV3GenerateResult> => {
        const results = toolResultsIn(options).map(textOf);
        const step = steps[results.length];
        if (step) {
          const [toolName, input] = await step(results);
          return {
            content: [{ type: 'tool-call', toolCallId: `call-${results.length + 1}`, toolName, input: JSON.stringify(input) }],
            finishReason: { unified: 'tool-calls', raw: 'tool_calls' }, usage, warnings: [],
          };
        }
        return { content: [{ type: 'text', text: results.join(' | ') }], finishReason: { unified: 'stop', raw: 'stop' }, usage, warnings: [] };
      },
    });
    const result = await generateText({
      model,
      tools: { runCode: podflareRunCode({ sandbox: sbx }), ...podflareProcessTools({ sandbox: sbx }) },
      stopWhen: stepCountIs(steps.length + 1),
      prompt: 'Serve /root/site and give me a link.',
    });
    const offered = model.doGenerateCalls[0]!.tools?.map((t) => t.name).sort();
    assert.deepEqual(offered, ['exposePort', 'killProcess', 'readProcessOutput', 'runCode', 'startProcess']);
    assert.equal(result.steps.flatMap((s) => s.toolResults).length, steps.length);
    const texts = result.text.split(' | ');
    const pid = (JSON.parse(texts[0]!) as { pid: number }).pid;
    assert.ok(Number.isInteger(pid) && pid > 0);

    // The URL works without the API key and reaches the model's server.
    assert.match(url ?? '', /^http:\/\/127\.0\.0\.1:\d+\/v1\/ports\//);
    assert.deepEqual(page, { status: 200, body: '<h1>served by the agent</h1>\n' });
    assert.match(texts[1]!, /"expiresAt":"\d{4}-/);

    // The first read has the server's banner and the request it served (stderr, in order); it runs.
    const first = headOf(texts[2]!);
    assert.equal(first.running, true);
    assert.equal(first.exitCode, null);
    assert.match(texts[2]!, /Serving HTTP on 127\.0\.0\.1 port 8000/);
    assert.match(texts[2]!, /"GET \/ HTTP\/1\.1" 200/);
    assert.ok(first.nextOffset > 0);
    // Reading from nextOffset repeats nothing.
    assert.doesNotMatch(texts[3]!, /Serving HTTP/);
    assert.match(texts[4]!, new RegExp(`^Killed process ${pid}\\.$`));
    const after = headOf(texts[5]!);
    assert.equal(after.running, false);
    assert.equal(after.exitCode, 137);
    assert.equal((await sbx.commands.get(pid)).running, false);
    await assert.rejects(fetch(url!).then(async (res) => {
      if (res.status === 200) return;
      throw new Error(`status ${res.status}`);
    }));
  });

  it('bounds what readProcessOutput shows of a chatty process, and the next offset skips it all', async () => {
    const tools = podflareProcessTools({ sandbox: async () => sbx, maxOutputChars: 300 });
    const opts = { toolCallId: 't', messages: [] };
    const started = await tools.startProcess.execute!({ command: 'for i in $(seq 1 2000); do echo "line $i"; done' }, opts) as { pid: number };
    let read: ProcessOutputRead;
    const deadline = Date.now() + 60_000;
    do {
      read = await tools.readProcessOutput.execute!({ pid: started.pid }, opts) as ProcessOutputRead;
      if (read.running) await new Promise((r) => setTimeout(r, 200));
    } while (read.running && Date.now() < deadline);
    assert.equal(read.exitCode, 0);
    const total = Array.from({ length: 2000 }, (_, i) => `line ${i + 1}\n`).join('').length;
    assert.equal(read.nextOffset, total);
    assert.ok(read.output.length < 400, `output not bounded: ${read.output.length} chars`);
    assert.match(read.output, /^line 1\n/);
    assert.match(read.output, /characters omitted/);
    assert.match(read.output, /line 2000\n$/);
    const rest = await tools.readProcessOutput.execute!({ pid: started.pid, offset: read.nextOffset }, opts) as ProcessOutputRead;
    assert.equal(rest.output, '');
    assert.deepEqual(await tools.killProcess.execute!({ pid: started.pid }, opts), { pid: started.pid, killed: false });
  });
});
