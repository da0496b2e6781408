/**
 * The MCP server (`podflare-mcp`) as MCP clients use it: the official MCP client talking to the real
 * binary as a child process, over stdio and over Streamable HTTP, against a real Podflare server and
 * real sandboxes. Covers the tools, errors as tool errors, and that a session's sandboxes die with it.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as http from 'node:http';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import { after, before, describe, it } from 'node:test';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { InMemoryTransport } from '@modelcontextprotocol/sdk/inMemory.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { createPodflareMcpServer } from '@podflare/mcp';
import { SANDBOX_ID_PATTERN, SANDBOX_ID_SOURCE } from '@podflare/protocol/sandbox';
import { Sandbox } from 'podflare';
import { IMAGES_DIR, startTestServer, type TestServer } from './helpers/server.js';

const MAIN = path.resolve(import.meta.dirname, '../packages/mcp/dist/main.js');
const CLI = path.resolve(import.meta.dirname, '../packages/cli/dist/main.js');
const TOOLS = [
  'create_sandbox', 'run_python', 'run_bash', 'fork', 'diff', 'merge_into', 'checkpoint', 'rewind', 'upload', 'download', 'destroy_sandbox',
  'start_process', 'read_process_output', 'kill_process', 'expose_port',
];
const ID = new RegExp(SANDBOX_ID_SOURCE, 'g');
const UNKNOWN_ID = `sbx_${'0'.repeat(32)}`;

type ToolResult = CallToolResult;

/** Calls a tool; the result is a CallToolResult (protocol errors would reject instead). */
async function call(client: Client, name: string, args: Record<string, unknown> = {}): Promise<ToolResult> {
  return (await client.callTool({ name, arguments: args })) as ToolResult;
}

/** The text of a result's text items, joined. */
function text(result: ToolResult): string {
  return result.content.flatMap((c) => (c.type === 'text' ? [c.text] : [])).join('\n');
}

/** Asserts a successful tool call and returns its text. */
async function ok(client: Client, name: string, args: Record<string, unknown> = {}): Promise<string> {
  const result = await call(client, name, args);
  assert.notEqual(result.isError, true, `${name} failed: ${text(result)}`);
  return text(result);
}

/** The session sandboxes on the server (fork children inherit the metadata, so roots only). */
async function sessionSandboxes(host: string) {
  return (await Sandbox.list({ host })).filter((s) => s.metadata.role === 'session' && s.parent === null);
}

async function liveIds(host: string): Promise<Set<string>> {
  return new Set((await Sandbox.list({ host })).map((s) => s.id));
}

