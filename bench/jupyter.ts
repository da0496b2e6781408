/**
 * Runs the Jupyter peer (bench/jupyter_peer.py with Debian's /usr/bin/python3) and returns its
 * timings: the same statement as Podflare's hot exec, sent to a local ipykernel.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export interface JupyterResult {
  samplesMs: number[];
  wrongOutput: number;
  kernelPssBytes: number | null;
  versions: Record<string, string>;
}

const DRIVER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'jupyter_peer.py');
export const PEER_PYTHON = process.env.PODFLARE_BENCH_PYTHON ?? '/usr/bin/python3';

export function runJupyterPeer(opts: { n: number; warmup: number; timeoutMs?: number }): Promise<JupyterResult> {
  const timeoutMs = opts.timeoutMs ?? 180_000;
  return new Promise((resolve, reject) => {
    const child = spawn(PEER_PYTHON, [DRIVER, '--n', String(opts.n), '--warmup', String(opts.warmup)], {
      stdio: ['ignore', 'pipe', 'pipe'],
      // Quiets debugpy's start-up notice in the kernel; nothing else changes.
      env: { ...process.env, PYDEVD_DISABLE_FILE_VALIDATION: '1' },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-4000); });
    const timer = setTimeout(() => {
      // The driver shuts its kernel down in a finally; SIGINT lets it get there.
      child.kill('SIGINT');
      setTimeout(() => { if (child.exitCode === null) child.kill('SIGKILL'); }, 5000).unref();
      reject(new Error(`the Jupyter peer did not finish within ${timeoutMs} ms`));
    }, timeoutMs);
    child.once('error', (err) => { clearTimeout(timer); reject(new Error(`cannot run ${PEER_PYTHON}: ${err.message}`)); });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      const last = stdout.trim().split('\n').pop() ?? '';
      if (code !== 0 || !last.startsWith('{')) {
        const tail = stderr.trim().split('\n').slice(-6).join(' | ');
        reject(new Error(`the Jupyter peer failed (${signal ?? `exit ${code}`}): ${tail || 'no output'}`));
        return;
      }
      const raw = JSON.parse(last) as { samples_ms: number[]; wrong_output: number; kernel_pss_bytes: number | null; versions: Record<string, string> };
      resolve({ samplesMs: raw.samples_ms, wrongOutput: raw.wrong_output, kernelPssBytes: raw.kernel_pss_bytes, versions: raw.versions });
    });
  });
}
