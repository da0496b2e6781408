"""The JavaScript REPL: `language: "javascript"` execs with state that persists across calls.

One long-lived `node` process per sandbox (started by the first JavaScript exec, in its own session
so an interrupted exec does not take it down) evaluates every cell in one `vm` context: top-level
`let`/`const`/`function` and globals persist, as in Node's REPL. Each exec is an ordinary bash exec of
a small client that hands the cell to that process over a unix socket and relays what it prints:
`console.log` to stdout, `console.error` to stderr, the cell's last value (`util.inspect`, awaited if a
promise) to stdout, an uncaught error's stack to stderr with exit code 1, `display(...)` (and
`display.html/svg/markdown/png/json`) to rich results (MIME bundles, as Python's). Timeouts and interrupts
stop the client (the exec ends); the REPL then stops its cell too:
  - a cell awaiting a promise stops being awaited (the promise itself may still settle later);
  - a synchronous cell (`while (true) {}`) blocks the REPL's event loop, so a watchdog thread (a
    worker_thread, which has a loop of its own) watches the client of the running cell and, once
    that client is gone, sends the REPL SIGINT: the cell runs with `breakOnSigint`, so it throws
    "Script execution interrupted." and the REPL's state (everything defined before and by the cell
    up to that point) stays. Not covered: a synchronous endless loop in a callback that runs later
    (a timer, a promise continuation) blocks the REPL for good: later JavaScript execs time out.

Fork: the REPL is a process beside the interpreter, and a fork's children do not get the parent's
processes: a child starts with an empty JavaScript state (its Python state is copied as usual).
Needs `node` in the image (Debian's `nodejs`).
"""
from __future__ import annotations

import os
import secrets



def js_dir() -> str:
    """Where the REPL's files and socket live: per agent (its pid is 1 in every sandbox)."""
    return f'/tmp/.podflare-js-{os.getuid()}-{os.getpid()}'

SERVER = r"""
const net = require('net'), vm = require('vm'), util = require('util'), fs = require('fs');
const [sock, agentPid] = [process.argv[2], Number(process.argv[3])];
// Ends with the agent (on a host without a pid namespace of its own, nothing else would end it).
setInterval(() => {
  try { process.kill(agentPid, 0); } catch (e) {
    if (e.code !== 'ESRCH') return;
    fs.rmSync(require('path').dirname(sock), { recursive: true, force: true });
    process.exit(0);
  }
}, 1000).unref();
// Stray SIGINTs (the watchdog's, arriving after a cell ended) must not end the REPL.
process.on('SIGINT', () => {});
// The watchdog: told which client's cell is running; SIGINTs the REPL once that client is gone.
const { Worker } = require('worker_threads');
const watchdog = new Worker(`
  const { parentPort } = require('worker_threads');
  let client = 0;
  parentPort.on('message', (pid) => { client = pid; });
  setInterval(() => {
    if (!client) return;
    try { process.kill(client, 0); } catch (e) {
      if (e.code !== 'ESRCH') return;
      client = 0;
      process.kill(process.pid, 'SIGINT');
    }
  }, 100);
`, { eval: true });
watchdog.unref();
const ctx = vm.createContext({ require, process, Buffer, URL, URLSearchParams, TextEncoder, TextDecoder,
  setTimeout, setInterval, clearTimeout, clearInterval, setImmediate, queueMicrotask, fetch: globalThis.fetch });
let out = null;
const emit = (s, d) => { if (out && !out.destroyed) out.write(JSON.stringify({ s, d }) + '\n'); };
// Rich results: display(value) shows a MIME bundle ({"text/html": ...} as it is; any other value as
// text/plain, plus application/json when it is plain data); display.html/svg/markdown/png/json(x)
// say which type. They go to the exec as result events (the client's results pipe).
const bundle = (v) => {
  if (v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length && Object.keys(v).every((k) => k.includes('/'))) {
    return { 'text/plain': typeof v['text/plain'] === 'string' ? v['text/plain'] : '<rich result>', ...v };
  }
  const b = { 'text/plain': util.inspect(v) };
  if (v !== null && typeof v === 'object') { try { b['application/json'] = JSON.parse(JSON.stringify(v)); } catch {} }
  return b;
};
const display = (v) => { emit('r', bundle(v)); };
display.html = (s) => display({ 'text/html': String(s), 'text/plain': '<HTML>' });
display.svg = (s) => display({ 'image/svg+xml': String(s), 'text/plain': '<SVG>' });
display.markdown = (s) => display({ 'text/markdown': String(s), 'text/plain': String(s) });
display.png = (b) => display({ 'image/png': Buffer.isBuffer(b) ? b.toString('base64') : String(b), 'text/plain': '<PNG>' });
display.json = (o) => display({ 'application/json': JSON.parse(JSON.stringify(o)), 'text/plain': util.inspect(o) });
ctx.display = display;
const fmt = (a) => util.format(...a) + '\n';
ctx.console = { log: (...a) => emit('o', fmt(a)), info: (...a) => emit('o', fmt(a)), debug: (...a) => emit('o', fmt(a)),
  warn: (...a) => emit('e', fmt(a)), error: (...a) => emit('e', fmt(a)) };
let queue = Promise.resolve();
try { fs.unlinkSync(sock); } catch {}
net.createServer((c) => {
  let buf = '';
  c.on('error', () => {});
  c.on('data', (d) => {
    buf += d;
    const i = buf.indexOf('\n');
    if (i < 0) return;
    const { code, pid } = JSON.parse(buf.slice(0, i));
    buf = '';
    queue = queue.then(() => run(code, c, pid));
  });
}).listen(sock);
async function run(code, c, pid) {
  out = c;
  let exit = 0;
  if (c.destroyed) return; // interrupted while it waited behind another cell
  watchdog.postMessage(pid);
  try {
    let v = vm.runInContext(code, ctx, { filename: 'cell.js', breakOnSigint: true });
    if (v && typeof v.then === 'function') {
      // An interrupted cell (its client gone) stops being awaited, so the next cells run.
      const gone = new Promise((r) => c.once('close', () => r(gone)));
      v = await Promise.race([v, gone]);
      if (v === gone) return;
    }
    if (v !== undefined) emit('o', util.inspect(v) + '\n');
  } catch (e) {
    emit('e', ((e && e.stack) || String(e)) + '\n');
    exit = 1;
  } finally {
    watchdog.postMessage(0);
  }
  if (!c.destroyed) c.end(JSON.stringify({ x: exit }) + '\n');
  if (out === c) out = null;
}
"""