/** Resolves once the process with this pid is gone (it need not be our child). */
async function pidGone(pid: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    if (Date.now() > deadline) throw new Error(`process ${pid} still running after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function exited(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

/** Connects the official client to `podflare-mcp` spawned as a child process over stdio. */
async function connectStdio(serverUrl: string, extraArgs: string[] = []) {
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [MAIN, '--server', serverUrl, ...extraArgs],
    stderr: 'pipe',
  });
  let stderr = '';
  transport.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  const client = new Client({ name: 'podflare-test', version: '1.0.0' });
  const errors: Error[] = [];
  client.onerror = (err) => errors.push(err);
  await client.connect(transport);
  return { client, transport, errors, stderr: () => stderr };
}

describe('podflare-mcp over stdio', () => {
  let server: TestServer;
  let session: Awaited<ReturnType<typeof connectStdio>>;
  /** Sandboxes this session made and did not destroy: all must be gone once it ends. */
  const madeBySession = new Set<string>();

  before(async () => {
    server = await startTestServer({ poolSize: 2 });
    session = await connectStdio(server.url);
  });
  after(async () => {
    await session?.client.close().catch(() => undefined);
    await server?.stop();
  });

  it('lists the tools with described, typed input schemas', async () => {
    const { tools } = await session.client.listTools();
    assert.deepEqual(tools.map((t) => t.name).sort(), [...TOOLS].sort());
    for (const tool of tools) {
      assert.ok(tool.description && tool.description.length > 20, `${tool.name} has a description`);
      for (const [name, prop] of Object.entries(tool.inputSchema.properties ?? {})) {
        assert.ok((prop as { description?: string }).description, `${tool.name}.${name} has a description`);
      }
    }
    const byName = new Map(tools.map((t) => [t.name, t]));
    assert.deepEqual(byName.get('run_python')!.inputSchema.required, ['code']);
    assert.deepEqual(byName.get('run_bash')!.inputSchema.required, ['command']);
    assert.deepEqual(byName.get('destroy_sandbox')!.inputSchema.required, ['sandbox_id']);
    assert.deepEqual(byName.get('merge_into')!.inputSchema.required, ['winner']);
    assert.equal(byName.get('destroy_sandbox')!.annotations?.destructiveHint, true);
    assert.equal(byName.get('download')!.annotations?.readOnlyHint, true);
  });

  it('runs Python in the session sandbox, keeping state across calls without a sandbox_id', async () => {
    const first = await ok(session.client, 'run_python', { code: 'import math\nx = 41\nprint("ready")' });
    assert.match(first, /stdout:\nready\n/);
    assert.match(first, /exit code: 0$/);
    const second = await ok(session.client, 'run_python', { code: 'print(x + 1)\nmath.sqrt(16)' });
    assert.match(second, /stdout:\n42\n/);
    assert.match(second, /result:\n4\.0/);
    // Exactly one sandbox was made for the session, lazily.
    const own = await sessionSandboxes(server.url);
    assert.equal(own.length, 1);
    madeBySession.add(own[0]!.id);
  });

  it('reports exceptions and non-zero exits as tool errors, and the interpreter lives on', async () => {
    const boom = await call(session.client, 'run_python', { code: 'def boom():\n    return 1 / 0\nboom()' });
    assert.equal(boom.isError, true);
    assert.match(text(boom), /ZeroDivisionError/);
    assert.match(text(boom), /boom/); // the traceback
    assert.match(text(boom), /exit code: 1$/);
    assert.match(await ok(session.client, 'run_python', { code: 'print(x)' }), /41/);
  });

  it('returns matplotlib figures as PNG image content', async () => {
    const result = await call(session.client, 'run_python', {
      code: 'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()',
    });
    assert.notEqual(result.isError, true, text(result));
    const image = result.content.find((c) => c.type === 'image');
    assert.ok(image && image.type === 'image', `no image in ${JSON.stringify(result.content.map((c) => c.type))}`);
    assert.equal(image.mimeType, 'image/png');
    assert.deepEqual([...Buffer.from(image.data, 'base64').subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
  });

  it('runs bash in the same filesystem, passing the exit code on', async () => {
    await ok(session.client, 'run_python', { code: 'open("/root/from_python.txt", "w").write("shared")' });
    const out = await ok(session.client, 'run_bash', { command: 'cat /root/from_python.txt; echo; echo $((6 * 7))' });
    assert.match(out, /stdout:\nshared\n42\n/);
    const failing = await call(session.client, 'run_bash', { command: 'echo oops >&2; exit 3' });
    assert.equal(failing.isError, true);
    assert.match(text(failing), /stderr:\noops/);
    assert.match(text(failing), /exit code: 3$/);
  });

  it('starts a background process, reads its output from an offset, and kills it', async () => {
    const { pid } = JSON.parse(await ok(session.client, 'start_process', { command: 'echo first; read x; echo "second $x"; sleep 300' })) as { pid: number };
    const head = (t: string) => JSON.parse(t.split('\n')[0]!) as { running: boolean; next_offset: number; exit_code: number | null };
    let first = '';
    // Polled as an agent would, with a pause: the process may not have written yet.
    for (let i = 0; i < 300 && !first.includes('first'); i++) {
      if (i) await new Promise((r) => setTimeout(r, 100));
      first = await ok(session.client, 'read_process_output', { pid });
    }
    assert.match(first, /\nfirst\n/);
    assert.equal(head(first).running, true);
    assert.equal(head(first).next_offset, 'first\n'.length);
    // Python is not blocked by it, and stdin reaches it through the SDK.
    assert.match(await ok(session.client, 'run_python', { code: 'print(6*7)' }), /42/);
    await ok(session.client, 'run_bash', { command: 'true' });
    // stdin is not an MCP tool (an agent pipes input with run_bash): written here through the REST API.
    const id = (await sessionSandboxes(server.url))[0]!.id;
    const stdin = await fetch(`${server.url}/v1/sandboxes/${id}/processes/${pid}/stdin`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ data: 'hello\n' }),
    });
    assert.equal(stdin.status, 204);
    let more = '';
    for (let i = 0; i < 300 && !more.includes('hello'); i++) {
      if (i) await new Promise((r) => setTimeout(r, 100));
      more = await ok(session.client, 'read_process_output', { pid, offset: head(first).next_offset });
    }
    assert.match(more, /\nsecond hello\n$/);
    assert.doesNotMatch(more, /first/);
    const exposed = JSON.parse(await ok(session.client, 'expose_port', { port: 8123 })) as { url: string };
    assert.match(exposed.url, new RegExp(`^http://127\\.0\\.0\\.1:\\d+/v1/ports/${SANDBOX_ID_SOURCE}\\.8123\\.`));
    assert.match(await ok(session.client, 'kill_process', { pid }), /Killed/);
    const after = await ok(session.client, 'read_process_output', { pid });
    assert.equal(head(after).exit_code, 137);
    assert.match(await ok(session.client, 'kill_process', { pid }), /already ended/);
  });

  it('stops code at timeout_ms with exit code 124', async () => {
    const started = Date.now();
    const slow = await call(session.client, 'run_python', { code: 'import time\ntime.sleep(30)', timeout_ms: 500 });
    assert.equal(slow.isError, true);
    assert.match(text(slow), /exit code: 124 \(timed out/);
    assert.ok(Date.now() - started < 15_000);
  });

  it('forks, diffs and merges the winner back (whole and selective)', async () => {
    await ok(session.client, 'run_python', { code: 'plan = "base"\nopen("/root/base.txt", "w").write("base\\n")' });
    const forked = JSON.parse(await ok(session.client, 'fork', { n: 2 })) as { parent: string; children: string[] };
    assert.ok(madeBySession.has(forked.parent), 'without sandbox_id, fork forks the session sandbox');
    assert.equal(forked.children.length, 2);
    const [a, b] = forked.children as [string, string];
    madeBySession.add(b); // a is merged (retired) below

    await ok(session.client, 'run_python', { sandbox_id: a, code: 'plan = "a"\nopen("/root/a.txt", "w").write("from a\\n")\nopen("/root/base.txt", "a").write("more\\n")' });
    await ok(session.client, 'run_python', { sandbox_id: b, code: 'plan = "b"\nopen("/root/b.txt", "w").write("from b\\n")' });
    // Children inherit the parent's memory at the fork and are isolated from each other.
    assert.match(await ok(session.client, 'run_python', { sandbox_id: b, code: 'import os\nprint(os.path.exists("/root/a.txt"), os.path.exists("/root/base.txt"))' }), /False True/);

    const diff = JSON.parse(await ok(session.client, 'diff', { other_id: a, paths: ['/root'], content: true, vars: true })) as {
      added: string[]; modified: string[]; removed: string[]; content?: Record<string, string>;
      vars?: { changed: Array<{ name: string; before: string; after: string }> };
    };
    assert.ok(diff.added.includes('/root/a.txt'), JSON.stringify(diff));
    assert.ok(diff.modified.includes('/root/base.txt'), JSON.stringify(diff));
    assert.match(diff.content?.['/root/base.txt'] ?? '', /\+more/);
    assert.deepEqual(diff.vars?.changed.find((v) => v.name === 'plan'), { name: 'plan', type: 'str', before: "'base'", after: "'a'" });

    // Whole merge into the session sandbox (parent left out): it now runs a's state; a is retired.
    assert.match(await ok(session.client, 'merge_into', { winner: a }), /retired/);
    assert.match(await ok(session.client, 'run_python', { code: 'print(plan, open("/root/a.txt").read().strip())' }), /a from a/);
    const retired = await call(session.client, 'run_python', { sandbox_id: a, code: '1' });
    assert.equal(retired.isError, true);
    assert.match(text(retired), /not found/);

    // Selective merge: only the named file comes over; both keep their interpreters.
    assert.match(await ok(session.client, 'merge_into', { parent: forked.parent, winner: b, paths: ['/root/b.txt'] }), /both sandboxes live on/);
    assert.match(await ok(session.client, 'run_python', { code: 'print(plan, open("/root/b.txt").read().strip())' }), /a from b/);
    assert.match(await ok(session.client, 'run_python', { sandbox_id: b, code: 'print(plan)' }), /stdout:\nb\n/);
  });

  it('lets an agent undo its own step: checkpoint, a destructive call, rewind', async () => {
    await ok(session.client, 'run_python', { code: 'import os\nos.makedirs("/root/keep", exist_ok=True)\nopen("/root/keep/f", "w").write("mine")\nrows = [1, 2, 3]' });
    const { checkpoint_id: cp } = JSON.parse(await ok(session.client, 'checkpoint', { name: 'before the risky step' })) as { checkpoint_id: string };
    assert.match(cp, /^ckpt_[0-9a-f]{24}$/);
    await ok(session.client, 'run_bash', { command: 'rm -rf /root/keep' });
    await ok(session.client, 'run_python', { code: 'rows = None' });
    assert.match(await ok(session.client, 'rewind', { checkpoint_id: cp }), /is back to checkpoint/);
    assert.match(await ok(session.client, 'run_python', { code: 'print(rows, open("/root/keep/f").read())' }), /\[1, 2, 3\] mine/);
    const noHistory = await call(session.client, 'rewind', {});
    assert.equal(noHistory.isError, true);
    assert.match(text(noHistory), /history/);
  });

  it('uploads and downloads text, binary and image files', async () => {
    assert.match(await ok(session.client, 'upload', { path: '/root/notes/hello.txt', content: 'héllo\nworld\n' }), /Wrote 13 bytes to \/root\/notes\/hello.txt/);
    assert.equal(await ok(session.client, 'download', { path: '/root/notes/hello.txt' }), 'héllo\nworld\n');
    assert.match(await ok(session.client, 'run_bash', { command: 'wc -l < /root/notes/hello.txt' }), /stdout:\n2\n/);

    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    await ok(session.client, 'upload', { path: '/root/bytes.bin', content_base64: bytes.toString('base64') });
    assert.match(await ok(session.client, 'run_python', { code: 'print(list(open("/root/bytes.bin", "rb").read()) == list(range(256)))' }), /True/);
    const binary = await call(session.client, 'download', { path: '/root/bytes.bin' });
    assert.notEqual(binary.isError, true, text(binary));
    assert.match(text(binary), /binary file, 256 bytes/);
    const encoded = binary.content[1];
    assert.ok(encoded?.type === 'text');
    assert.deepEqual(Buffer.from(encoded.text, 'base64'), bytes);

    await ok(session.client, 'run_python', { code: 'import matplotlib.pyplot as plt\nplt.figure(); plt.plot([3, 1, 2]); plt.savefig("/root/plot.png")' });
    const png = await call(session.client, 'download', { path: '/root/plot.png' });
    const image = png.content.find((c) => c.type === 'image');
    assert.ok(image?.type === 'image' && image.mimeType === 'image/png', JSON.stringify(png.content.map((c) => c.type)));
  });

  it('turns bad arguments and bad ids into tool errors, not crashes', async () => {
    // Ids the server does not know: the server's 404, with a hint.
    const unknown = await call(session.client, 'run_python', { sandbox_id: UNKNOWN_ID, code: '1' });
    assert.equal(unknown.isError, true);
    assert.match(text(unknown), new RegExp(`sandbox ${UNKNOWN_ID} not found`));
    for (const [tool, args] of [
      ['destroy_sandbox', { sandbox_id: UNKNOWN_ID }],
      ['fork', { sandbox_id: UNKNOWN_ID }],
      ['diff', { other_id: UNKNOWN_ID }],
      ['merge_into', { winner: UNKNOWN_ID }],
    ] as const) {
      const r = await call(session.client, tool, args);
      assert.equal(r.isError, true, `${tool}: ${text(r)}`);
      assert.match(text(r), /not found/, tool);
    }
    // Schema violations. The SDK (1.32) answers these with a tool error (isError, "Input validation
    // error: …"), not a JSON-RPC error: callTool resolves.
    const cases: Array<[string, Record<string, unknown>, RegExp]> = [
      ['run_python', {}, /Input validation error.*code/s],                          // missing required argument
      ['run_python', { sandbox_id: 'not-an-id', code: '1' }, /Input validation error.*sbx_/s],
      ['run_bash', { command: 42 }, /Input validation error/],
      ['fork', { n: 0 }, /Input validation error/],
      ['fork', { n: 33 }, /Input validation error/],
      ['run_python', { code: '1', timeout_ms: -5 }, /Input validation error/],
    ];
    for (const [tool, args, message] of cases) {
      const r = await call(session.client, tool, args);
      assert.equal(r.isError, true, `${tool} ${JSON.stringify(args)}`);
      assert.match(text(r), message);
    }
    // Unknown tool: also a tool error in this SDK version.
    const missing = await call(session.client, 'no_such_tool', {});
    assert.equal(missing.isError, true);
    assert.match(text(missing), /Tool no_such_tool not found/);
    // Checks the tools make themselves.
    const both = await call(session.client, 'upload', { path: '/root/x', content: 'a', content_base64: 'YQ==' });
    assert.equal(both.isError, true);
    assert.match(text(both), /exactly one of content/);
    const notBase64 = await call(session.client, 'upload', { path: '/root/x', content_base64: '***' });
    assert.equal(notBase64.isError, true);
    const noFile = await call(session.client, 'download', { path: '/root/does/not/exist' });
    assert.equal(noFile.isError, true);
    assert.match(text(noFile), /not found|no such/i);
    const dir = await call(session.client, 'download', { path: '/root' });
    assert.equal(dir.isError, true);
    assert.match(text(dir), /is a directory/);
    const intoItself = await call(session.client, 'merge_into', { parent: [...madeBySession][0], winner: [...madeBySession][0] });
    assert.equal(intoItself.isError, true);
    // After all that the session and its interpreter are fine.
    assert.match(await ok(session.client, 'run_python', { code: 'print(plan)' }), /stdout:\na\n/);
    assert.deepEqual(session.errors, []);
  });

  it('creates and destroys extra sandboxes by id', async () => {
    const { sandbox_id: id } = JSON.parse(await ok(session.client, 'create_sandbox', { egress: false })) as { sandbox_id: string };
    assert.match(id, ID);
    assert.ok((await liveIds(server.url)).has(id));
    await ok(session.client, 'run_python', { sandbox_id: id, code: 'y = 7' });
    assert.match(await ok(session.client, 'run_python', { sandbox_id: id, code: 'print(y * 6)' }), /42/);
    // Its own interpreter, not the session's.
    assert.match(text(await call(session.client, 'run_python', { code: 'print(y)' })), /NameError/);
    assert.equal(await ok(session.client, 'destroy_sandbox', { sandbox_id: id }), `Destroyed ${id}.`);
    assert.equal(await ok(session.client, 'destroy_sandbox', { sandbox_id: id }), `${id} was already destroyed.`);
    assert.ok(!(await liveIds(server.url)).has(id));
    const gone = await call(session.client, 'run_python', { sandbox_id: id, code: '1' });
    assert.equal(gone.isError, true);
    // One more that the session keeps: it must die with the session.
    const kept = JSON.parse(await ok(session.client, 'create_sandbox', {})) as { sandbox_id: string };
    madeBySession.add(kept.sandbox_id);
  });

  it('creates a sandbox limited to an egress allowlist', async () => {
    const { sandbox_id: id } = JSON.parse(await ok(session.client, 'create_sandbox', { allow_hosts: ['pypi.org', '*.example.com'] })) as { sandbox_id: string };
    const info = await (await Sandbox.connect(id, { host: server.url })).info();
    assert.deepEqual(info.egress, { allow: ['pypi.org', '*.example.com'] });
    assert.equal(await ok(session.client, 'destroy_sandbox', { sandbox_id: id }), `Destroyed ${id}.`);
    const contradictory = await call(session.client, 'create_sandbox', { allow_hosts: ['pypi.org'], egress: false });
    assert.equal(contradictory.isError, true);
    const badRule = await call(session.client, 'create_sandbox', { allow_hosts: ['not a host!'] });
    assert.equal(badRule.isError, true);
    assert.match(text(badRule), /egress\.allow\.0/);
  });

  it('starts a new session sandbox, and says so, when its sandbox was destroyed elsewhere', async () => {
    const [old] = await sessionSandboxes(server.url);
    assert.ok(old && madeBySession.has(old.id));
    await (await Sandbox.connect(old.id, { host: server.url })).close();
    madeBySession.delete(old.id);
    const result = await call(session.client, 'run_python', { code: 'print(globals().get("plan"))' });
    assert.notEqual(result.isError, true, text(result));
    assert.match(text(result), new RegExp(`note: this session's sandbox ${old.id} had been destroyed`));
    assert.match(text(result), /earlier variables and files are gone/);
    assert.match(text(result), /stdout:\nNone/);
    const fresh = await sessionSandboxes(server.url);
    assert.equal(fresh.length, 1);
    assert.notEqual(fresh[0]!.id, old.id);
    madeBySession.add(fresh[0]!.id);
    // A missing file is not mistaken for a missing sandbox: no new sandbox, just the error.
    const missing = await call(session.client, 'download', { path: '/root/nope.txt' });
    assert.equal(missing.isError, true);
    assert.doesNotMatch(text(missing), /note:/);
  });

  it('destroys the session sandbox and everything the session made when stdin closes', async () => {
    const before = await liveIds(server.url);
    assert.ok(madeBySession.size >= 3);
    for (const id of madeBySession) assert.ok(before.has(id), `${id} alive before the session ends`);
    const pid = session.transport.pid!;
    const started = Date.now();
    // The client ends the child's stdin, waits up to 2 s for it to exit, and only then sends SIGTERM.
    await session.client.close();
    await pidGone(pid);
    assert.ok(Date.now() - started < 2000, 'the process exited by itself once stdin closed, before any SIGTERM');
    const afterIds = await liveIds(server.url);
    for (const id of madeBySession) assert.ok(!afterIds.has(id), `${id} destroyed with the session`);
    assert.match(session.stderr(), /shutting down \(stdin closed\)/);
    assert.doesNotMatch(session.stderr(), /SIGTERM/);
  });

  it('also destroys the session sandbox on SIGTERM', async () => {
    const other = await connectStdio(server.url);
    await ok(other.client, 'run_python', { code: 'z = 1' });
    const forked = JSON.parse(await ok(other.client, 'fork', {})) as { parent: string; children: string[] };
    const ids = [forked.parent, ...forked.children];
    for (const id of ids) assert.ok((await liveIds(server.url)).has(id));
    const pid = other.transport.pid!;
    process.kill(pid, 'SIGTERM');
    await pidGone(pid);
    const afterIds = await liveIds(server.url);
    for (const id of ids) assert.ok(!afterIds.has(id), `${id} destroyed on SIGTERM`);
    assert.match(other.stderr(), /shutting down \(SIGTERM\)/);
    await other.client.close();
  });
});

