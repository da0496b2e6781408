/**
 * `fork5py`: fork(5) of a parent holding a 200 MB DataFrame, timed at the Python SDK
 * (bench/fork_python.py, the host's /usr/bin/python3 with python/ on its path) against the fork
 * measures' server: printed beside the TypeScript SDK's fork5 row.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { notes, rows, status } from './report.js';
import { fmtMs } from './stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TARGET_P50 = 30;

export async function measureFork5Python(url: string, quick: boolean): Promise<void> {
  const n = quick ? 10 : 40;
  const child = spawn('/usr/bin/python3', [path.join(ROOT, 'bench', 'fork_python.py'), '--host', url, '-n', String(n)], {
    env: { ...process.env, PYTHONPATH: path.join(ROOT, 'python') },
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  const m = /fork5 p50 ([\d.]+) ms p99 ([\d.]+) ms n (\d+)/.exec(out);
  if (code !== 0 || !m) throw new Error(`bench/fork_python.py failed (${code}): ${out.trim().slice(-500)}`);
  const p50 = Number(m[1]);
  rows.push({
    measure: 'fork(5) of a 200 MB DataFrame parent, Python SDK', n: m[3]!, p50: fmtMs(p50), p99: fmtMs(Number(m[2])),
    target: `p50 ≤ ${TARGET_P50} ms`, peer: `${(p50 / TARGET_P50).toFixed(2)}× target`, status: status(p50 <= TARGET_P50),
  });
  notes.push('fork5py: bench/fork_python.py (the Python SDK, http.client) against the fork measures\' server; 0.5 s between runs, children closed outside the timing.');
}
