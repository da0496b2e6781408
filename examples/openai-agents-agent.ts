/**
 * An OpenAI Agents SDK agent with Podflare's code tools: `run_code` (one persistent sandbox for the
 * whole conversation) and `run_forked` (try several snippets in forks of it, keep the first success).
 *
 *   node --import tsx examples/openai-agents-agent.ts
 *
 * Without OPENAI_API_KEY the model is scripted (a local implementation of the SDK's `Model`
 * interface; nothing leaves the machine). With it, the SDK's default OpenAI model decides what to run
 * (OPENAI_DEFAULT_MODEL picks another). The sandboxes come from PODFLARE_HOST when set, else from a
 * Podflare server started in this process (needs the image `scripts/setup.sh` builds).
 */
import { Agent, Usage, run, setTracingDisabled } from '@openai/agents';
import type { AgentOutputItem, Model, ModelRequest, ModelResponse, StreamEvent, StreamEventResponseCompleted } from '@openai/agents';
import { podflareServer } from './lib/podflare-server.js';
import { podflareCodeInterpreter, podflareForkTool } from 'podflare/openai-agents';

const TASK =
  'Compute the 50th Fibonacci number. Then estimate the golden ratio from the sequence, trying a ' +
  'few methods side by side, and tell me the results.';

/** A stand-in for a real model: plays back one step per model call, reading the tools' outputs. */
class ScriptedModel implements Model {
  #calls = 0;
  constructor(private readonly steps: Array<(toolOutput: string) => AgentOutputItem[]>) {}

  async getResponse(request: ModelRequest): Promise<ModelResponse> {
    const step = this.steps[this.#calls++];
    if (!step) throw new Error('the script is over');
    return { usage: new Usage({ requests: 1 }), output: step(lastToolOutput(request)), responseId: `resp_${this.#calls}` };
  }

  async *getStreamedResponse(request: ModelRequest): AsyncIterable<StreamEvent> {
    const { output, responseId } = await this.getResponse(request);
    const done = { id: responseId!, usage: { inputTokens: 0, outputTokens: 0, totalTokens: 0 }, output };
    yield { type: 'response_done', response: done as StreamEventResponseCompleted['response'] };
  }
}

function lastToolOutput(request: ModelRequest): string {
  const items = typeof request.input === 'string' ? [] : request.input;
  const result = [...items].reverse().find((i) => i.type === 'function_call_result');
  if (result?.type !== 'function_call_result') return '';
  const { output } = result;
  if (typeof output === 'string') return output;
  if (Array.isArray(output)) return output.map((o) => (o.type === 'input_text' ? o.text : '')).join('');
  return output.type === 'text' ? output.text : '';
}

let callId = 0;
const call = (name: string, args: object): AgentOutputItem => ({
  type: 'function_call', callId: `call_${++callId}`, name, status: 'completed', arguments: JSON.stringify(args),
});
const say = (text: string): AgentOutputItem => ({
  type: 'message', role: 'assistant', status: 'completed', content: [{ type: 'output_text', text }],
});

function scriptedModel(): Model {
  let fib50 = '';
  return new ScriptedModel([
    () => [call('run_code', { code: 'fib = [0, 1]\nwhile len(fib) <= 50:\n    fib.append(fib[-1] + fib[-2])\nprint(fib[50])', language: null })],
    (out) => {
      fib50 = out.trim();
      return [call('run_forked', {
        snippets: [
          'ratio = Fraction(fib[50], fib[49])\nprint(float(ratio))', // forgot the import: fails
          'ratio = fib[50] / fib[49]\nprint(ratio)',                 // the first success: kept
          'ratio = fib[10] / fib[9]\nprint(ratio)',                  // works too, less precise
        ],
        language: null,
      })];
    },
    () => [call('run_code', { code: 'print(f"{ratio!r} (off by {abs(ratio - (1 + 5 ** 0.5) / 2):.1e})")', language: null })],
    (out) => [say(`The 50th Fibonacci number is ${fib50}. The golden ratio estimated as F(50)/F(49) is ${out.trim()}; the Fraction attempt failed (not imported) and F(10)/F(9) is less precise.`)],
  ]);
}

const useOpenAI = Boolean(process.env.OPENAI_API_KEY);
if (!useOpenAI) setTracingDisabled(true); // no trace export either: nothing leaves the machine
const server = await podflareServer();
const host = server.host;

const runCode = podflareCodeInterpreter({ host, timeoutMs: 60_000 });
const tryAll = podflareForkTool({ sandbox: runCode, merge: 'first-success' });
const agent = new Agent({
  name: 'analyst',
  instructions: 'You answer with the help of code. Use run_code for computations; use run_forked to compare alternatives.',
  tools: [runCode, tryAll],
  ...(useOpenAI ? {} : { model: scriptedModel() }),
});

try {
  console.log(`model: ${useOpenAI ? 'OpenAI (default model)' : 'scripted'}; sandboxes: ${host}\n> ${TASK}\n`);
  const result = await run(agent, TASK, { maxTurns: 12 });
  for (const item of result.newItems) {
    if (item.type === 'tool_call_item' && item.rawItem.type === 'function_call') {
      console.log(`[${item.rawItem.name}] ${item.rawItem.arguments}`);
    } else if (item.type === 'tool_call_output_item') {
      const text = typeof item.output === 'string' ? item.output : JSON.stringify(item.output);
      console.log(text.replace(/^/gm, '    '));
    }
  }
  console.log(`\n${result.finalOutput}`);
  console.log(`\n(all calls ran in sandbox ${runCode.currentSandbox?.id})`);
} finally {
  await runCode.close(); // also the fork tool's: they share the sandbox
  await server.stop();
}