/** Starts `podflare-mcp --http` as a child process; resolves with its MCP URL once it listens. */
async function startHttpChild(serverUrl: string, env: NodeJS.ProcessEnv = {}): Promise<{ child: ChildProcess; url: URL; stderr: () => string }> {
  const child = spawn(process.execPath, [MAIN, '--http', '--port', '0', '--server', serverUrl], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env },
  });
  let stderr = '';
  const url = await new Promise<URL>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "listening on" line: ${stderr}`)), 20_000);
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      const m = /listening on (http:\/\/\S+)/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve(new URL(m[1]!));
      }
    });
    child.once('exit', (code) => reject(new Error(`exited with ${code}: ${stderr}`)));
  });
  return { child, url, stderr: () => stderr };
}

async function connectHttp(url: URL) {
  const transport = new StreamableHTTPClientTransport(url);
  const client = new Client({ name: 'podflare-test-http', version: '1.0.0' });
  await client.connect(transport);
  return { client, transport };
}

/** A raw request with a chosen Host header (fetch will not let us set one). */
function rawPost(url: URL, host: string, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { hostname: url.hostname, port: url.port, path: url.pathname, method: 'POST', headers: { host, 'content-type': 'application/json', accept: 'application/json, text/event-stream' } },
      (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

describe('podflare-mcp over Streamable HTTP', () => {
  let server: TestServer;
  let mcp: Awaited<ReturnType<typeof startHttpChild>>;

  before(async () => {
    server = await startTestServer({ poolSize: 2 });
    mcp = await startHttpChild(server.url);
  });
  after(async () => {
    if (mcp?.child.exitCode === null) mcp.child.kill('SIGKILL');
    await server?.stop();
  });

  it('gives each HTTP session its own sandbox, destroyed when the session is deleted', async () => {
    const one = await connectHttp(mcp.url);
    const two = await connectHttp(mcp.url);
    assert.ok(one.transport.sessionId && two.transport.sessionId && one.transport.sessionId !== two.transport.sessionId);
    const { tools } = await one.client.listTools();
    assert.deepEqual(tools.map((t) => t.name).sort(), [...TOOLS].sort());

    await ok(one.client, 'run_python', { code: 'who = "one"' });
    await ok(two.client, 'run_python', { code: 'who = "two"' });
    assert.match(await ok(one.client, 'run_python', { code: 'print(who)' }), /stdout:\none\n/);
    assert.match(await ok(two.client, 'run_python', { code: 'print(who)' }), /stdout:\ntwo\n/);
    assert.match(await ok(one.client, 'run_bash', { command: 'echo $((2 + 3))' }), /stdout:\n5\n/);
    const a = JSON.parse(await ok(one.client, 'fork', { n: 1 })) as { parent: string; children: string[] };
    const b = JSON.parse(await ok(two.client, 'fork', { n: 1 })) as { parent: string; children: string[] };
    assert.notEqual(a.parent, b.parent);
    const bad = await call(one.client, 'run_python', { sandbox_id: UNKNOWN_ID, code: '1' });
    assert.equal(bad.isError, true);

    // DELETE the first session: its sandbox and its fork child go; the second session is untouched.
    await one.transport.terminateSession();
    await one.client.close();
    const live = await liveIds(server.url);
    for (const id of [a.parent, ...a.children]) assert.ok(!live.has(id), `${id} destroyed with its HTTP session`);
    for (const id of [b.parent, ...b.children]) assert.ok(live.has(id), `${id} still alive`);
    assert.match(await ok(two.client, 'run_python', { code: 'print(who)' }), /two/);

    // The deleted session id is unknown from now on.
    const stale = await fetch(mcp.url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', 'mcp-session-id': one.transport.sessionId! },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'tools/list' }),
    });
    assert.equal(stale.status, 404);

    // SIGTERM on the HTTP server closes the remaining session and destroys its sandboxes.
    await two.client.close();
    mcp.child.kill('SIGTERM');
    assert.equal(await exited(mcp.child), 0);
    const afterStop = await liveIds(server.url);
    for (const id of [b.parent, ...b.children]) assert.ok(!afterStop.has(id), `${id} destroyed at shutdown`);
    assert.match(mcp.stderr(), /shutting down \(SIGTERM\)/);
  });

  it('refuses requests that are not local (DNS rebinding) and GETs without a session', async () => {
    const fresh = await startHttpChild(server.url);
    try {
      const init = JSON.stringify({
        jsonrpc: '2.0', id: 1, method: 'initialize',
        params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'raw', version: '0' } },
      });
      assert.equal(await rawPost(fresh.url, 'evil.example:80', init), 403);
      // A POST without a session is answered on its own (below); a GET stream needs a session.
      const noSession = await fetch(fresh.url, { headers: { accept: 'text/event-stream' } });
      assert.equal(noSession.status, 405);
      assert.match(((await noSession.json()) as { error: { message: string } }).error.message, /mcp-session-id/);
      assert.equal(await rawPost(new URL('/', fresh.url), 'evil.example:80', init), 403);
      const crossSite = await fetch(fresh.url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', origin: 'https://evil.example' },
        body: init,
      });
      assert.equal(crossSite.status, 403);
    } finally {
      fresh.child.kill('SIGTERM');
      await exited(fresh.child);
    }
  });
});

describe('podflare-mcp configuration', () => {
  it('reports an unreachable Podflare server as a tool error that says what to check', async () => {
    const session = await connectStdio('http://127.0.0.1:1');
    try {
      const r = await call(session.client, 'run_python', { code: '1' });
      assert.equal(r.isError, true);
      assert.match(text(r), /cannot reach the Podflare server at http:\/\/127\.0\.0\.1:1/);
      assert.match(session.stderr(), /warning: cannot reach/);
    } finally {
      await session.client.close();
    }
  });

  it('refuses a non-loopback address without PODFLARE_MCP_TOKEN, and requires the token with it', async () => {
    const refused = spawn(process.execPath, [MAIN, '--http', '--host', '0.0.0.0', '--port', '0'], {
      stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PODFLARE_MCP_TOKEN: '' },
    });
    let stderr = '';
    refused.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
    assert.equal(await exited(refused), 1);
    assert.match(stderr, /refusing to listen on 0\.0\.0\.0 without a token/);

    const child = spawn(process.execPath, [MAIN, '--http', '--host', '0.0.0.0', '--port', '0', '--server', 'http://127.0.0.1:1'], {
      stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PODFLARE_MCP_TOKEN: 'secret-token' },
    });
    try {
      let out = '';
      const url = await new Promise<URL>((resolve, reject) => {
        child.stderr!.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /listening on http:\/\/[^:]+:(\d+)/.exec(out);
          if (m) resolve(new URL(`http://127.0.0.1:${m[1]}/mcp`));
        });
        child.once('exit', () => reject(new Error(out)));
      });
      const anonymous = new Client({ name: 'anon', version: '1' });
      await assert.rejects(anonymous.connect(new StreamableHTTPClientTransport(url)), /401|unauthorized/i);
      const authorized = new Client({ name: 'authorized', version: '1' });
      const transport = new StreamableHTTPClientTransport(url, { requestInit: { headers: { authorization: 'Bearer secret-token' } } });
      await authorized.connect(transport);
      assert.equal((await authorized.listTools()).tools.length, TOOLS.length);
      await transport.terminateSession();
      await authorized.close();
    } finally {
      child.kill('SIGTERM');
      await exited(child);
    }
  });
});

