/**
 * `podflare/anthropic` against real sandboxes: tool_use blocks shaped as the Messages API returns
 * them (typed with @anthropic-ai/sdk's own types, and as plain dicts) for code execution, bash and the
 * text editor; the answers must be valid tool_result blocks, with is_error where the model erred.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type {
  ContentBlock,
  Message,
  MessageParam,
  ToolResultBlockParam,
  ToolUnion,
  ToolUseBlock,
} from '@anthropic-ai/sdk/resources/messages';
import { Sandbox } from 'podflare';
import {
  handleBashToolUse,
  handleCodeExecutionToolUse,
  handleTextEditorToolUse,
  handleToolUse,
  handleToolUses,
  isPodflareToolUse,
  podflareTools,
  PROCESS_TOOL_DESCRIPTIONS,
  processTools,
  type ToolResult,
} from 'podflare/anthropic';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { useServerAndSandbox } from './helpers/server.js';

let nextId = 0;
/** A tool_use block exactly as the SDK types it in a Message's content. */
function toolUse(name: string, input: Record<string, unknown>): ToolUseBlock {
  return { type: 'tool_use', id: `toolu_${String(++nextId).padStart(24, '0')}`, name, input, caller: { type: 'direct' } };
}

/** An assistant message as `messages.create` resolves it. */
function assistantMessage(content: ContentBlock[]): Message {
  return {
    id: 'msg_01XFDUDYJgAACzvnptvVoYEL',
    type: 'message',
    role: 'assistant',
    model: 'claude-sonnet-4-5',
    content,
    container: null,
    diagnostics: null,
    stop_details: null,
    stop_reason: 'tool_use',
    stop_sequence: null,
    usage: {
      input_tokens: 100,
      output_tokens: 50,
      cache_creation: null,
      cache_creation_input_tokens: null,
      cache_read_input_tokens: null,
      inference_geo: null,
      output_tokens_details: null,
      server_tool_use: null,
      service_tier: 'standard',
      speed: null,
    },
  };
}

const textOf = (r: ToolResult) => r.content.filter((c) => c.type === 'text').map((c) => (c as { text: string }).text).join('');

/** A valid tool_result for the given tool_use: right id, a non-empty text block first, a boolean is_error. */
function assertToolResult(result: ToolResultBlockParam, block: { id: string }): void {
  assert.equal(result.type, 'tool_result');
  assert.equal(result.tool_use_id, block.id);
  assert.equal(typeof result.is_error, 'boolean');
  assert.ok(Array.isArray(result.content) && result.content.length >= 1);
  const first = result.content[0]!;
  assert.equal(first.type, 'text');
  assert.ok(first.type === 'text' && first.text.length > 0, 'the text block is empty (the API rejects those)');
  // Plain JSON: what goes back over the wire is exactly what we built.
  assert.deepEqual(JSON.parse(JSON.stringify(result)), result);
}

