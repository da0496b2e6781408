/**
 * Templates (issue 22, items 3 and 4): named images a sandbox starts from. A user template is
 * built from a recipe by `podflare template build` (a Debian package and a wheel from a local
 * directory: no package index here), listed by `podflare template ls` and GET /v1/templates,
 * started, forked, kept warm in its own pool; a bad recipe fails clearly and leaves nothing; an
 * unknown template is a 400 naming the ones there are. `default` carries the agent toolbox
 * (curl, wget, git, pip, requests, httpx) and `python-datasci` the scientific stack.
 *
 * The built layers live in the shared images directory and are named by the recipe's hash: the
 * recipe and the wheel here are byte-for-byte the same on every run, so only the first run builds.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { IMAGES_DIR, startTestServer, type TestServer } from './helpers/server.js';

const CLI = path.resolve(import.meta.dirname, '../packages/cli/dist/main.js');
const TEMPLATE = 'pf-test-tpl';
/** A Debian package that is not in `default` (a small one). */
const APT_PACKAGE = 'jq';

/** Runs the CLI with the shared images directory; resolves with its output and exit code. */
function cli(args: string[], timeoutMs = 600_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args, '--images-dir', IMAGES_DIR], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
  });
}

/** A wheel made with the stdlib's zipfile (a wheel is a zip with METADATA, WHEEL and RECORD); fixed timestamps: same bytes every run. */
const MAKE_WHEEL = String.raw`
import base64, hashlib, sys, zipfile
out = sys.argv[1]
name, version = "pftinywheel", "0.1"
info = f"{name}-{version}.dist-info"
files = {
    f"{name}/__init__.py": "VALUE = 42\n",
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: podflare-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
def digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
record = "".join(f"{p},{digest(c.encode())},{len(c.encode())}\n" for p, c in files.items()) + f"{info}/RECORD,,\n"
files[f"{info}/RECORD"] = record
with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as z:
    for p, c in files.items():
        z.writestr(zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0)), c)
`;

async function makeWheel(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  const child = spawn('python3', ['-c', MAKE_WHEEL, dir], { stdio: 'inherit' });
  const code = await new Promise<number | null>((r) => child.on('close', r));
  assert.equal(code, 0, 'building the test wheel failed');
}

async function listTemplates(server: TestServer): Promise<Array<{ name: string; built: boolean; runtimes: string[]; size_bytes: number | null; pool: { ready: number; target: number } | null }>> {
  const res = await fetch(server.url + '/v1/templates');
  assert.equal(res.status, 200);
  return ((await res.json()) as { templates: never[] }).templates;
}

async function tmpEntries(): Promise<string[]> {
  return (await readdir(IMAGES_DIR)).filter((n) => n.startsWith('.tmp-tpl-'));
}

async function run(sbx: Sandbox, code: string, language: 'python' | 'bash' = 'python') {
  return sbx.runCode(code, { language });
}