describe('createPodflareMcpServer in process', () => {
  let server: TestServer;
  before(async () => { server = await startTestServer({ poolSize: 1 }); });
  after(async () => server?.stop());

  it('requires sandbox_id when made with sessionSandbox: false, and close() destroys what it created', async () => {
    const mcpServer = createPodflareMcpServer({ host: server.url, sessionSandbox: false, log: () => undefined });
    const [clientSide, serverSide] = InMemoryTransport.createLinkedPair();
    await mcpServer.connect(serverSide);
    const client = new Client({ name: 'in-process', version: '1.0.0' });
    await client.connect(clientSide);
    const { tools } = await client.listTools();
    assert.deepEqual(tools.find((t) => t.name === 'run_python')!.inputSchema.required?.sort(), ['code', 'sandbox_id']);
    const r = await call(client, 'run_python', { code: '1' });
    assert.equal(r.isError, true);
    // The schema makes sandbox_id required, so the SDK's input validation answers (as a tool error).
    assert.match(text(r), /Input validation error.*sandbox_id/s);
    const { sandbox_id: id } = JSON.parse(await ok(client, 'create_sandbox', {})) as { sandbox_id: string };
    assert.match(await ok(client, 'run_python', { sandbox_id: id, code: 'print(6 * 7)' }), /42/);
    await mcpServer.close();
    assert.ok(!(await liveIds(server.url)).has(id));
    await client.close();
  });
});