describe('podflare/anthropic', () => {
  let sbx!: Sandbox;
  useServerAndSandbox((_server, b) => { sbx = b; });

  it('defines the three tools with the current API type strings', () => {
    const tools = podflareTools();
    const asSdkTools: ToolUnion[] = tools; // what messages.create takes (checked when type-checking the tests)
    assert.equal(asSdkTools.length, 3);
    assert.deepEqual(tools.map((t) => [t.name, 'type' in t ? t.type : undefined]), [
      ['execute_python', undefined],
      ['bash', 'bash_20250124'],
      ['str_replace_based_edit_tool', 'text_editor_20250728'],
    ]);
    const code = tools[0] as { input_schema: { type: string; required: string[]; properties: Record<string, { type: string }> }; description: string };
    assert.equal(code.input_schema.type, 'object');
    assert.deepEqual(code.input_schema.required, ['code']);
    assert.equal(code.input_schema.properties.code?.type, 'string');
    assert.match(code.description, /persist/);
    assert.deepEqual(podflareTools({ bash: false, textEditor: false, codeToolName: 'python' }).map((t) => t.name), ['python']);
  });

  it('runs execute_python with state across calls and answers in the contract shape', async () => {
    const first = toolUse('execute_python', { code: 'x = 6*7; print(x)' });
    const result: ToolResultBlockParam = await handleCodeExecutionToolUse(first, sbx);
    assertToolResult(result, first);
    assert.deepEqual(result, { type: 'tool_result', tool_use_id: first.id, content: [{ type: 'text', text: '42' }], is_error: false });

    // The same, from a plain dict (as JSON-decoded from the API or from the Python twin's tests).
    const dict = { type: 'tool_use', id: 'toolu_dict', name: 'execute_python', input: { code: 'print(x + 1)\nx * 2' } };
    const again = await handleCodeExecutionToolUse(dict, sbx);
    assert.equal(again.tool_use_id, 'toolu_dict');
    assert.equal(again.is_error, false);
    assert.match(textOf(again), /^43\nOut\[\d+\]: 84$/);

    // Silent code still gets a non-empty text block (the API rejects empty ones).
    const silent = await handleCodeExecutionToolUse(toolUse('execute_python', { code: 'y = 1' }), sbx);
    assert.deepEqual(silent.content, [{ type: 'text', text: '(no output)' }]);

    // A chatty cell is cut in the middle: the head and the tail (where a traceback would be) stay.
    const chatty = await handleCodeExecutionToolUse(toolUse('execute_python', { code: 'print("a" * 50000); print("END")' }), sbx, { maxOutputChars: 1000 });
    const cut = textOf(chatty);
    assert.ok(cut.length < 1100, `${cut.length} characters`);
    assert.match(cut, /^a+\n\[… 49\d\d\d characters omitted …\]\na+\nEND$/);
  });

  it('sets is_error for an exception, with stdout, stderr and the traceback in the text', async () => {
    const block = toolUse('execute_python', { code: 'import sys\nprint("before")\nprint("warned", file=sys.stderr)\n{}["missing"]' });
    const result = await handleCodeExecutionToolUse(block, sbx);
    assertToolResult(result, block);
    assert.equal(result.is_error, true);
    const text = textOf(result);
    assert.match(text, /^before\nwarned\nTraceback/);
    assert.match(text, /KeyError: 'missing'/);
    // A missing input is the model's mistake too.
    const bad = await handleCodeExecutionToolUse({ type: 'tool_use', id: 'toolu_bad', name: 'execute_python', input: {} }, sbx);
    assert.equal(bad.is_error, true);
    assert.match(textOf(bad), /"code"/);
  });

  it('appends PNG figures as base64 image blocks', async () => {
    const block = toolUse('execute_python', { code: 'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()' });
    const result = await handleCodeExecutionToolUse(block, sbx);
    assertToolResult(result, block);
    assert.equal(result.is_error, false);
    const image = result.content[1];
    assert.ok(image && image.type === 'image', JSON.stringify(result.content.map((c) => c.type)));
    assert.equal(image.source.type, 'base64');
    assert.equal(image.source.media_type, 'image/png');
    assert.deepEqual([...Buffer.from(image.source.data, 'base64').subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
  });

  it('runs bash with the working directory and exported variables kept between calls, and restarts', async () => {
    const cd = toolUse('bash', { command: 'mkdir -p /tmp/proj && cd /tmp/proj && export GREETING="hi there"' });
    assertToolResult(await handleBashToolUse(cd, sbx), cd);
    const pwd = toolUse('bash', { command: 'pwd; echo "$GREETING"; echo oops >&2' });
    const result = await handleBashToolUse(pwd, sbx);
    assertToolResult(result, pwd);
    assert.equal(result.is_error, false);
    assert.equal(textOf(result), '/tmp/proj\nhi there\noops');

    const failing = await handleBashToolUse(toolUse('bash', { command: 'ls /nonexistent' }), sbx);
    assert.equal(failing.is_error, true);
    assert.match(textOf(failing), /No such file or directory\n\[exit code 2\]$/);

    const restart = toolUse('bash', { restart: true });
    const restarted = await handleBashToolUse(restart, sbx);
    assertToolResult(restarted, restart);
    assert.equal(restarted.is_error, false);
    const after = await handleBashToolUse(toolUse('bash', { command: 'pwd; echo "[$GREETING]"' }), sbx);
    assert.equal(textOf(after), '/root\n[]');
  });

  it('edits a file with create, view, str_replace, insert and view again', async () => {
    const editor = (input: Record<string, unknown>) => toolUse('str_replace_based_edit_tool', input);
    const path = '/root/editor/app.py';

    const create = editor({ command: 'create', path, file_text: 'def greet():\n    return "hello"\n\nprint(greet())\n' });
    const created = await handleTextEditorToolUse(create, sbx);
    assertToolResult(created, create);
    assert.equal(created.is_error, false);
    assert.equal(textOf(created), `File created successfully at: ${path}`);

    const view = await handleTextEditorToolUse(editor({ command: 'view', path }), sbx);
    assert.equal(view.is_error, false);
    assert.equal(textOf(view), `Here's the result of running \`cat -n\` on ${path}:\n     1\tdef greet():\n     2\t    return "hello"\n     3\t\n     4\tprint(greet())`);

    const replaced = await handleTextEditorToolUse(editor({ command: 'str_replace', path, old_str: 'return "hello"', new_str: 'return "hello, world"' }), sbx);
    assert.equal(replaced.is_error, false, textOf(replaced));
    assert.match(textOf(replaced), /has been edited[\s\S]*     2\t    return "hello, world"/);

    const inserted = await handleTextEditorToolUse(editor({ command: 'insert', path, insert_line: 0, insert_text: '"""A greeting."""\nimport sys' }), sbx);
    assert.equal(inserted.is_error, false, textOf(inserted));
    const appended = await handleTextEditorToolUse(editor({ command: 'insert', path, insert_line: 6, insert_text: 'sys.exit(0)\n' }), sbx);
    assert.equal(appended.is_error, false, textOf(appended));

    const range = await handleTextEditorToolUse(editor({ command: 'view', path, view_range: [3, -1] }), sbx);
    assert.equal(textOf(range).split('\n').slice(1).join('\n'), '     3\tdef greet():\n     4\t    return "hello, world"\n     5\t\n     6\tprint(greet())\n     7\tsys.exit(0)');

    // The file on disk is what the edits say, and still runs.
    assert.equal((await sbx.download(path)).toString(), '"""A greeting."""\nimport sys\ndef greet():\n    return "hello, world"\n\nprint(greet())\nsys.exit(0)\n');
    const run = await sbx.runCode(`import runpy; runpy.run_path(${JSON.stringify(path)})`);
    assert.match(run.stdout, /hello, world/);

    const dir = await handleTextEditorToolUse(editor({ command: 'view', path: '/root/editor' }), sbx);
    assert.equal(dir.is_error, false);
    assert.match(textOf(dir), /\/root\/editor\/app\.py$/m);
  });

  it('reports editor mistakes as is_error results saying what to do', async () => {
    const editor = (input: Record<string, unknown>) => toolUse('str_replace_based_edit_tool', input);
    const missing = editor({ command: 'view', path: '/root/no/such/file.txt' });
    const notFound = await handleTextEditorToolUse(missing, sbx);
    assertToolResult(notFound, missing);
    assert.equal(notFound.is_error, true);
    assert.match(textOf(notFound), /\/root\/no\/such\/file\.txt does not exist/);

    const path = '/root/dup.txt';
    await handleTextEditorToolUse(editor({ command: 'create', path, file_text: 'x = 1\ny = 2\nx = 1\n' }), sbx);
    const dup = editor({ command: 'str_replace', path, old_str: 'x = 1', new_str: 'x = 3' });
    const ambiguous = await handleTextEditorToolUse(dup, sbx);
    assertToolResult(ambiguous, dup);
    assert.equal(ambiguous.is_error, true);
    assert.match(textOf(ambiguous), /occurs 2 times .* \(at lines 1, 3\)/);
    assert.equal((await sbx.download(path)).toString(), 'x = 1\ny = 2\nx = 1\n', 'nothing was written');

    const absent = await handleTextEditorToolUse(editor({ command: 'str_replace', path, old_str: 'z = 9', new_str: '' }), sbx);
    assert.equal(absent.is_error, true);
    assert.match(textOf(absent), /does not appear verbatim/);

    const badLine = await handleTextEditorToolUse(editor({ command: 'insert', path, insert_line: 99, insert_text: 'w' }), sbx);
    assert.equal(badLine.is_error, true);
    assert.match(textOf(badLine), /from 0 .* to 3/);

    const undo = await handleTextEditorToolUse(editor({ command: 'undo_edit', path }), sbx);
    assert.equal(undo.is_error, true);

    await sbx.upload('/root/blob.bin', new Uint8Array([0x89, 0x00, 0x01]));
    const binary = await handleTextEditorToolUse(editor({ command: 'view', path: '/root/blob.bin' }), sbx);
    assert.equal(binary.is_error, true);
    assert.match(textOf(binary), /binary/);
  });

  it('dispatches a whole assistant message and builds the next user message', async () => {
    const message = assistantMessage([
      { type: 'text', text: 'Let me check.', citations: null },
      toolUse('execute_python', { code: 'import platform; platform.python_version()' }),
      toolUse('bash', { command: 'echo from-bash' }),
      toolUse('str_replace_based_edit_tool', { command: 'create', path: '/root/note.md', file_text: '# note\n' }),
      toolUse('get_weather', { city: 'Paris' }),
    ]);
    const toolUses = message.content.filter((b): b is ToolUseBlock => b.type === 'tool_use');
    assert.deepEqual(toolUses.map((b) => isPodflareToolUse(b)), [true, true, true, false]);

    const results = await handleToolUses(message.content, sbx);
    const next: MessageParam = { role: 'user', content: results };
    assert.equal(next.content.length, 4);
    results.forEach((r, i) => assertToolResult(r, toolUses[i]!));
    assert.match(textOf(results[0]!), /^Out\[\d+\]: '3\.\d+\.\d+'$/);
    assert.equal(textOf(results[1]!), 'from-bash');
    assert.equal(textOf(results[2]!), 'File created successfully at: /root/note.md');
    assert.equal(results[3]!.is_error, true);
    assert.match(textOf(results[3]!), /Unknown tool "get_weather"/);

    // handleToolUse on its own, and a custom name for the code tool.
    const renamed = await handleToolUse(toolUse('python', { code: '1 + 1' }), sbx, { codeToolName: 'python' });
    assert.equal(textOf(renamed).replace(/\[\d+\]/, ''), 'Out: 2');
    assert.equal(isPodflareToolUse({ name: 'python' }, { codeToolName: 'python' }), true);
    assert.equal(isPodflareToolUse({ name: 'str_replace_editor' }), true); // the editor's Claude 3.7 name
    await assert.rejects(handleToolUse({ type: 'text', id: 'x', name: 'bash', input: {} }, sbx), TypeError);
  });

  it('undoes a failed execute_python with atomic, and says so to the model', async () => {
    await handleCodeExecutionToolUse(toolUse('execute_python', { code: 'kept = 1' }), sbx);
    const failed = await handleCodeExecutionToolUse(
      toolUse('execute_python', { code: 'kept = 2\nopen("/root/half.txt", "w").write("x")\n1/0' }), sbx, { atomic: true });
    assert.match(textOf(failed), /ZeroDivisionError[\s\S]*\[Rolled back: everything this call did/);
    const after = await handleCodeExecutionToolUse(toolUse('execute_python', { code: 'import os\nprint(kept, os.path.exists("/root/half.txt"))' }), sbx);
    assert.equal(textOf(after), '1 False');
  });

  it('starts a dev server, reads its output from an offset, exposes its port and kills it, from tool_use blocks', async () => {
    const tools: ToolUnion[] = [...podflareTools(), ...processTools()];
    const names = tools.map((t) => ('name' in t ? t.name : ''));
    assert.deepEqual(names.slice(3), ['start_process', 'read_process_output', 'expose_port', 'kill_process']);
    assert.equal((tools[3] as { description: string }).description, PROCESS_TOOL_DESCRIPTIONS.startProcess);

    await handleToolUse(toolUse('execute_python', {
      code: 'import os\nos.makedirs("/root/site", exist_ok=True)\nopen("/root/site/index.html", "w").write("<p>claude page</p>")',
    }), sbx);
    const startBlock = toolUse('start_process', { command: 'exec python3 -u -m http.server 8000 --bind 127.0.0.1', cwd: '/root/site' });
    const [started] = await handleToolUses(assistantMessage([startBlock]).content, sbx);
    assertToolResult(started!, startBlock);
    assert.equal(started!.is_error, false);
    assert.match(textOf(started!), /^\{"pid":\d+\}$/);
    const pid = (JSON.parse(textOf(started!)) as { pid: number }).pid;

    const exposeBlock = toolUse('expose_port', { port: 8000 });
    const exposed = await handleToolUse(exposeBlock, sbx);
    assertToolResult(exposed, exposeBlock);
    const { url } = JSON.parse(textOf(exposed)) as { url: string; expiresAt: string };
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
    assert.equal(page, '<p>claude page</p>');

    const headOf = (r: ToolResult) => JSON.parse(textOf(r).split('\n')[0]!) as { running: boolean; exitCode: number | null; nextOffset: number };
    const log = await handleToolUse(toolUse('read_process_output', { pid }), sbx);
    assert.equal(log.is_error, false);
    assert.equal(headOf(log).running, true);
    assert.match(textOf(log), /Serving HTTP on 127\.0\.0\.1 port 8000/);
    assert.match(textOf(log), /"GET \/ HTTP\/1\.1" 200/);
    const again = await handleToolUse(toolUse('read_process_output', { pid, offset: headOf(log).nextOffset }), sbx);
    assert.doesNotMatch(textOf(again), /Serving HTTP/);

    const killed = await handleToolUse(toolUse('kill_process', { pid }), sbx);
    assert.equal(textOf(killed), `Killed process ${pid}.`);
    let ended = await handleToolUse(toolUse('read_process_output', { pid, offset: 0 }), sbx);
    for (const until = Date.now() + 30_000; headOf(ended).running && Date.now() < until;) {
      await new Promise((r) => setTimeout(r, 200));
      ended = await handleToolUse(toolUse('read_process_output', { pid, offset: 0 }), sbx);
    }
    assert.equal(headOf(ended).running, false);
    assert.equal(headOf(ended).exitCode, 137);
    assert.match(textOf(ended), /Serving HTTP/);
    assert.equal((await sbx.commands.get(pid)).running, false);

    // Mistakes the model can fix are is_error results, not exceptions.
    const bad = await handleToolUse(toolUse('kill_process', { pid: 'not a pid' }), sbx);
    assert.equal(bad.is_error, true);
    assert.match(textOf(bad), /"pid" must be an integer/);
    const unknown = await handleToolUse(toolUse('read_process_output', { pid: 4_000_000 }), sbx);
    assert.equal(unknown.is_error, true);
    assert.match(textOf(unknown), /No background process with pid 4000000/);
    assert.equal(isPodflareToolUse({ name: 'expose_port' }), true);
  });

  it('tells the model the same as the Python SDK\'s process tools', () => {
    const python = fileURLToPath(new URL('../python', import.meta.url));
    const out = execFileSync('/usr/bin/python3', ['-c', 'import json; from podflare.anthropic import PROCESS_TOOLS; print(json.dumps(PROCESS_TOOLS))'], {
      env: { ...process.env, PYTHONPATH: python },
    });
    assert.deepEqual(JSON.parse(out.toString()), processTools());
  });
});