describe('templates', () => {
  let server: TestServer;
  let work: string;
  const opened: Sandbox[] = [];

  before(async () => {
    work = await mkdtemp(path.join(os.tmpdir(), 'pf-tpl-'));
    server = await startTestServer({ poolSize: 2 });
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    await server?.stop();
    await rm(work, { recursive: true, force: true });
  });

  it('default carries the agent toolbox: curl, wget, git, pip, requests, httpx', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    const tools = await run(sbx, 'curl --version && wget --version | head -1 && git --version && python3 -m pip --version', 'bash');
    assert.equal(tools.exitCode, 0, tools.stderr);
    assert.match(tools.stdout, /curl \d/);
    assert.match(tools.stdout, /git version/);
    assert.match(tools.stdout, /pip \d/);
    const libs = await run(sbx, 'import requests, httpx; print(requests.__version__, httpx.__version__)');
    assert.equal(libs.exitCode, 0, libs.stderr);
  });

  it('a user template from a recipe (a Debian package and a local wheel): built, listed, started, forked, with its own pool', async () => {
    await makeWheel(path.join(work, 'wheels'));
    await writeFile(path.join(work, 'motd.txt'), 'hello from the template\n');
    const recipe = {
      name: TEMPLATE,
      description: 'test: jq + a local wheel',
      apt: [APT_PACKAGE],
      pip: ['pftinywheel==0.1'],
      pip_find_links: 'wheels',
      files: [{ src: 'motd.txt', dest: '/etc/pf-test/motd.txt' }],
      setup: 'python3 -c "import pftinywheel" && echo setup-ran > /etc/pf-test/setup.txt',
    };
    await writeFile(path.join(work, 'recipe.json'), JSON.stringify(recipe, null, 2));
    const built = await cli(['template', 'build', path.join(work, 'recipe.json')]);
    assert.equal(built.code, 0, built.stderr);
    assert.match(built.stdout, new RegExp(`template ${TEMPLATE} ready`));

    const listed = (await listTemplates(server)).find((t) => t.name === TEMPLATE);
    assert.ok(listed, 'GET /v1/templates lists the new template');
    assert.equal(listed.built, true);
    assert.deepEqual(listed.runtimes, ['ns']);
    assert.ok(listed.size_bytes && listed.size_bytes > 0);

    const ls = await cli(['template', 'ls']);
    assert.equal(ls.code, 0, ls.stderr);
    assert.match(ls.stdout, new RegExp(`^${TEMPLATE}\\s+recipe\\s+yes`, 'm'));
    assert.match(ls.stdout, /^default\s+base\s+yes/m);
    assert.match(ls.stdout, /^python-datasci\s+builtin/m);

    const sbx = await Sandbox.create({ host: server.url, template: TEMPLATE });
    opened.push(sbx);
    assert.equal((await sbx.info()).template, TEMPLATE);
    const tool = await run(sbx, `${APT_PACKAGE} --version && cat /etc/pf-test/motd.txt /etc/pf-test/setup.txt`, 'bash');
    assert.equal(tool.exitCode, 0, tool.stderr);
    assert.match(tool.stdout, /hello from the template\nsetup-ran/);
    const wheel = await run(sbx, 'import pftinywheel; state = pftinywheel.VALUE; print(state)');
    assert.equal(wheel.exitCode, 0, wheel.stderr);
    assert.equal(wheel.stdout.trim(), '42');
    // The agent's own layer stays on top of a template's, and the base's files show through
    // (the build removed nothing of the base's: matplotlib's font cache is there).
    assert.equal((await run(sbx, 'test -f /opt/podflare/podflare_agent.py && test -d /root/.cache/matplotlib', 'bash')).exitCode, 0);

    // The default template does not see the user template's layer.
    const plain = await Sandbox.create({ host: server.url });
    opened.push(plain);
    assert.notEqual((await run(plain, `command -v ${APT_PACKAGE}`, 'bash')).exitCode, 0);
    assert.notEqual((await run(plain, 'import pftinywheel')).exitCode, 0);

    // fork works within the template: the child has its packages and the parent's memory.
    const [child] = await sbx.fork(1);
    opened.push(child!);
    const inChild = await run(child!, 'import pftinywheel, subprocess; print(state, pftinywheel.VALUE, subprocess.run(["jq", "--version"], capture_output=True).returncode)');
    assert.equal(inChild.exitCode, 0, inChild.stderr);
    assert.equal(inChild.stdout.trim(), '42 42 0');
    assert.equal((await child!.info()).template, TEMPLATE);

    // Its own warm pool: the first create missed (cold key) and the template is kept warm since.
    const deadline = Date.now() + 120_000;
    for (;;) {
      const pool = (await listTemplates(server)).find((t) => t.name === TEMPLATE)?.pool;
      if (pool && pool.ready >= 1) break;
      assert.ok(Date.now() < deadline, `the template's pool did not fill: ${JSON.stringify(pool)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    const warm = await Sandbox.create({ host: server.url, template: TEMPLATE });
    opened.push(warm);
    assert.deepEqual(warm.pool, { hit: true });
    assert.equal((await run(warm, 'import pftinywheel')).exitCode, 0);
  });

  it("an idle template's pool shrinks to none; a configured one is warm from start-up and stays", async () => {
    // Runs after the user template is built (the test above).
    const idle = await startTestServer({ poolSize: 2, templatePoolIdleSeconds: 2, templatePoolSizes: { 'python-datasci': 1 } });
    try {
      const pool = async (name: string) => (await listTemplates(idle)).find((t) => t.name === name)?.pool ?? null;
      const until = async (what: string, ok: () => Promise<boolean>) => {
        const deadline = Date.now() + 120_000;
        while (!(await ok())) {
          assert.ok(Date.now() < deadline, what);
          await new Promise((r) => setTimeout(r, 250));
        }
      };
      await until('python-datasci (configured) is warmed at start-up', async () => ((await pool('python-datasci'))?.ready ?? 0) >= 1);
      const sbx = await Sandbox.create({ host: idle.url, template: TEMPLATE });
      await sbx.close();
      await until('the user template gets a pool', async () => ((await pool(TEMPLATE))?.ready ?? 0) >= 1);
      await until('the idle user template pool shrinks', async () => {
        const p = await pool(TEMPLATE);
        return p !== null && p.ready === 0 && p.target === 0;
      });
      assert.equal((await pool('python-datasci'))?.target, 1, 'a configured pool does not shrink');
      assert.equal((await pool('default'))?.target, 2, 'the default pool does not shrink');
    } finally {
      await idle.stop();
    }
  });

  it('a bad recipe fails clearly and leaves nothing half-built', async () => {
    const before = (await readdir(IMAGES_DIR)).filter((n) => /^tpl-[0-9a-f]{12}$/.test(n)).sort();
    const cases = [
      { name: 'pf-test-bad-apt', apt: ['pf-no-such-package'], expect: /pf-no-such-package/ },
      { name: 'pf-test-bad-setup', setup: 'echo about to fail; exit 3', expect: /setup script[\s\S]*about to fail/ },
    ];
    for (const { expect, ...recipe } of cases) {
      const file = path.join(work, `${recipe.name}.json`);
      await writeFile(file, JSON.stringify(recipe));
      const res = await cli(['template', 'build', file]);
      assert.notEqual(res.code, 0, `${recipe.name} must fail`);
      assert.match(res.stderr, /failed/);
      assert.match(res.stderr, expect);
      // Nothing half-built: no layer, no temporary tree, no registry entry, no mount.
      assert.deepEqual(await tmpEntries(), []);
      const after = (await readdir(IMAGES_DIR)).filter((n) => /^tpl-[0-9a-f]{12}$/.test(n)).sort();
      assert.deepEqual(after, before);
      assert.equal((await listTemplates(server)).some((t) => t.name === recipe.name), false);
      assert.doesNotMatch(await readFile('/proc/self/mountinfo', 'utf8'), /\.tmp-tpl-/);
      // What is left is the log the error names (removed here: the images directory is shared).
      const log = /\(full log: (\S+\.failed\.log)\)/.exec(res.stderr)?.[1];
      assert.ok(log, `the error names its log: ${res.stderr}`);
      await rm(log, { force: true });
    }
    // A recipe that does not parse fails before anything is built, naming the field.
    await writeFile(path.join(work, 'typo.json'), JSON.stringify({ name: 'pf-test-typo', packages: ['jq'] }));
    const typo = await cli(['template', 'build', path.join(work, 'typo.json')]);
    assert.notEqual(typo.code, 0);
    assert.match(typo.stderr, /unknown recipe field: packages/);
  });

  it('an unknown template is a 400 naming the templates there are', async () => {
    const res = await fetch(server.url + '/v1/sandboxes', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ template: 'no-such-template' }) });
    assert.equal(res.status, 400);
    const body = (await res.json()) as { error: string; code: string; field?: string };
    assert.equal(body.code, 'bad_request');
    assert.equal(body.field, 'template');
    assert.match(body.error, /unknown template "no-such-template"/);
    for (const name of ['default', 'python-datasci', TEMPLATE]) assert.ok(body.error.includes(name), `${name} in: ${body.error}`);
  });

  it('python-datasci: scipy, scikit-learn, seaborn, statsmodels, sympy, openpyxl import', async () => {
    // The project's own command builds it (instant when built: scripts/setup.sh --test does it).
    const built = await cli(['template', 'build', 'python-datasci', '--quiet']);
    assert.equal(built.code, 0, built.stderr);
    const listed = (await listTemplates(server)).find((t) => t.name === 'python-datasci');
    assert.equal(listed?.built, true);
    const sbx = await Sandbox.create({ host: server.url, template: 'python-datasci' });
    opened.push(sbx);
    const res = await run(sbx, 'import scipy, sklearn, seaborn, statsmodels, sympy, openpyxl\nfrom sklearn.linear_model import LinearRegression\n' +
      'm = LinearRegression().fit([[0], [1], [2]], [1, 3, 5]); print(round(float(m.coef_[0]), 3), scipy.__version__)');
    assert.equal(res.exitCode, 0, res.stderr);
    assert.match(res.stdout, /^2\.0 /);
  });
});