/**
 * A JSON-RPC request as the hosted product's agent skill sends it (and as `curl` would): one POST,
 * no initialize, no mcp-session-id, a bearer key when one is set, and the Accept header the
 * Streamable HTTP spec asks every POST to carry.
 */
async function plainRpc(url: URL, method: string, params: Record<string, unknown>, key?: string) {
  const res = await fetch(url, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      accept: 'application/json, text/event-stream',
      ...(key ? { authorization: `Bearer ${key}` } : {}),
    },
    body: JSON.stringify({ jsonrpc: '2.0', id: 7, method, params }),
  });
  const body = (await res.json()) as { id?: number; result?: ToolResult & { tools?: Array<{ name: string }> }; error?: { message: string } };
  return { status: res.status, sessionId: res.headers.get('mcp-session-id'), body };
}

/** A plain `tools/call`; asserts it succeeded and returns the tool's text. */
async function plainCall(url: URL, name: string, args: Record<string, unknown>, key?: string): Promise<string> {
  const r = await plainRpc(url, 'tools/call', { name, arguments: args }, key);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.sessionId, null, 'a stateless answer opens no session');
  assert.equal(r.body.id, 7);
  assert.ok(r.body.result, JSON.stringify(r.body));
  assert.notEqual(r.body.result.isError, true, `${name} failed: ${text(r.body.result)}`);
  return text(r.body.result);
}

