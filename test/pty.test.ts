/** Terminals: bash on a PTY over a WebSocket, through the SDK and raw; resize seen by tput; auth and origin. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer, useServerAndSandbox } from './helpers/server.js';
import { openWebSocket } from './helpers/websocket.js';

/** The terminal's text without escape sequences (bracketed paste, colours). */
const plain = (text: string) => text.replace(/\x1b\[[0-9;?]*[a-zA-Z]/g, '');

async function until(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

describe('pty', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  useServerAndSandbox((s, b) => { server = s; sbx = b; });

  it('gives a bash prompt; echo hi gives hi; a resize is seen by tput cols; exit ends it', async () => {
    let out = '';
    const term = await sbx.pty.create({ cols: 100, rows: 30, onData: (d) => { out += d; } });
    await until('the prompt', () => /# $/.test(plain(out)));
    term.sendInput('echo hi\r');
    await until('hi', () => /echo hi\r\n\r?hi\r\n/.test(plain(out)));
    term.sendInput('tput cols\r');
    await until('100', () => /[\r\n]100\r\n/.test(plain(out)));
    term.resize({ cols: 132, rows: 50 });
    await sleep(200);
    term.sendInput('tput cols; tput lines\r');
    await until('132 and 50', () => /[\r\n]132\r\n50\r\n/.test(plain(out)));
    // The interpreter is not blocked by the terminal.
    assert.equal((await sbx.runCode('print(6*7)')).stdout, '42\n');
    const listed = (await sbx.commands.list()).find((p) => p.pid === term.pid);
    assert.ok(listed?.running, 'the shell is a background process with a terminal');
    term.sendInput('exit 3\r');
    assert.equal(await term.wait(), 3);
  });

  it('closing the connection ends the shell', async () => {
    const term = await sbx.pty.create({ onData: () => undefined });
    term.kill();
    let running = true;
    for (let i = 0; i < 100 && running; i++) {
      running = (await sbx.commands.get(term.pid)).running;
      if (running) await sleep(100);
    }
    assert.equal(running, false);
  });

  it('refuses a foreign origin (no shell for a web page) and bad sizes', async () => {
    const port = Number(new URL(server.url).port);
    await assert.rejects(openWebSocket(port, `/v1/sandboxes/${sbx.id}/pty`, { Origin: 'https://evil.example' }),
      (e: Error & { response?: string }) => /^HTTP\/1\.1 403/.test(e.response ?? ''));
    await assert.rejects(openWebSocket(port, `/v1/sandboxes/${sbx.id}/pty?cols=99999`),
      (e: Error & { response?: string }) => /^HTTP\/1\.1 400/.test(e.response ?? ''));
    // The server's own origin (the dashboard) may.
    const ws = await openWebSocket(port, `/v1/sandboxes/${sbx.id}/pty`, { Origin: server.url });
    const started = JSON.parse(await ws.next()) as { type: string; pid: number };
    assert.equal(started.type, 'started');
    ws.send(JSON.stringify({ type: 'input', data: 'echo raw-$((6*7))\r' }));
    let seen = '';
    while (!plain(seen).includes('raw-42\r\n')) seen += (JSON.parse(await ws.next()) as { data?: string }).data ?? '';
    ws.close();
  });
});

describe('pty with API keys', () => {
  let server!: TestServer;
  let sbx!: Sandbox;
  before(async () => {
    server = await startTestServer({ poolSize: 1, apiKeys: ['pty-key'] });
    sbx = await Sandbox.create({ host: server.url, apiKey: 'pty-key' });
  });
  after(async () => {
    await sbx?.close();
    await server?.stop();
  });

  it('needs the key; the SDK sends it', async () => {
    const port = Number(new URL(server.url).port);
    await assert.rejects(openWebSocket(port, `/v1/sandboxes/${sbx.id}/pty`), (e: Error & { response?: string }) => /^HTTP\/1\.1 401/.test(e.response ?? ''));
    let out = '';
    const term = await sbx.pty.create({ onData: (d) => { out += d; } });
    term.sendInput('echo keyed\r');
    await until('keyed', () => /[\r\n]keyed\r\n/.test(plain(out)));
    term.kill();
  });
});
