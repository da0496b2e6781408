/**
 * `podflare/langchain` with the real `@langchain/core`: the tool bound to a scripted chat model
 * (core's FakeStreamingChatModel, one per turn, each answering with the turn's tool call), its calls invoked as an agent loop
 * does (`tool.invoke(toolCall)` → ToolMessage), running in a real sandbox on a real server.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AIMessageChunk, ToolMessage } from '@langchain/core/messages';
import type { ToolCall } from '@langchain/core/messages/tool';
import { FakeStreamingChatModel } from '@langchain/core/utils/testing';
import { convertToOpenAITool } from '@langchain/core/utils/function_calling';
import type { Sandbox } from 'podflare';
import { PODFLARE_TOOL_NAME, podflareTool } from 'podflare/langchain';
import { useServerAndSandbox } from './helpers/server.js';

describe('podflare/langchain', () => {
  let sbx: Sandbox;
  useServerAndSandbox((_server, sandbox) => { sbx = sandbox; });

  it('describes itself to LangChain with a typed schema', () => {
    const tool = podflareTool({ sandbox: sbx });
    assert.equal(tool.name, PODFLARE_TOOL_NAME);
    const spec = convertToOpenAITool(tool);
    assert.equal(spec.function.name, PODFLARE_TOOL_NAME);
    const params = spec.function.parameters as { properties: Record<string, { enum?: string[] }>; required: string[] };
    assert.deepEqual(params.required, ['code']);
    assert.deepEqual(params.properties.language?.enum, ['python', 'bash']);
  });

  it('runs a scripted model\'s tool calls in the sandbox, keeping state between calls', async () => {
    const tool = podflareTool({ sandbox: sbx });
    const calls: ToolCall[] = [
      { type: 'tool_call', id: 'call_1', name: PODFLARE_TOOL_NAME, args: { code: 'x = 41\nprint("set")' } },
      { type: 'tool_call', id: 'call_2', name: PODFLARE_TOOL_NAME, args: { code: 'print(x + 1)' } },
      { type: 'tool_call', id: 'call_3', name: PODFLARE_TOOL_NAME, args: { code: 'echo $((6 * 7)) from bash', language: 'bash' } },
      { type: 'tool_call', id: 'call_4', name: PODFLARE_TOOL_NAME, args: { code: '1 / 0' } },
    ];
    const outputs: ToolMessage[] = [];
    for (let i = 0; i < calls.length; i++) {
      const model = new FakeStreamingChatModel({ chunks: [new AIMessageChunk({ content: '', tool_calls: [calls[i]!] })] });
      const reply = await model.bindTools([tool]).invoke([['human', `step ${i}`]]);
      const call = reply.tool_calls?.[0];
      assert.ok(call, `the scripted model called the tool at step ${i}`);
      const message = (await tool.invoke({ ...call, type: 'tool_call' })) as ToolMessage;
      assert.ok(message instanceof ToolMessage);
      assert.equal(message.tool_call_id, call.id);
      outputs.push(message);
    }
    const texts = outputs.map((m) => String(m.content));
    assert.match(texts[0]!, /set/);
    assert.match(texts[1]!, /42/);
    assert.match(texts[2]!, /42 from bash/);
    assert.match(texts[3]!, /ZeroDivisionError/);
  });

  it('refuses input that does not fit the schema before running anything', async () => {
    const tool = podflareTool({ sandbox: sbx });
    await assert.rejects(tool.invoke({ code: 'print(1)', language: 'ruby' } as never), /language|did not match|schema/i);
  });
});