/**
 * What the hosted skill does, end to end, against one endpoint: list the tools, create a sandbox,
 * run code in it, and reach it again by sandbox_id in a later, unrelated request.
 */
async function statelessRoundTrip(url: URL, key?: string): Promise<string> {
  const listed = await plainRpc(url, 'tools/list', {}, key);
  assert.equal(listed.status, 200, JSON.stringify(listed.body));
  assert.deepEqual(listed.body.result?.tools?.map((t) => t.name).sort(), [...TOOLS].sort());
  const { sandbox_id: id } = JSON.parse(await plainCall(url, 'create_sandbox', {}, key)) as { sandbox_id: string };
  assert.match(id, SANDBOX_ID_PATTERN);
  assert.match(await plainCall(url, 'run_python', { sandbox_id: id, code: 'x = 41\nprint("set")' }, key), /stdout:\nset\n/);
  assert.match(await plainCall(url, 'run_python', { sandbox_id: id, code: 'print(x + 1)' }, key), /stdout:\n42\n/);
  assert.match(await plainCall(url, 'run_bash', { sandbox_id: id, command: 'echo $((6 * 7))' }, key), /stdout:\n42\n/);
  // Without a session there is no session sandbox: leaving sandbox_id out is a clear tool error.
  const missing = await plainRpc(url, 'tools/call', { name: 'run_python', arguments: { code: '1' } }, key);
  assert.equal(missing.body.result?.isError, true);
  assert.match(text(missing.body.result!), /sandbox_id/);
  return id;
}

