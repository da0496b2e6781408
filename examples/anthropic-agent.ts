/**
 * A Claude agent loop on the Messages API whose tools run in a Podflare sandbox, through
 * `podflare/anthropic`: Python (`execute_python`), bash and the text editor, all on one machine.
 *
 *   node --import tsx examples/anthropic-agent.ts
 *
 * The sandbox server: PODFLARE_HOST (and PODFLARE_API_KEY) when set, otherwise one started in this
 * process (as the tests do; needs the image `npm start` / scripts/setup.sh builds).
 * The model: Claude when ANTHROPIC_API_KEY is set (ANTHROPIC_MODEL picks which), otherwise a scripted
 * stand-in that answers with the same kind of messages, so the example runs offline and makes no
 * network call.
 */
import Anthropic from '@anthropic-ai/sdk';
import type { ContentBlock, Message, MessageCreateParamsNonStreaming, MessageParam, ToolResultBlockParam } from '@anthropic-ai/sdk/resources/messages';
import { Sandbox } from 'podflare';
import { handleToolUses, podflareTools } from 'podflare/anthropic';
import { podflareServer } from './lib/podflare-server.js';

const TASK =
  'Write a Python module /root/stats.py with a function mean_and_stdev(xs) (population stdev), ' +
  'check it on [2, 4, 4, 4, 5, 5, 7, 9], and tell me the result.';
const MAX_TURNS = 10;

type CreateMessage = (params: MessageCreateParamsNonStreaming) => Promise<Message>;

async function main(): Promise<void> {
  const server = await podflareServer();
  const sandbox = await Sandbox.create({ host: server.host });
  try {
    const createMessage = chooseModel();
    const messages: MessageParam[] = [{ role: 'user', content: TASK }];
    for (let turn = 0; turn < MAX_TURNS; turn++) {
      const reply = await createMessage({
        model: process.env.ANTHROPIC_MODEL ?? 'claude-sonnet-4-5',
        max_tokens: 4096,
        system: 'You work on a Linux sandbox. Use the tools to write and check code; keep answers short.',
        tools: podflareTools(),
        messages,
      });
      messages.push({ role: 'assistant', content: reply.content });
      for (const block of reply.content) {
        if (block.type === 'text') console.log(`\n${block.text}`);
        if (block.type === 'tool_use') console.log(`\n> ${block.name} ${JSON.stringify(block.input)}`);
      }
      if (reply.stop_reason !== 'tool_use') break;

      const results = await handleToolUses(reply.content, sandbox);
      for (const r of results) {
        const text = r.content.map((c) => (c.type === 'text' ? c.text : `[${c.source.media_type} image]`)).join('\n');
        console.log(`< ${r.is_error ? 'error: ' : ''}${text.replace(/\n/g, '\n  ')}`);
      }
      messages.push({ role: 'user', content: results });
    }
  } finally {
    await sandbox.close();
    await server.stop();
  }
}

/** `messages.create` of the real API when its key is set, else the scripted stand-in. */
function chooseModel(): CreateMessage {
  if (process.env.ANTHROPIC_API_KEY) {
    const anthropic = new Anthropic();
    console.log(`(using Claude ${process.env.ANTHROPIC_MODEL ?? 'claude-sonnet-4-5'})`);
    return (params) => anthropic.messages.create(params);
  }
  console.log('(ANTHROPIC_API_KEY is not set: using a scripted model)');
  return scriptedClaude;
}

/**
 * Plays Claude's part: the editor writes the module, bash and Python check it (two tool uses in one
 * message, as Claude does), a str_replace fixes a detail, then a final answer quoting the tool results
 * it was sent.
 */
async function scriptedClaude(params: MessageCreateParamsNonStreaming): Promise<Message> {
  const results = params.messages.flatMap((m) =>
    m.role === 'user' && Array.isArray(m.content) ? m.content.filter((b): b is ToolResultBlockParam => b.type === 'tool_result') : [],
  );
  const textOf = (r: ToolResultBlockParam | undefined) =>
    Array.isArray(r?.content) ? r.content.map((c) => (c.type === 'text' ? c.text : '')).join('') : String(r?.content ?? '');
  let n = 0;
  const use = (name: string, input: Record<string, unknown>): ContentBlock => ({
    type: 'tool_use', id: `toolu_scripted_${results.length}_${n++}`, name, input, caller: { type: 'direct' },
  });
  const turns: ContentBlock[][] = [
    [
      { type: 'text', text: "I'll write the module first.", citations: null },
      use('str_replace_based_edit_tool', {
        command: 'create',
        path: '/root/stats.py',
        file_text: 'import math\n\n\ndef mean_and_stdev(xs):\n    m = sum(xs) / len(xs)\n    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))\n',
      }),
    ],
    [
      { type: 'text', text: 'That used the sample formula; the task asks for the population stdev.', citations: null },
      use('str_replace_based_edit_tool', { command: 'str_replace', path: '/root/stats.py', old_str: '/ (len(xs) - 1))', new_str: '/ len(xs))' }),
    ],
    [
      use('bash', { command: 'cd /root && python3 -m py_compile stats.py && echo compiled' }),
      use('execute_python', { code: 'import sys; sys.path.insert(0, "/root")\nfrom stats import mean_and_stdev\nmean_and_stdev([2, 4, 4, 4, 5, 5, 7, 9])' }),
    ],
  ];
  // Turns 1 and 2 answer one tool use each, turn 3 two: the number of results so far says where we are.
  const content = turns[Math.min(results.length, turns.length)] ?? [
    {
      type: 'text',
      text: `/root/stats.py is written and compiles (${textOf(results[2]).trim()}). ` +
        `On the sample it returns ${textOf(results[3]).replace(/^Out\[\d+\]: /, '')}: mean 5, population stdev 2.`,
      citations: null,
    },
  ];
  return {
    id: `msg_scripted_${results.length}`,
    type: 'message',
    role: 'assistant',
    model: params.model,
    content,
    container: null,
    diagnostics: null,
    stop_details: null,
    stop_reason: content.some((b) => b.type === 'tool_use') ? 'tool_use' : 'end_turn',
    stop_sequence: null,
    usage: {
      input_tokens: 0, output_tokens: 0, cache_creation: null, cache_creation_input_tokens: null, cache_read_input_tokens: null,
      inference_geo: null, output_tokens_details: null, server_tool_use: null, service_tier: 'standard', speed: null,
    },
  };
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
