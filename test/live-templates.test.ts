/**
 * Templates from a live sandbox (issue 25): POST /v1/sandboxes/:id/template turns a sandbox's
 * current files into a named template with its own pool; creates from it start with those files
 * and with its interpreter's state (the template's zygote is a fork of it); it is listed and can be deleted. The copy
 * is made by root from a tree the sandbox controls: symlinks (to the host's /etc/shadow, to a host
 * file holding a secret), FIFOs, hard links, a huge sparse file and a process racing renames must
 * not make the template hold a host file, hang, or fill the images disk.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Sandbox } from 'podflare';
import { cgroupScopesOf, forkLayersIn, processesMentioning } from './helpers/leaks.js';
import { IMAGES_DIR, startTestServer, type TestServer } from './helpers/server.js';

const suffix = randomBytes(3).toString('hex');
/** Unique per run: the images directory (and its template registry) is shared by every test server. */
const name = (what: string) => `pf-lt-${what}-${suffix}`;

interface ListedTemplate { name: string; kind: string; built: boolean; runtimes: string[]; size_bytes: number | null }

async function listTemplates(server: TestServer, key?: string): Promise<ListedTemplate[]> {
  const res = await fetch(server.url + '/v1/templates', { headers: key ? { authorization: `Bearer ${key}` } : {} });
  assert.equal(res.status, 200);
  return ((await res.json()) as { templates: ListedTemplate[] }).templates;
}