describe('MCP as plain JSON-RPC POSTs, without a session (the hosted skill)', () => {
  let server: TestServer;
  before(async () => { server = await startTestServer({ poolSize: 2 }); });
  after(async () => server?.stop());

  it('answers tools/list and tools/call at / and /mcp of podflare-mcp --http, sandboxes persisting by id', async () => {
    const mcp = await startHttpChild(server.url, { PODFLARE_MCP_TOKEN: 'mcp-secret' });
    try {
      const root = new URL('/', mcp.url);
      const unauthorized = await plainRpc(root, 'tools/list', {});
      assert.equal(unauthorized.status, 401);
      for (const url of [root, mcp.url]) {
        const id = await statelessRoundTrip(url, 'mcp-secret');
        // The request ended, the sandbox did not: it lives until destroy_sandbox (or its idle timeout).
        assert.ok((await liveIds(server.url)).has(id));
        assert.equal(await plainCall(url, 'destroy_sandbox', { sandbox_id: id }, 'mcp-secret'), `Destroyed ${id}.`);
        assert.ok(!(await liveIds(server.url)).has(id));
      }
      // Sessions keep working beside it, at / too.
      const transport = new StreamableHTTPClientTransport(root, { requestInit: { headers: { authorization: 'Bearer mcp-secret' } } });
      const client = new Client({ name: 'session-beside-stateless', version: '1' });
      await client.connect(transport);
      assert.ok(transport.sessionId);
      await ok(client, 'run_python', { code: 'kept = "yes"' });
      assert.match(await ok(client, 'run_python', { code: 'print(kept)' }), /stdout:\nyes\n/);
      await transport.terminateSession();
      await client.close();
      // Bad input: a 4xx with a JSON-RPC error body.
      const notJson = await fetch(mcp.url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', authorization: 'Bearer mcp-secret' },
        body: '{nope',
      });
      assert.equal(notJson.status, 400);
      assert.match(((await notJson.json()) as { error: { message: string } }).error.message, /not JSON/);
    } finally {
      mcp.child.kill('SIGTERM');
      await exited(mcp.child);
    }
  });
});

