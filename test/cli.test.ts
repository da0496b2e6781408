/** The `podflare` command against a real server: run, ls, rm, doctor, serve. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, rm, stat } from 'node:fs/promises';
import os from 'node:os';
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

  it('finds the server through PODFLARE_HOSTD_URL (the hosted SDKs\' variable) and names an unreachable one', async () => {
    const run = (env: NodeJS.ProcessEnv) => {
      const child = spawn(process.execPath, [CLI, 'ls'], { env });
      let out = '';
      child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
      child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
      return new Promise<{ status: number | null; out: string }>((resolve) => child.once('close', (status) => resolve({ status, out })));
    };
    const { PODFLARE_HOST: _ignored, ...base } = process.env;
    const sbx = await Sandbox.create({ host: server.url });
    try {
      const ok = await run({ ...base, PODFLARE_HOSTD_URL: server.url });
      assert.equal(ok.status, 0, ok.out);
      assert.ok(ok.out.includes(sbx.id), ok.out);
      const down = await run({ ...base, PODFLARE_HOSTD_URL: 'http://127.0.0.1:9' });
      assert.notEqual(down.status, 0);
      assert.match(down.out, /127\.0\.0\.1:9/);
      assert.match(down.out, /PODFLARE_HOSTD_URL/);
    } finally {
      await sbx.close();
    }
  });

  it('runs as `npx podflare` inside the repo, as the README says', async () => {
    // The npm package named `podflare` is the SDK (no bin): npx used to answer "could not determine
    // executable to run". scripts/setup.sh links the CLI's bin once it is built.
    const repo = path.resolve(import.meta.dirname, '..');
    const child = spawn('npx', ['--no-install', 'podflare', 'ls', '--host', server.url], { cwd: repo });
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    const status = await new Promise<number | null>((resolve) => child.once('close', resolve));
    assert.equal(status, 0, out);
    assert.doesNotMatch(out, /could not determine executable/);
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

  it('refuses a state directory the sandboxes cannot reach, at start and in doctor, naming the directory to change', async () => {
    // mktemp -d makes 0700 directories: a state directory inside one used to start, then fail
    // every sandbox with "the sandbox's agent is gone: channel closed".
    const closed = await mkdtemp(path.join(os.tmpdir(), 'pf-closed-'));
    try {
      assert.equal((await stat(closed)).mode & 0o777, 0o700);
      const stateDir = path.join(closed, 'state');
      const started = Date.now();
      const serve = await cli(['serve', '--port', '0', '--state-dir', stateDir, '--images-dir', IMAGES_DIR, '--pool-size', '1']);
      assert.notEqual(serve.status, 0);
      assert.ok(serve.stderr.includes(`${closed} is mode 0700`), serve.stderr);
      assert.match(serve.stderr, /chmod o\+x/);
      assert.ok(Date.now() - started < 20_000, 'refused before building or starting anything');
      assert.ok(!existsSync(stateDir), 'nothing made in the unreachable directory');
      const doctor = await cli(['doctor', '--images-dir', IMAGES_DIR, '--state-dir', stateDir]);
      assert.notEqual(doctor.status, 0);
      assert.match(doctor.stdout, /\[FAIL\] state dir .*is mode 0700/);
      await chmod(closed, 0o711);
      const fixed = await cli(['doctor', '--images-dir', IMAGES_DIR, '--state-dir', stateDir]);
      assert.match(fixed.stdout, /\[ ok \] state dir/);
    } finally {
      await rm(closed, { recursive: true, force: true });
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