async function saveRaw(server: TestServer, id: string, body: unknown, key?: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${server.url}/v1/sandboxes/${id}/template`, {
    method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function bash(sbx: Sandbox, code: string): Promise<string> {
  const ex = await sbx.runCode(code, { language: 'bash' });
  assert.equal(ex.exitCode, 0, `${code}: ${ex.stderr}`);
  return ex.stdout;
}

/** The registry record of a template (the server's own file): where its layer is. */
async function registryRecord(template: string): Promise<{ layers: string[]; source: string; owner?: string }> {
  return JSON.parse(await readFile(path.join(IMAGES_DIR, 'templates', `${template}.json`), 'utf8')) as never;
}

/** Every entry of a tree on the host, not following symlinks. */
async function walk(dir: string, out: string[] = []): Promise<string[]> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, e.name);
    out.push(full);
    if (e.isDirectory()) await walk(full, out);
  }
  return out;
}

async function liveDirs(): Promise<string[]> {
  return (await readdir(IMAGES_DIR)).filter((n) => /^live-[0-9a-f]{16}$/.test(n)).sort();
}

describe('templates from a live sandbox', { timeout: 600_000 }, () => {
  let server: TestServer;
  const made: string[] = [];
  const opened: Sandbox[] = [];

  before(async () => {
    server = await startTestServer({ poolSize: 1 });
  });
  after(async () => {
    for (const s of opened) await s.close().catch(() => undefined);
    for (const t of made) await Sandbox.deleteTemplate(t, { host: server.url }).catch(() => undefined);
    const stateDir = server?.stateDir;
    await server?.stop();
    // The templates' zygotes (forks of sandboxes since deleted) end with the server, husks included.
    if (stateDir) {
      assert.deepEqual(processesMentioning(stateDir), []);
      assert.deepEqual(cgroupScopesOf(stateDir), []);
    }
  });

  it('files written in a sandbox are there in sandboxes created from its template; listed; deleted', async () => {
    const tpl = name('files');
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    assert.equal((await sbx.runCode('x = 41\nopen("/root/notes.txt", "w").write("hello template")')).exitCode, 0);
    await bash(sbx, [
      'mkdir -p /srv/app/data && echo data > /srv/app/data/f.txt',
      'useradd -u 1234 -M appuser 2>/dev/null || true; touch /srv/app/owned && chown 1234:1234 /srv/app/owned && chmod 640 /srv/app/owned',
      'test -e /etc/debian_version && rm /etc/debian_version',   // a base file deleted: stays deleted
      'ln -s /srv/app/data/f.txt /root/rel-link',
    ].join('\n'));

    const saved = await sbx.saveTemplate(tpl, { description: 'test template' });
    made.push(tpl);
    assert.equal(saved.name, tpl);
    assert.equal(saved.kind, 'directory');
    assert.equal(saved.fromSandbox, sbx.id);
    assert.deepEqual(saved.carries, { files: true, interpreter: true });
    assert.ok(saved.sizeBytes > 0);

    const listed = (await listTemplates(server)).find((t) => t.name === tpl);
    assert.ok(listed, 'GET /v1/templates lists it');
    assert.equal(listed.kind, 'directory');
    assert.equal(listed.built, true);
    assert.deepEqual(listed.runtimes, ['ns']);
    assert.ok((await Sandbox.listTemplates({ host: server.url })).some((t) => t.name === tpl && t.kind === 'directory'));

    // Its layer is root's alone on the host (it keeps the modes the sandbox chose, owners at image ids).
    const record = await registryRecord(tpl);
    assert.equal(record.source, 'directory');
    assert.equal(((await lstat(path.dirname(record.layers[0]!))).mode & 0o777), 0o700);

    const child = await Sandbox.create({ host: server.url, template: tpl });
    opened.push(child);
    assert.equal((await child.info()).template, tpl);
    assert.equal(await bash(child, 'cat /root/notes.txt; echo; cat /srv/app/data/f.txt /root/rel-link'), 'hello template\ndata\ndata\n');
    // Owners as the sandbox saw them (shifted back to image ids and forward again), modes kept.
    assert.equal(await bash(child, 'stat -c "%u:%g %a" /srv/app/owned'), '1234:1234 640\n');
    assert.equal(await bash(child, 'stat -c "%u" /root/notes.txt'), '0\n');
    assert.equal((await child.runCode('test -e /etc/debian_version', { language: 'bash' })).exitCode, 1, 'a deleted base file stays deleted');
    // The interpreter's state is carried (a fork of the sandbox is the template's zygote).
    assert.equal((await child.runCode('print(x + 1)')).stdout, '42\n');
    // Its own: a change in one sandbox of the template is not seen by the next.
    await child.runCode('x = 0');
    // A template is a template: its sandboxes fork and write as any.
    await bash(child, 'echo more >> /root/notes.txt');
    const [grandchild] = await child.fork(1);
    opened.push(grandchild!);
    assert.equal(await bash(grandchild!, 'cat /root/notes.txt'), 'hello templatemore\n');

    // Its own warm pool (forks of its own zygote, started from its layers): a pool hit has the files too.
    const deadline = Date.now() + 120_000;
    while (!((await Sandbox.listTemplates({ host: server.url })).find((t) => t.name === tpl)?.pool?.ready)) {
      assert.ok(Date.now() < deadline, 'the template\'s pool did not fill');
      await new Promise((r) => setTimeout(r, 250));
    }
    const warm = await Sandbox.create({ host: server.url, template: tpl });
    assert.deepEqual(warm.pool, { hit: true });
    assert.equal(await bash(warm, 'cat /srv/app/data/f.txt'), 'data\n');
    assert.equal((await warm.runCode('print(x)')).stdout, '41\n');
    await warm.close();

    // Deleting: refused while sandboxes started from it live, then done.
    const busy = await fetch(`${server.url}/v1/templates/${tpl}`, { method: 'DELETE' });
    assert.equal(busy.status, 409);
    assert.match(((await busy.json()) as { error: string }).error, /live sandbox/);
    await grandchild!.close();
    await child.close();
    await Sandbox.deleteTemplate(tpl, { host: server.url });
    made.splice(made.indexOf(tpl), 1);
    assert.ok(!(await listTemplates(server)).some((t) => t.name === tpl));
    await assert.rejects(lstat(path.dirname(record.layers[0]!)), { code: 'ENOENT' }, 'its layer is removed');
    const again = await fetch(`${server.url}/v1/sandboxes`, {
      method: 'POST', body: JSON.stringify({ template: tpl }), headers: { 'content-type': 'application/json' },
    });
    assert.equal(again.status, 400);
    const gone = await fetch(`${server.url}/v1/templates/${tpl}`, { method: 'DELETE' });
    assert.equal(gone.status, 404);
  });

  it('bad names, taken names and built-in names are 4xx errors that say why', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    for (const bad of ['Bad_Name', '', '../etc', 'x'.repeat(41), '-lead']) {
      const r = await saveRaw(server, sbx.id, { name: bad });
      assert.equal(r.status, 400, bad);
      assert.equal(r.body.code, 'bad_request');
      assert.match(String(r.body.error), /template name/);
    }
    assert.equal((await saveRaw(server, sbx.id, {})).status, 400);
    for (const builtin of ['default', 'python-datasci']) {
      const r = await saveRaw(server, sbx.id, { name: builtin });
      assert.equal(r.status, 409, builtin);
      assert.match(String(r.body.error), /built-in/);
    }
    const tpl = name('taken');
    assert.equal((await saveRaw(server, sbx.id, { name: tpl })).status, 201);
    made.push(tpl);
    const taken = await saveRaw(server, sbx.id, { name: tpl });
    assert.equal(taken.status, 409);
    assert.match(String(taken.body.error), /exists already/);
    // Two at once with one name: one wins, the other is told.
    const race = name('race');
    const both = await Promise.all([saveRaw(server, sbx.id, { name: race }), saveRaw(server, sbx.id, { name: race })]);
    made.push(race);
    assert.deepEqual(both.map((r) => r.status).sort(), [201, 409]);
    assert.equal((await saveRaw(server, 'sbx_' + '0'.repeat(32), { name: name('nobody') })).status, 404);
    const builtinDelete = await fetch(`${server.url}/v1/templates/default`, { method: 'DELETE' });
    assert.equal(builtinDelete.status, 400);
    // A recipe template (the operator's, every key sees it) is not the API's to delete.
    const recipe = name('recipe');
    await mkdir(path.join(IMAGES_DIR, 'templates'), { recursive: true });
    await writeFile(path.join(IMAGES_DIR, 'templates', `${recipe}.json`), JSON.stringify({
      name: recipe, source: 'recipe', layers: ['/nonexistent/layer'], builtAt: new Date().toISOString(),
    }));
    try {
      const r = await fetch(`${server.url}/v1/templates/${recipe}`, { method: 'DELETE' });
      assert.equal(r.status, 403);
      assert.match(((await r.json()) as { error: string }).error, /recipe/);
      await lstat(path.join(IMAGES_DIR, 'templates', `${recipe}.json`));
    } finally {
      await rm(path.join(IMAGES_DIR, 'templates', `${recipe}.json`), { force: true });
    }
  });

  it('a hostile tree: symlinks to host files stay symlinks, FIFOs do not hang the copy, racing renames reach nothing outside', async () => {
    const secret = `/tmp/pf-lt-secret-${suffix}`;
    const marker = `host-secret-${randomBytes(8).toString('hex')}`;
    await writeFile(secret, marker);
    try {
      const sbx = await Sandbox.create({ host: server.url });
      opened.push(sbx);
      await bash(sbx, [
        'mkdir -p /root/h && cd /root/h',
        'ln -s /etc/shadow shadow-link',
        `ln -s ${secret} secret-link`,
        'ln -s / root-link',
        'ln -s ../../../../../../../../etc/passwd climb-link',
        'mkfifo fifo',
        'echo one > a && ln a hard',
        'mkdir -p swap/inner && echo inside > swap/inner/f',
      ].join('\n'));
      // A process that keeps exchanging a directory with a symlink to / while the copy runs.
      await sbx.commands.run(`python3 -c '
import os, time
os.chdir("/root/h")
end = time.time() + 120
while time.time() < end:
    try:
        os.rename("swap", "swap.d"); os.symlink("/", "swap")
        os.unlink("swap"); os.rename("swap.d", "swap")
    except OSError:
        pass
'`, { background: true });
      const tpl = name('hostile');
      const saved = await saveRaw(server, sbx.id, { name: tpl });
      assert.equal(saved.status, 201, JSON.stringify(saved.body));
      made.push(tpl);

      const layer = (await registryRecord(tpl)).layers[0]!;
      const entries = await walk(layer);
      assert.ok(entries.length < 200, `the layer holds only the sandbox's few files (${entries.length})`);
      for (const link of ['shadow-link', 'secret-link', 'root-link', 'climb-link']) {
        assert.ok((await lstat(path.join(layer, 'root/h', link))).isSymbolicLink(), `${link} is copied as a symlink`);
      }
      assert.ok((await lstat(path.join(layer, 'root/h/fifo'))).isFIFO());
      for (const e of entries) {
        const st = await lstat(e);
        if (st.isFile()) assert.ok(!(await readFile(e, 'utf8')).includes(marker), `${e} holds the host's secret`);
        assert.ok(!st.isBlockDevice() && !(st.isCharacterDevice() && st.rdev !== 0), `${e} is a device node`);
      }

      const child = await Sandbox.create({ host: server.url, template: tpl });
      opened.push(child);
      // Resolved inside the new sandbox: its own /etc/shadow, never the host's file.
      const plain = await Sandbox.create({ host: server.url });
      opened.push(plain);
      assert.equal(await bash(child, 'cat /root/h/shadow-link'), await bash(plain, 'cat /etc/shadow'));
      assert.notEqual((await child.runCode('cat /root/h/secret-link', { language: 'bash' })).exitCode, 0, 'the host file is not there');
      assert.equal(await bash(child, 'cat /root/h/a /root/h/hard'), 'one\none\n');
    } finally {
      await rm(secret, { force: true });
    }
  });

  it('a huge sparse file is refused (507) before it fills the images disk; nothing is left behind', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await bash(sbx, 'truncate -s 200G /root/huge && echo small > /root/small');
    const before = await liveDirs();
    const tpl = name('huge');
    const r = await saveRaw(server, sbx.id, { name: tpl });
    assert.equal(r.status, 507, JSON.stringify(r.body));
    assert.equal(r.body.code, 'insufficient_storage');
    assert.match(String(r.body.error), /exceed/);
    assert.ok(!(await listTemplates(server)).some((t) => t.name === tpl));
    assert.deepEqual(await liveDirs(), before, 'no layer left in the images directory');
    // Within bounds again: it works.
    await bash(sbx, 'rm /root/huge');
    assert.equal((await saveRaw(server, sbx.id, { name: tpl })).status, 201);
    made.push(tpl);
  });

  it('a fork child\'s template holds its parent\'s files and its own', async () => {
    const parent = await Sandbox.create({ host: server.url });
    opened.push(parent);
    await bash(parent, 'echo from-parent > /root/p.txt');
    const [child] = await parent.fork(1);
    opened.push(child!);
    await bash(child!, 'echo from-child > /root/c.txt && rm /root/p.txt && echo again > /root/p2.txt');
    const tpl = name('forked');
    await child!.saveTemplate(tpl);
    made.push(tpl);
    assert.deepEqual(forkLayersIn(server.stateDir).filter((l) => l.includes('fork-tpl-')), [], 'the squash of its layers is removed');
    const fresh = await Sandbox.create({ host: server.url, template: tpl });
    opened.push(fresh);
    assert.equal(await bash(fresh, 'cat /root/c.txt /root/p2.txt; test ! -e /root/p.txt && echo deleted'), 'from-child\nagain\ndeleted\n');
  });
});