/** Starts `podflare serve` (the CLI) as a child with these API keys; resolves with its URL. */
async function startServe(stateDir: string, apiKeys: string): Promise<{ child: ChildProcess; url: string; output: () => string }> {
  const child = spawn(process.execPath, [
    CLI, 'serve', '--port', '0', '--state-dir', stateDir, '--images-dir', IMAGES_DIR, '--pool-size', '1', '--disk-volume-mb', '512',
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PODFLARE_API_KEYS: apiKeys, PODFLARE_LOG_LEVEL: 'warn' } });
  let output = '';
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line: ${output}`)), 60_000);
    const onData = (d: Buffer) => {
      output += d.toString();
      // The last line serve prints once it is up.
      const m = /podflare listening on (http:\/\/\S+)[^]*\nmcp: /.exec(output);
      if (m) { clearTimeout(timer); resolve(m[1]!); }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`serve exited with ${code}: ${output}`)); });
  });
  return { child, url, output: () => output };
}

describe('podflare serve serves MCP at /mcp', () => {
  let stateDir: string;
  let serve: Awaited<ReturnType<typeof startServe>>;
  let mcpUrl: URL;
  before(async () => {
    stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-test-'));
    serve = await startServe(stateDir, 'key-alice,key-bob');
    mcpUrl = new URL('/mcp', serve.url);
  });
  after(async () => {
    if (serve?.child.exitCode === null) {
      serve.child.kill('SIGTERM');
      await exited(serve.child);
    }
    if (stateDir) await rm(stateDir, { recursive: true, force: true });
  });

  it('says where, and answers the official MCP client with the API key, in a session', async () => {
    assert.ok(serve.output().includes(`mcp: ${serve.url}/mcp\n`), serve.output());
    const anonymous = new Client({ name: 'anon', version: '1' });
    await assert.rejects(anonymous.connect(new StreamableHTTPClientTransport(mcpUrl)), /401|API key/i);
    const transport = new StreamableHTTPClientTransport(mcpUrl, { requestInit: { headers: { authorization: 'Bearer key-alice' } } });
    const client = new Client({ name: 'serve-session', version: '1' });
    await client.connect(transport);
    assert.ok(transport.sessionId);
    assert.deepEqual((await client.listTools()).tools.map((t) => t.name).sort(), [...TOOLS].sort());
    await ok(client, 'run_python', { code: 'who = "alice"' });
    assert.match(await ok(client, 'run_python', { code: 'print(who)' }), /stdout:\nalice\n/);
    // The session's sandbox belongs to alice's key: the REST API shows it to her, not to bob.
    const alice = await Sandbox.list({ host: serve.url, apiKey: 'key-alice' });
    const own = alice.filter((s) => s.metadata.role === 'session');
    assert.equal(own.length, 1);
    assert.equal((await Sandbox.list({ host: serve.url, apiKey: 'key-bob' })).filter((s) => s.id === own[0]!.id).length, 0);
    // Another key cannot use alice's session id.
    const hijack = await fetch(mcpUrl, {
      method: 'POST',
      headers: {
        'content-type': 'application/json', accept: 'application/json, text/event-stream',
        authorization: 'Bearer key-bob', 'mcp-session-id': transport.sessionId!,
      },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'tools/list' }),
    });
    assert.equal(hijack.status, 404);
    // Ending the session destroys its sandbox.
    await transport.terminateSession();
    await client.close();
    const after = await Sandbox.list({ host: serve.url, apiKey: 'key-alice' });
    assert.ok(!after.some((s) => s.id === own[0]!.id), 'the session sandbox is destroyed with the session');
  });

  it('answers plain JSON-RPC tools/call without a session, sandboxes persisting by id', async () => {
    const unauthorized = await plainRpc(mcpUrl, 'tools/list', {});
    assert.equal(unauthorized.status, 401);
    const wrongKey = await plainRpc(mcpUrl, 'tools/list', {}, 'key-mallory');
    assert.equal(wrongKey.status, 401);
    const id = await statelessRoundTrip(mcpUrl, 'key-bob');
    const bobs = await Sandbox.list({ host: serve.url, apiKey: 'key-bob' });
    assert.ok(bobs.some((s) => s.id === id), 'made with the caller\'s own key');
    // Alice's key cannot reach bob's sandbox through MCP either.
    const foreign = await plainRpc(mcpUrl, 'tools/call', { name: 'run_python', arguments: { sandbox_id: id, code: 'print(x)' } }, 'key-alice');
    assert.equal(foreign.body.result?.isError, true);
    assert.match(text(foreign.body.result!), /not found/);
    assert.equal(await plainCall(mcpUrl, 'destroy_sandbox', { sandbox_id: id }, 'key-bob'), `Destroyed ${id}.`);
  });

  it('keeps web pages out of /mcp (the API\'s browser guard)', async () => {
    const init = JSON.stringify({
      jsonrpc: '2.0', id: 1, method: 'initialize',
      params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'raw', version: '0' } },
    });
    const url = new URL(mcpUrl);
    assert.equal(await rawPost(url, 'evil.example', init), 403);
    const crossSite = await fetch(mcpUrl, {
      method: 'POST',
      headers: {
        'content-type': 'application/json', accept: 'application/json, text/event-stream',
        authorization: 'Bearer key-alice', origin: 'https://evil.example',
      },
      body: init,
    });
    assert.equal(crossSite.status, 403);
  });

  it('stops on SIGTERM with an MCP session open, destroying its sandbox', async () => {
    const transport = new StreamableHTTPClientTransport(mcpUrl, { requestInit: { headers: { authorization: 'Bearer key-alice' } } });
    const client = new Client({ name: 'serve-shutdown', version: '1' });
    await client.connect(transport);
    await ok(client, 'run_python', { code: 'y = 1' });
    serve.child.kill('SIGTERM');
    assert.equal(await exited(serve.child), 0);
    assert.doesNotMatch(serve.output(), /could not destroy/);
    assert.match(serve.output(), /session ended: destroyed sbx_/);
    await client.close().catch(() => undefined);
  });
});
