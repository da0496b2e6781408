/** The `podflare` command against a real server: run, ls, rm, doctor, serve. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { detectKvm } from '@podflare/server';
import { Sandbox } from 'podflare';
import { IMAGES_DIR, startTestServer, type TestServer } from './helpers/server.js';

const CLI = path.resolve(import.meta.dirname, '../packages/cli/dist/main.js');
/** Runs the CLI as a child process (asynchronously: the server under test lives in this process). */
function cli(args: string[], host?: string, input?: string): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...(host ? { PODFLARE_HOST: host } : {}) } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  child.stdin.end(input ?? '');
  return new Promise((resolve) => child.once('close', (status) => resolve({ status, stdout, stderr })));
}

describe('podflare CLI', () => {
  let server: TestServer;
  before(async () => { server = await startTestServer({ poolSize: 1 }); });
  after(async () => server?.stop());

  it('runs code in a fresh sandbox, streaming output and passing the exit code on', async () => {
    const ok = await cli(['run', 'print(6*7)'], server.url);
    assert.equal(ok.status, 0, ok.stderr);
    assert.match(ok.stdout, /^42$/m);
    const failing = await cli(['run', 'import sys; sys.exit(3)'], server.url);
    assert.equal(failing.status, 3);
    const bash = await cli(['run', '--bash', '-'], server.url, 'echo from-stdin\n');
    assert.equal(bash.status, 0, bash.stderr);
    assert.match(bash.stdout, /from-stdin/);
  });

  it('lists and removes sandboxes', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    const ls = await cli(['ls'], server.url);
    assert.equal(ls.status, 0, ls.stderr);
    assert.ok(ls.stdout.includes(sbx.id), ls.stdout);
    assert.equal((await cli(['rm', sbx.id], server.url)).status, 0);
    assert.ok(!(await cli(['ls'], server.url)).stdout.includes(sbx.id));
    assert.equal((await cli(['rm', 'not-an-id'], server.url)).status, 2);
  });

  it('reports the machine with doctor, including what kind of KVM it has and which acceleration follows', async () => {
    const r = await cli(['doctor', '--images-dir', IMAGES_DIR]);
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /bubblewrap/i);
    const kvm = await detectKvm();
    const line = r.stdout.split('\n').find((l) => /\]\s+kvm\s/.test(l)) ?? '';
    // Hardware KVM only: a nested (PVM) or missing /dev/kvm means TCG, and the line says why.
    assert.ok(line.includes(kvm.kind === 'hardware' ? 'VM acceleration: KVM' : 'VM acceleration: TCG'), r.stdout);
    assert.ok(line.includes(kvm.detail), r.stdout);
  });

  it('runtime auto: the VM runtime is the default only with hardware KVM, else the namespace runtime', async () => {
    const kvm = await detectKvm();
    const auto = await startTestServer({ runtime: 'auto', poolSize: 1 });
    try {
      const sbx = await Sandbox.create({ host: auto.url });
      try {
        assert.equal((await sbx.info()).runtime, kvm.kind === 'hardware' ? 'vm' : 'ns');
      } finally {
        await sbx.close();
      }
    } finally {
      await auto.stop();
    }
  });

  it('serves until SIGTERM, then leaves nothing behind', async () => {
    const child = spawn(process.execPath, [CLI, 'serve', '--port', '0', '--state-dir', `${server.stateDir}/cli-serve`, '--images-dir', IMAGES_DIR, '--pool-size', '1', '--disk-volume-mb', '512'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const url = await new Promise<string>((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`no listening line: ${out}`)), 30_000);
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /http:\/\/127\.0\.0\.1:\d+/.exec(out);
        if (m) { clearTimeout(timer); resolve(m[0]); }
      });
    });
    const r = await cli(['run', 'print("served")'], url);
    assert.match(r.stdout, /served/);
    child.kill('SIGTERM');
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    assert.equal(code, 0);
  });
});
