/**
 * The Python SDK's hot round trip, beside the TypeScript one: python/bench.py (stdlib only, run with
 * the host's /usr/bin/python3) against the same in-process server, over one kept-alive connection.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { notes, rows, status } from './report.js';
import { fmtMs } from './stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export async function measurePythonSdk(url: string, n: number): Promise<void> {
  const child = spawn('/usr/bin/python3', [path.join(ROOT, 'python', 'bench.py'), '--host', url, '-n', String(n), '--warmup', '20'], {
    env: { ...process.env, PYTHONPATH: path.join(ROOT, 'python') },
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  const m = /p50 ([\d.]+) ms .*p99 ([\d.]+) ms/.exec(out);
  if (code !== 0 || !m) throw new Error(`python/bench.py failed (${code}): ${out.trim().slice(-500)}`);
  const p50 = Number(m[1]);
  rows.push({
    measure: 'hot run_code("print(6*7)") from the Python SDK', n: String(n), p50: fmtMs(p50), p99: fmtMs(Number(m[2])),
    target: 'p50 ≤ 4 ms', peer: '–', status: status(p50 <= 4),
  });
  notes.push('Python SDK: python/bench.py (http.client, one kept-alive connection) against the same server.');
}