describe('templates from a live sandbox: the CLI', { timeout: 300_000 }, () => {
  let server: TestServer;
  before(async () => {
    server = await startTestServer({ poolSize: 0 });
  });
  after(async () => {
    await server?.stop();
  });

  it('podflare template save <id> <name>, then podflare template rm <name>', async () => {
    const cli = path.resolve(import.meta.dirname, '../packages/cli/dist/main.js');
    const run = (args: string[]) => new Promise<{ code: number; out: string }>((resolve) => {
      execFile(process.execPath, [cli, ...args, '--host', server.url], (err, stdout, stderr) => resolve({ code: err ? Number(err.code ?? 1) : 0, out: stdout + stderr }));
    });
    const sbx = await Sandbox.create({ host: server.url });
    try {
      await bash(sbx, 'echo via-cli > /root/cli.txt');
      const tpl = name('cli');
      const saved = await run(['template', 'save', sbx.id, tpl]);
      assert.equal(saved.code, 0, saved.out);
      assert.match(saved.out, new RegExp(`template ${tpl} made from ${sbx.id}`));
      const child = await Sandbox.create({ host: server.url, template: tpl });
      assert.equal(await bash(child, 'cat /root/cli.txt'), 'via-cli\n');
      await child.close();
      const removed = await run(['template', 'rm', tpl]);
      assert.equal(removed.code, 0, removed.out);
      assert.ok(!(await listTemplates(server)).some((t) => t.name === tpl));
      assert.notEqual((await run(['template', 'save', 'not-an-id', tpl])).code, 0);
    } finally {
      await sbx.close();
    }
  });
});