CLIENT = r"""
const net = require('net'), fs = require('fs'), cp = require('child_process');
const [sock, serverFile, codeFile, agentPid] = process.argv.slice(2);
// Rich results go to a pipe of their own (the agent's, podflare_exec.py); without it, as text.
const resultsFd = Number(process.env.PODFLARE_RESULTS_FD) || 0;
const code = fs.readFileSync(codeFile, 'utf8');
fs.unlinkSync(codeFile);
let tries = 0;
function connect() {
  const c = net.connect(sock);
  c.on('connect', () => {
    c.write(JSON.stringify({ code, pid: process.pid }) + '\n');
    let buf = '';
    c.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, i));
        buf = buf.slice(i + 1);
        if ('x' in m) { process.exitCode = m.x; continue; }
        if (m.s === 'r') {
          if (resultsFd) fs.writeSync(resultsFd, JSON.stringify({ data: m.d }) + '\n');
          else process.stdout.write(m.d['text/plain'] + '\n');
          continue;
        }
        (m.s === 'e' ? process.stderr : process.stdout).write(m.d);
      }
    });
  });
  c.on('error', () => {
    if (tries++ === 0) {
      cp.spawn(process.execPath, [serverFile, sock, agentPid], { detached: true, stdio: 'ignore' }).unref();
    }
    if (tries > 200) { process.stderr.write('the JavaScript REPL did not start\n'); process.exit(1); }
    setTimeout(connect, 25);
  });
}
connect();
"""


def _ensure_files() -> tuple[str, str]:
    os.makedirs(js_dir(), mode=0o700, exist_ok=True)
    paths = []
    for name, text in (('server.js', SERVER), ('client.js', CLIENT)):
        path = os.path.join(js_dir(), name)
        try:
            with open(path, encoding='utf-8') as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
        paths.append(path)
    return paths[0], paths[1]


def bash_for(code: str) -> str:
    """The bash command that runs one JavaScript cell in the sandbox's REPL."""
    server, client = _ensure_files()
    cell = os.path.join(js_dir(), f'cell-{secrets.token_hex(8)}.js')
    with open(cell, 'w', encoding='utf-8') as f:
        f.write(code)
    sock = os.path.join(js_dir(), 'repl.sock')
    return f"exec node '{client}' '{sock}' '{server}' '{cell}' {os.getpid()}"
