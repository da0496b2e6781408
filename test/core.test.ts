/**
 * The persistent interpreter through the real server and real sandboxes: state across calls, rich
 * results, errors, streaming, timeouts and interrupts, bash.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { useServerAndSandbox } from './helpers/server.js';

describe('persistent interpreter', () => {
  let sbx!: Sandbox;
  useServerAndSandbox((_server, b) => { sbx = b; });

  it('keeps variables, imports, open files and cwd across calls', async () => {
    await sbx.runCode('import json\nx = 41\nf = open("/tmp/state.txt", "w+")\nf.write("line1\\nline2\\n")\nf.seek(0)\nimport os\nos.makedirs("/tmp/work", exist_ok=True)\nos.chdir("/tmp/work")');
    const r = await sbx.runCode('print(x + 1, json.dumps({"a": 1}), f.readline().strip(), os.getcwd())');
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stdout, '42 {"a": 1} line1 /tmp/work\n');
    const again = await sbx.runCode('f.readline().strip()');
    assert.equal(again.results[0]?.text, "'line2'");
  });

  it('returns the last expression as the main result, counting executions', async () => {
    const a = await sbx.runCode('6 * 7');
    assert.equal(a.results.length, 1);
    assert.equal(a.results[0]!.isMainResult, true);
    assert.equal(a.results[0]!.text, '42');
    const b = await sbx.runCode('None');
    assert.equal(b.results.length, 0);
    assert.equal(b.executionCount, a.executionCount! + 1);
  });

  it('gives a DataFrame as text/html and a matplotlib plot as a decodable PNG', async () => {
    const df = await sbx.runCode('import pandas as pd\npd.DataFrame({"a": [1, 2], "b": [3, 4]})');
    assert.equal(df.exitCode, 0, df.stderr);
    assert.match(df.results[0]?.html ?? '', /<table/);
    const plot = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()');
    assert.equal(plot.exitCode, 0, plot.stderr);
    const png = plot.results.find((r) => r.png);
    assert.ok(png, `no PNG among ${JSON.stringify(plot.results.map((r) => Object.keys(r.data)))}`);
    const bytes = Buffer.from(png.png!, 'base64');
    assert.deepEqual([...bytes.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    assert.ok(bytes.length > 1000);
  });

  it('reports exceptions with a traceback and keeps the interpreter alive', async () => {
    await sbx.runCode('survivor = "still here"');
    const r = await sbx.runCode('def boom():\n    return 1 / 0\nboom()');
    assert.equal(r.exitCode, 1);
    assert.equal(r.error?.name, 'ZeroDivisionError');
    assert.match(r.error!.traceback, /boom/);
    assert.match(r.stderr, /ZeroDivisionError/); // hosted-API users only read stderr
    const next = await sbx.runCode('print(survivor)');
    assert.equal(next.stdout, 'still here\n');
  });

  it('reports syntax errors and SystemExit codes', async () => {
    const syntax = await sbx.runCode('def broken(:\n  pass');
    assert.equal(syntax.exitCode, 1);
    assert.equal(syntax.error?.name, 'SyntaxError');
    const exit3 = await sbx.runCode('raise SystemExit(3)');
    assert.equal(exit3.exitCode, 3);
    assert.equal((await sbx.runCode('1')).exitCode, 0);
  });

  it('catches output at the file-descriptor level (C code and child processes)', async () => {
    const r = await sbx.runCode('import os, subprocess\nos.write(1, b"raw fd\\n")\nsubprocess.run(["echo", "from child"])\nimport ctypes\nctypes.CDLL(None).puts(b"from libc")');
    assert.equal(r.exitCode, 0, r.stderr);
    assert.match(r.stdout, /raw fd/);
    assert.match(r.stdout, /from child/);
    assert.match(r.stdout, /from libc/);
  });

  it('streams output as it is produced', async () => {
    const arrivals: number[] = [];
    const started = Date.now();
    let exit: number | undefined;
    for await (const ev of sbx.runCodeStream('import time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.3)')) {
      if (ev.type === 'stdout') arrivals.push(Date.now() - started);
      if (ev.type === 'exit') exit = ev.data;
    }
    assert.equal(exit, 0);
    assert.ok(arrivals.length >= 3, `stdout came in ${arrivals.length} events`);
    assert.ok(arrivals[0]! < 700, `first output after ${arrivals[0]} ms`);
    assert.ok(arrivals.at(-1)! - arrivals[0]! > 500, `events spread over ${arrivals.at(-1)! - arrivals[0]!} ms`);
  });

  it('times out an endless loop with KeyboardInterrupt and keeps state', async () => {
    await sbx.runCode('kept = 7');
    const r = await sbx.runCode('while True: pass', { timeoutMs: 500 });
    assert.equal(r.exitCode, 124);
    assert.equal(r.error?.name, 'TimeoutError');
    assert.equal(r.stateLost, false);
    assert.equal((await sbx.runCode('print(kept)')).stdout, '7\n');
  });

  it('restarts an interpreter that ignores the interrupt, saying state was lost', async () => {
    await sbx.runCode('lost = 1');
    const r = await sbx.runCode('import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.05)', { timeoutMs: 300 });
    assert.equal(r.exitCode, 124);
    assert.equal(r.stateLost, true);
    const after = await sbx.runCode('print("lost" in globals())');
    assert.equal(after.stdout, 'False\n');
  });

  it('interrupts a running exec on request', async () => {
    const running = sbx.runCode('import time\nwhile True: time.sleep(0.01)');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await sbx.interrupt(), true);
    const r = await running;
    assert.equal(r.error?.name, 'KeyboardInterrupt');
    assert.equal((await sbx.runCode('print("usable")')).stdout, 'usable\n');
  });

  it('runs bash in a fresh shell per call with its exit code', async () => {
    const r = await sbx.runCode('echo hi; export GONE=1; echo err >&2; exit 5', 'bash');
    assert.equal(r.stdout, 'hi\n');
    assert.equal(r.stderr, 'err\n');
    assert.equal(r.exitCode, 5);
    const fresh = await sbx.runCode('echo "[${GONE:-unset}]"', { language: 'bash' });
    assert.equal(fresh.stdout, '[unset]\n');
  });

  it('applies per-call env and cwd', async () => {
    const py = await sbx.runCode('import os\nprint(os.environ["ONLY_NOW"], os.getcwd())', { env: { ONLY_NOW: 'yes' }, cwd: '/tmp' });
    assert.equal(py.stdout, 'yes /tmp\n');
    const sh = await sbx.runCode('echo $ONLY_NOW $(pwd)', { language: 'bash', env: { ONLY_NOW: 'sh' }, cwd: '/etc' });
    assert.equal(sh.stdout, 'sh /etc\n');
    const later = await sbx.runCode('import os\nprint(os.environ.get("ONLY_NOW"))');
    assert.equal(later.stdout, 'None\n');
  });

  it('queues concurrent execs on one sandbox instead of mixing them', async () => {
    assert.equal((await sbx.runCode('order = []')).error, undefined);
    const calls = [0, 1, 2, 3].map((i) => sbx.runCode(`import time\norder.append(${i}); time.sleep(0.05); order.append(${i})`));
    for (const r of await Promise.all(calls)) assert.deepEqual([r.error, r.exitCode], [undefined, 0]);
    const r = await sbx.runCode('import json; print(json.dumps(order))');
    assert.equal(r.exitCode, 0, r.stderr);
    const order = JSON.parse(r.stdout) as number[];
    // Every call ran (an empty or short list would make the pair check below pass vacuously),
    // each one's two appends side by side.
    assert.deepEqual([...order].sort(), [0, 0, 1, 1, 2, 2, 3, 3]);
    for (let i = 0; i < order.length; i += 2) assert.equal(order[i], order[i + 1], `interleaved: ${order}`);
  });
});