describe('templates from a live sandbox: owners', { timeout: 300_000 }, () => {
  let server: TestServer;
  const tpl = name('owned');

  before(async () => {
    server = await startTestServer({ poolSize: 0, apiKeys: ['key-a', 'key-b'] });
  });
  after(async () => {
    await fetch(`${server.url}/v1/templates/${tpl}`, { method: 'DELETE', headers: { authorization: 'Bearer key-a' } }).catch(() => undefined);
    await server?.stop();
  });

  it("only the sandbox's owner sees, starts and deletes the template (it holds that owner's files)", async () => {
    const a = await Sandbox.create({ host: server.url, apiKey: 'key-a' });
    try {
      await bash(a, 'echo mine > /root/a.txt');
      assert.equal((await saveRaw(server, a.id, { name: tpl }, 'key-b')).status, 404, "another key cannot template someone's sandbox");
      await a.saveTemplate(tpl);
      assert.ok((await listTemplates(server, 'key-a')).some((t) => t.name === tpl));
      assert.ok(!(await listTemplates(server, 'key-b')).some((t) => t.name === tpl), 'B does not see it');
      await assert.rejects(Sandbox.create({ host: server.url, apiKey: 'key-b', template: tpl }), /unknown template/);
      const del = await fetch(`${server.url}/v1/templates/${tpl}`, { method: 'DELETE', headers: { authorization: 'Bearer key-b' } });
      assert.equal(del.status, 404);
      const mine = await Sandbox.create({ host: server.url, apiKey: 'key-a', template: tpl });
      assert.equal(await bash(mine, 'cat /root/a.txt'), 'mine\n');
      await mine.close();
    } finally {
      await a.close();
    }
  });
});

describe('templates from a live sandbox: the VM runtime', { timeout: 600_000 }, () => {
  let server: TestServer;
  let vm: Sandbox | undefined;

  before(async () => {
    server = await startTestServer({ poolSize: 0 });
  });
  after(async () => {
    await vm?.close().catch(() => undefined);
    await server?.stop();
  });

  it('answers 422 not_supported, naming the runtime that can (one boot, TCG)', async () => {
    vm = await Sandbox.create({ host: server.url, runtime: 'vm' });
    const tpl = name('vm');
    const r = await saveRaw(server, vm.id, { name: tpl });
    assert.equal(r.status, 422, JSON.stringify(r.body));
    assert.equal(r.body.code, 'not_supported');
    assert.match(String(r.body.error), /vm runtime cannot make a template.*ns/);
    assert.ok(!(await listTemplates(server)).some((t) => t.name === tpl));
  });
});
