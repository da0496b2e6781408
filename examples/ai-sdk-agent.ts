/**
 * An AI SDK agent loop whose code runs in a Podflare sandbox, through `podflare/ai-sdk`.
 *
 *   node --import tsx examples/ai-sdk-agent.ts
 *
 * The sandbox server: PODFLARE_HOST (and PODFLARE_API_KEY) when set, otherwise one started in this
 * process (as the tests do; needs the image `npm start` / scripts/setup.sh builds).
 * The model: OpenAI's when OPENAI_API_KEY is set (OPENAI_MODEL picks which; needs `@ai-sdk/openai@3`,
 * the major that pairs with ai@6), otherwise a scripted model that makes the same kind of tool calls
 * a real one would, so the example runs offline and makes no network call.
 */
import { generateText, stepCountIs } from 'ai';
import type { LanguageModel } from 'ai';
import { MockLanguageModelV3 } from 'ai/test';
import { Sandbox } from 'podflare';
import { podflareRunCode } from 'podflare/ai-sdk';
import type { PodflareRunCodeOutput } from 'podflare/ai-sdk';
import { podflareServer } from './lib/podflare-server.js';

const TASK =
  'What are the first 10 prime numbers and their sum? Compute them with Python, ' +
  'then plot them with matplotlib and tell me what the plot shows.';

async function main(): Promise<void> {
  const server = await podflareServer();
  let sandbox: Sandbox | undefined;
  try {
    const model = await chooseModel();
    const result = await generateText({
      model,
      system: 'You are a careful analyst. Use the python tool for every computation.',
      prompt: TASK,
      // The sandbox is only created if the model decides to run code.
      tools: { python: podflareRunCode({ sandbox: async () => (sandbox = await Sandbox.create({ host: server.host })) }) },
      stopWhen: stepCountIs(8),
      onStepFinish: (step) => {
        for (const call of step.toolCalls) console.log(`\n> python:\n${indent(String((call.input as { code: string }).code))}`);
        for (const result of step.toolResults) {
          const out = result.output as PodflareRunCodeOutput;
          const images = out.results.filter((r) => typeof r.data['image/png'] === 'string').length;
          console.log(`< exit ${out.exitCode}${out.stdout ? `, stdout:\n${indent(out.stdout)}` : ''}${images ? `\n  (${images} image${images > 1 ? 's' : ''} sent to the model)` : ''}`);
        }
      },
    });
    console.log(`\n${result.text}\n\n(${result.steps.length} steps, sandbox ${sandbox?.id ?? 'never created'})`);
  } finally {
    await sandbox?.close();
    await server.stop();
  }
}

/** The real model when its key is set, else a scripted one. */
async function chooseModel(): Promise<LanguageModel> {
  if (!process.env.OPENAI_API_KEY) {
    console.log('(OPENAI_API_KEY is not set: using a scripted model)');
    return scriptedModel();
  }
  const pkg = '@ai-sdk/openai'; // not a dependency of this repository: resolved only when asked for
  let provider: { openai: (modelId: string) => LanguageModel };
  try {
    provider = (await import(pkg)) as typeof provider;
  } catch (err) {
    throw new Error(`OPENAI_API_KEY is set but ${pkg} cannot be loaded (npm install ${pkg}@3): ${(err as Error).message}`);
  }
  const modelId = process.env.OPENAI_MODEL ?? 'gpt-4.1-mini';
  console.log(`(using OpenAI ${modelId})`);
  return provider.openai(modelId);
}

/**
 * Plays the model's part: two tool calls, then an answer written from the tool results it was sent,
 * exactly as they reach a real model (text, and the figure as an image part).
 */
function scriptedModel(): LanguageModel {
  const steps = [
    'primes = [n for n in range(2, 100) if all(n % d for d in range(2, int(n ** 0.5) + 1))][:10]\nprint(primes, sum(primes))',
    'import matplotlib.pyplot as plt\nplt.plot(range(1, 11), primes, "o-")\nplt.title("The first 10 primes")\nplt.show()\nprimes[-1] - primes[0]',
  ];
  const usage = {
    inputTokens: { total: 0, noCache: 0, cacheRead: undefined, cacheWrite: undefined },
    outputTokens: { total: 0, text: 0, reasoning: undefined },
  };
  return new MockLanguageModelV3({
    modelId: 'scripted',
    doGenerate: async ({ prompt }) => {
      const results = prompt.flatMap((m) => (m.role === 'tool' ? m.content.flatMap((p) => (p.type === 'tool-result' ? [p.output] : [])) : []));
      const code = steps[results.length];
      if (code !== undefined) {
        return {
          content: [{ type: 'tool-call', toolCallId: `call_${results.length + 1}`, toolName: 'python', input: JSON.stringify({ code }) }],
          finishReason: { unified: 'tool-calls', raw: 'tool_calls' },
          usage,
          warnings: [],
        };
      }
      const texts = results.map((o) => (o.type === 'text' ? o.value : o.type === 'content' ? o.value.map((p) => (p.type === 'text' ? p.text : '')).join('') : ''));
      const images = results.flatMap((o) => (o.type === 'content' ? o.value.filter((p) => p.type === 'image-data') : [])).length;
      const [primes, sum] = /^(\[.*\]) (\d+)/.exec(texts[0] ?? '')?.slice(1) ?? ['?', '?'];
      const span = /Out\[\d+\]: (\d+)/.exec(texts[1] ?? '')?.[1] ?? '?';
      return {
        content: [{
          type: 'text',
          text: `The first 10 primes are ${primes}; their sum is ${sum}. I received ${images} plot image(s): ` +
            `the points rise unevenly from 2 to 29 (a span of ${span}), since the gaps between primes vary.`,
        }],
        finishReason: { unified: 'stop', raw: 'stop' },
        usage,
        warnings: [],
      };
    },
  });
}

function indent(text: string): string {
  return text.replace(/\n$/, '').replace(/^/gm, '  ');
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
