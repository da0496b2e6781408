/**
 * `podflare/gemini` with the real `@google/genai` types: a scripted model (its answers built as real
 * `GenerateContentResponse`s, read through their `functionCalls` getter, as a user's loop does)
 * calling the declared function, each call run in a real sandbox and its `FunctionResponse` sent
 * back with genai's `createPartFromFunctionResponse`.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createPartFromFunctionResponse, GenerateContentResponse } from '@google/genai';
import type { Content, FunctionCall } from '@google/genai';
import type { Sandbox } from 'podflare';
import { PODFLARE_FUNCTION_NAME, podflareFunctionDeclaration, runFunctionCall } from 'podflare/gemini';
import { useServerAndSandbox } from './helpers/server.js';

/** A model that answers each turn with the next scripted function call, then with text. */
function scriptedModel(script: FunctionCall[]) {
  let turn = 0;
  return (contents: Content[]): GenerateContentResponse => {
    const response = new GenerateContentResponse();
    const call = script[turn++];
    const parts = call ? [{ functionCall: call }] : [{ text: `saw ${contents.length} contents` }];
    response.candidates = [{ content: { role: 'model', parts } }];
    return response;
  };
}

describe('podflare/gemini', () => {
  let sbx: Sandbox;
  useServerAndSandbox((_server, sandbox) => { sbx = sandbox; });

  it('declares the function with a JSON schema', () => {
    const decl = podflareFunctionDeclaration();
    assert.equal(decl.name, PODFLARE_FUNCTION_NAME);
    const schema = decl.parametersJsonSchema as { required: string[]; properties: Record<string, { enum?: string[] }> };
    assert.deepEqual(schema.required, ['code']);
    assert.deepEqual(schema.properties.language?.enum, ['python', 'bash']);
    assert.equal(podflareFunctionDeclaration({ name: 'python' }).name, 'python');
  });

  it('runs a scripted model\'s function calls in the sandbox, keeping state between calls', async () => {
    const model = scriptedModel([
      { id: 'c1', name: PODFLARE_FUNCTION_NAME, args: { code: 'x = 41\nprint("set")' } },
      { id: 'c2', name: PODFLARE_FUNCTION_NAME, args: { code: 'print(x + 1)' } },
      { id: 'c3', name: PODFLARE_FUNCTION_NAME, args: { code: 'exit 3', language: 'bash' } },
      { id: 'c4', name: PODFLARE_FUNCTION_NAME, args: {} },
    ]);
    const contents: Content[] = [{ role: 'user', parts: [{ text: 'compute' }] }];
    const responses: Array<Record<string, unknown>> = [];
    for (;;) {
      const reply = model(contents);
      const calls = reply.functionCalls;
      if (!calls || calls.length === 0) break;
      contents.push(reply.candidates![0]!.content!);
      for (const call of calls) {
        const { id, name, response } = await runFunctionCall(call, sbx);
        assert.equal(id, call.id);
        assert.equal(name, PODFLARE_FUNCTION_NAME);
        responses.push(response!);
        contents.push({ role: 'user', parts: [createPartFromFunctionResponse(id!, name!, response!)] });
      }
    }
    assert.equal(responses.length, 4);
    assert.match(String(responses[0]!.output), /set/);
    assert.equal(responses[0]!.exit_code, 0);
    assert.match(String(responses[1]!.output), /42/);
    assert.equal(responses[2]!.exit_code, 3);
    assert.match(String(responses[3]!.error), /code/);
    assert.equal(contents.at(-1)!.parts![0]!.functionResponse!.id, 'c4');
  });
});
