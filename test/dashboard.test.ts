/**
 * The dashboard end to end, in a real browser (Debian's chromium driven by playwright-core) against a
 * real server and real sandboxes: the live table, the console, rich results, the fork tree, Compare
 * and merge, the pool panel, and refusing data without a key. Screenshots go to
 * test-artifacts/dashboard/ (gitignored) for a person to look at.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { Sandbox } from 'podflare';
import { startTestServer, type TestServer } from './helpers/server.js';

const ARTIFACTS = path.resolve('test-artifacts/dashboard');
const CHROMIUM = process.env.PODFLARE_CHROMIUM ?? '/usr/bin/chromium';
const WAIT = { timeout: 30_000 };

async function launch(): Promise<Browser> {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
}

async function shot(page: Page, name: string): Promise<void> {
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** Polls until `check` holds (the page updates from server-sent events, not on our schedule). */
async function eventually(check: () => Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`timed out waiting for ${what}`);
}

describe('dashboard in a real browser', () => {
  let server: TestServer;
  let browser: Browser;
  let page: Page;
  const opened: Sandbox[] = [];
  /** Uncaught errors in the page, and what the page's own policy blocked (the evil HTML's aside). */
  const pageErrors: string[] = [];

  before(async () => {
    server = await startTestServer({ poolSize: 1 });
    browser = await launch();
    page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
    page.on('dialog', (d) => void d.accept()); // the merge button asks for confirmation
    page.on('pageerror', (err) => pageErrors.push(err.message));
    page.on('console', (msg) => { if (msg.type() === 'error' && /Content Security Policy/i.test(msg.text())) pageErrors.push(msg.text()); });
  });
  after(async () => {
    if (page) await shot(page, 'zz-last-state').catch(() => undefined);
    await browser?.close();
    await Promise.all(opened.map((s) => s.close().catch(() => undefined)));
    await server?.stop();
  });

  it('shows a new sandbox live, runs console code, draws the fork tree, compares and merges', async () => {
    await page.goto(server.url + '/');
    await page.locator('[data-testid="connection"].live').waitFor(WAIT);

    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    const row = page.locator(`tr[data-id="${sbx.id}"]`);
    await row.waitFor(WAIT); // no reload: it arrives over server-sent events
    assert.match(await row.innerText(), /default\s+ns\s+ready/);
    await shot(page, '01-table');

    // The console: run Python, see the output streamed back and recorded in the history.
    await row.click();
    await page.getByTestId('console-code').fill('x = 6 * 7\nprint("answer", x)');
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-output').getByText('answer 42').waitFor(WAIT);
    await page.getByTestId('console-status').getByText('exit 0').waitFor(WAIT);
    await page.getByTestId('history').locator('pre.stdout', { hasText: 'answer 42' }).waitFor(WAIT);
    // And bash.
    await page.getByTestId('console-language').selectOption('bash');
    await page.getByTestId('console-code').fill('echo "from bash $((2 + 3))"');
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-output').getByText('from bash 5').waitFor(WAIT);
    await shot(page, '02-console');

    // fork(2): parent and two children in one lineage.
    const [c1, c2] = await sbx.fork(2);
    opened.push(c1!, c2!);
    const family = page.locator(`ul.tree-root[data-root="${sbx.id}"] [data-testid="tree-node"]`);
    await eventually(async () => (await family.count()) === 3, 'three nodes in the fork tree');
    const ids = await family.evaluateAll((nodes) => nodes.map((n) => n.getAttribute('data-id')));
    assert.deepEqual(new Set(ids), new Set([sbx.id, c1!.id, c2!.id]));
    // The children are drawn under the parent, not beside it.
    assert.equal(await page.locator(`[data-root="${sbx.id}"] li:has(> [data-id="${sbx.id}"]) > ul [data-id="${c1!.id}"]`).count(), 1);

    // Code the SDK runs in a child shows in its history live, while the child's view is open.
    await page.locator(`[data-testid="tree-node"][data-id="${c1!.id}"]`).click();
    await page.locator(`[data-testid="sandbox-view"][data-id="${c1!.id}"]`).waitFor(WAIT);
    await c1!.runCode('open("/root/child.txt", "w").write("written by the child\\n")\nchosen = "c1"\nprint("child wrote")');
    await page.getByTestId('history').locator('pre.stdout', { hasText: 'child wrote' }).waitFor(WAIT);
    // Its file browser lists the new file without being told to.
    await page.getByTestId('files').locator('tr[data-path="/root/child.txt"]').waitFor(WAIT);
    await shot(page, '03-fork-tree');

    // Compare parent and child: the child's new file with its content, and the new variable.
    await page.getByRole('button', { name: 'Compare with parent' }).click();
    const added = page.getByTestId('diff').locator('li[data-path="/root/child.txt"]');
    await added.waitFor(WAIT);
    assert.match(await added.innerText(), /added[\s\S]*written by the child/);
    await page.getByTestId('diff').locator('table.vars tr', { hasText: 'chosen' }).waitFor(WAIT);
    await shot(page, '04-compare');

    // Merge the child into the parent: the tree marks it merged, the parent has its file.
    await page.getByTestId('merge').click();
    await page.getByTestId('compare-message').getByText('merged').waitFor(WAIT);
    await page.getByTestId('nav-sandboxes').click();
    await page.locator(`[data-testid="tree-node"][data-id="${c1!.id}"][data-state="merged"]`).waitFor(WAIT);
    assert.equal(await page.locator(`[data-testid="tree-node"][data-id="${sbx.id}"]`).getAttribute('data-state'), 'ready');
    assert.equal((await sbx.runCode('print(open("/root/child.txt").read(), end="")')).stdout, 'written by the child\n');
    await shot(page, '05-merged');
  });

  it('renders rich results: an HTML table, a PNG plot, an error with its traceback', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await page.goto(server.url + '/');
    await page.locator(`tr[data-id="${sbx.id}"]`).click(WAIT);
    await page.getByTestId('console-code').fill([
      'import pandas as pd',
      'import matplotlib.pyplot as plt',
      'plt.plot([1, 3, 2]); plt.show()',
      'pd.DataFrame({"fruit": ["apple", "pear"], "count": [3, 5]})',
    ].join('\n'));
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-status').getByText('exit 0').waitFor({ timeout: 60_000 });
    const table = page.getByTestId('console-output').frameLocator('iframe.html-result').locator('table');
    await table.getByText('pear').waitFor(WAIT);
    const img = page.getByTestId('console-output').locator('img.png-result');
    await eventually(async () => (await img.count()) === 1 && (await img.evaluate((i: HTMLImageElement) => i.complete && i.naturalWidth > 0)), 'the plot to load');

    await page.getByTestId('console-code').fill('def f():\n    return 1 / 0\nf()');
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-output').locator('.error-title', { hasText: 'ZeroDivisionError' }).waitFor(WAIT);
    assert.match(await page.getByTestId('console-output').locator('pre.traceback').innerText(), /return 1 \/ 0/);
    // The history keeps all of it.
    await page.getByTestId('history').locator('.error-title', { hasText: 'ZeroDivisionError' }).waitFor(WAIT);
    await page.getByTestId('history').locator('img.png-result').first().waitFor(WAIT);
    await shot(page, '06-rich-results');
  });

  it('runs no script from an HTML result (it is framed without scripts)', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await page.goto(server.url + '/');
    await page.locator(`tr[data-id="${sbx.id}"]`).click(WAIT);
    await page.getByTestId('console-code').fill([
      'class Evil:',
      '    def _repr_html_(self):',
      '        return \'<b>bold text</b><script>parent.document.title = "pwned by script"</script><img src="x" onerror="parent.document.title = \\\'pwned by img\\\'">\'',
      'Evil()',
    ].join('\n'));
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-output').frameLocator('iframe.html-result').getByText('bold text').waitFor(WAIT);
    await new Promise((r) => setTimeout(r, 500)); // time for an onerror handler to fire, if it could
    assert.equal(await page.title(), 'Podflare');
  });

  it('uploads and downloads files in the file browser', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await page.goto(server.url + '/');
    await page.locator(`tr[data-id="${sbx.id}"]`).click(WAIT);
    const files = page.getByTestId('files');
    await files.getByTestId('upload').setInputFiles({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('uploaded from the browser\n') });
    await files.locator('tr[data-path="/root/notes.txt"]').waitFor(WAIT);
    assert.equal(Buffer.from(await sbx.download('/root/notes.txt')).toString(), 'uploaded from the browser\n');

    await sbx.runCode('open("/root/report.csv", "w").write("a,b\\n1,2\\n")');
    await files.getByRole('button', { name: 'Refresh' }).click();
    const row = files.locator('tr[data-path="/root/report.csv"]');
    await row.waitFor(WAIT);
    const [download] = await Promise.all([page.waitForEvent('download'), row.getByRole('button', { name: 'Download' }).click()]);
    assert.equal(download.suggestedFilename(), 'report.csv');
    assert.equal(readFileSync((await download.path())!, 'utf8'), 'a,b\n1,2\n');
    await shot(page, '06b-files');
  });

  it('streams a long exec, interrupts it, forks and destroys the sandbox from the page', async () => {
    const sbx = await Sandbox.create({ host: server.url });
    opened.push(sbx);
    await page.goto(server.url + '/');
    await page.locator(`tr[data-id="${sbx.id}"]`).click(WAIT);
    await page.getByTestId('console-code').fill('import time\nfor i in range(600):\n    print("tick", i, flush=True)\n    time.sleep(0.1)');
    await page.getByTestId('console-run').click();
    // Output arrives while the code still runs.
    await page.getByTestId('console-output').getByText('tick 3').waitFor(WAIT);
    assert.equal(await page.getByTestId('console-status').innerText(), 'running…');
    await page.getByRole('button', { name: 'Interrupt' }).click();
    await page.getByTestId('console-status').getByText(/exit [1-9]/).waitFor(WAIT);
    await page.getByTestId('history').locator('.error-title', { hasText: 'KeyboardInterrupt' }).waitFor(WAIT);

    // Fork from the page: the child shows under it in the tree.
    await page.getByTestId('fork').click();
    const family = page.locator(`ul.tree-root[data-root="${sbx.id}"] [data-testid="tree-node"]`);
    await eventually(async () => (await family.count()) === 2, 'the forked child in the tree');
    const childId = (await family.nth(1).getAttribute('data-id'))!;
    opened.push(await Sandbox.connect(childId, { host: server.url }));

    await page.getByRole('button', { name: 'Destroy' }).click();
    await eventually(async () => (await page.locator(`tr[data-id="${sbx.id}"]`).count()) === 0, 'the destroyed sandbox to leave the table');
    await assert.rejects(sbx.runCode('1'));
  });

  it('shows checkpoints on the sandbox timeline and rewinds from the page', async () => {
    const sbx = await Sandbox.create({ host: server.url, history: 3 });
    opened.push(sbx);
    await sbx.runCode('rows = list(range(10))');
    await sbx.runCode('rows = []  # the bad call');
    await page.goto(server.url + '/');
    await page.locator(`tr[data-id="${sbx.id}"]`).click(WAIT);
    const items = page.getByTestId('checkpoint-item');
    await eventually(async () => (await items.count()) === 2, 'the two history checkpoints on the timeline');
    assert.match(await items.nth(1).innerText(), /before: rows = \[\]/);
    await page.getByTestId('rewind').click();
    await page.getByTestId('checkpoints-status').getByText('rewind: done').waitFor(WAIT);
    assert.equal((await sbx.runCode('print(len(rows))')).stdout, '10\n');
    await page.getByTestId('checkpoint').click();
    await eventually(async () => (await page.getByTestId('checkpoint-item').filter({ hasText: 'ckpt_' }).count()) === 1, 'the new checkpoint listed');
    await shot(page, '06-checkpoints');
  });

  it('shows the pool and the latency histograms', async () => {
    await page.goto(server.url + '/');
    await page.getByTestId('nav-pool').click();
    const panel = page.getByTestId('pool-panel');
    await panel.waitFor(WAIT);
    assert.ok((await panel.getByTestId('pool-row').count()) >= 1);
    // Earlier tests created, ran and forked: each histogram has calls.
    for (const name of ['create', 'exec', 'fork']) {
      assert.match(await panel.getByTestId(`histogram-${name}`).locator('figcaption').innerText(), new RegExp(`${name}: [1-9]\\d* calls`));
    }
    await shot(page, '07-pool');
    // Nothing the page did in all these tests threw, or was blocked by its own policy — except the
    // script and handler of the hostile HTML result.
    assert.deepEqual(pageErrors.filter((e) => !/inline|event handler|script-src/i.test(e)), []);
  });
});

describe('dashboard behind API keys', () => {
  const KEY = 'dash-test-key';
  const OTHER_KEY = 'dash-other-key';
  let server: TestServer;
  let browser: Browser;
  let sbx: Sandbox | undefined;

  before(async () => {
    server = await startTestServer({ poolSize: 1, apiKeys: [KEY, OTHER_KEY] });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await sbx?.close().catch(() => undefined);
    await server?.stop();
  });

  it('refuses data without a key and shows it with the right one', async () => {
    sbx = await Sandbox.create({ host: server.url, apiKey: KEY });
    // The data endpoints refuse a caller without a key, or with a wrong one.
    for (const p of ['/v1/dashboard/sandboxes', '/v1/dashboard/events', '/v1/dashboard/host', `/v1/sandboxes/${sbx.id}/execs`, '/v1/metrics']) {
      assert.equal((await fetch(server.url + p)).status, 401, p);
      assert.equal((await fetch(server.url + p, { headers: { Authorization: 'Bearer wrong' } })).status, 401, p);
    }
    // The page itself loads (it holds no data) and asks for a key instead of showing sandboxes.
    const page = await browser.newPage();
    await page.goto(server.url + '/');
    await page.getByTestId('key-form').waitFor(WAIT);
    assert.equal(await page.locator(`[data-id="${sbx.id}"]`).count(), 0);
    await page.getByTestId('key-input').fill('not-the-key');
    await page.getByTestId('key-save').click();
    await page.getByTestId('key-problem').getByText('invalid API key').waitFor(WAIT);
    assert.equal(await page.locator(`[data-id="${sbx.id}"]`).count(), 0);
    await shot(page, '08-key-required');

    await page.getByTestId('key-input').fill(KEY);
    await page.getByTestId('key-save').click();
    await page.locator(`tr[data-id="${sbx.id}"]`).waitFor(WAIT);
    // Calls from the page carry the key: the console works.
    await page.locator(`tr[data-id="${sbx.id}"]`).click();
    await page.getByTestId('console-code').fill('print("keyed")');
    await page.getByTestId('console-run').click();
    await page.getByTestId('console-output').getByText('keyed').waitFor(WAIT);
    await shot(page, '09-key-accepted');
    await page.close();
  });

  it('opens a terminal on a sandbox (xterm.js over the PTY WebSocket, the key as a subprotocol): echo hi, tput cols after a resize', async () => {
    sbx ??= await Sandbox.create({ host: server.url, apiKey: KEY });
    const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
    try {
      await page.goto(server.url + '/');
      await page.evaluate((key) => localStorage.setItem('podflare.apiKey', key), KEY);
      await page.reload();
      await page.locator(`tr[data-id="${sbx!.id}"]`).click();
      await page.getByTestId('terminal-open').click();
      const terminal = page.getByTestId('terminal');
      await page.getByTestId('terminal-status').getByText('connected').waitFor(WAIT);
      /** The terminal's screen, one string per row (xterm's DOM renderer; non-breaking spaces as spaces). */
      const screen = async () => (await terminal.locator('.xterm-rows').innerText()).replace(/\u00a0/g, ' ').split('\n').map((l) => l.trimEnd());
      await eventually(async () => (await screen()).some((l) => /[#$] ?$/.test(l)), 'a bash prompt');
      await terminal.click();
      await page.keyboard.type('echo hi');
      await page.keyboard.press('Enter');
      await eventually(async () => (await screen()).includes('hi'), '"hi" on a line of its own');
      await shot(page, '10-terminal');

      // The pane follows the page: a narrower page is a narrower terminal, and the shell sees it.
      const before = Number(await terminal.getAttribute('data-cols'));
      await page.setViewportSize({ width: 1100, height: 1000 }); // still two columns (one below 980 px)
      await eventually(async () => Number(await terminal.getAttribute('data-cols')) < before, 'the terminal to narrow');
      const cols = Number(await terminal.getAttribute('data-cols'));
      await page.keyboard.type('tput cols');
      await page.keyboard.press('Enter');
      await eventually(async () => (await screen()).includes(String(cols)), `tput cols saying ${cols}`);

      // Closing the pane ends its shell.
      await page.getByTestId('terminal-close').click();
      await eventually(async () => !(await sbx!.commands.list()).some((p) => p.running), 'the shell to end with its pane');
    } finally {
      await page.close();
    }
  });

  it("refuses a terminal to a key that does not own the sandbox", async () => {
    sbx ??= await Sandbox.create({ host: server.url, apiKey: KEY });
    const page = await browser.newPage();
    try {
      await page.goto(server.url + '/');
      const outcome = await page.evaluate(async ({ id, key }) => {
        const b64 = btoa(key).replace(/=+$/, '');
        const ws = new WebSocket(`ws://${location.host}/v1/sandboxes/${id}/pty`, ['podflare.pty', `podflare.key.${b64}`]);
        return new Promise<string>((resolve) => {
          ws.onopen = () => resolve('open');
          ws.onerror = () => resolve('refused');
        });
      }, { id: sbx!.id, key: OTHER_KEY });
      assert.equal(outcome, 'refused');
    } finally {
      await page.close();
    }
  });

  it("shows a key only its own sandboxes and their execs", async () => {
    const mine = await Sandbox.create({ host: server.url, apiKey: OTHER_KEY });
    try {
      const auth = { Authorization: `Bearer ${KEY}` };
      // Watch the first key's event stream while the other key's sandbox runs code.
      const abort = new AbortController();
      const res = await fetch(server.url + '/v1/dashboard/events', { headers: auth, signal: abort.signal });
      assert.equal(res.status, 200);
      let seen = '';
      const reading = (async () => {
        try {
          for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) seen += Buffer.from(chunk).toString();
        } catch { /* aborted */ }
      })();
      await mine.runCode('print("secret output")');
      await sbx!.runCode('print("first key output")');
      await eventually(async () => seen.includes('first key output'), "the first key's own exec on its stream");
      abort.abort();
      await reading;
      assert.ok(!seen.includes('secret output'), "another key's exec output leaked into the stream");
      assert.ok(!seen.includes(mine.id), "another key's sandbox leaked into the stream");

      const snapshot = (await (await fetch(server.url + '/v1/dashboard/sandboxes', { headers: auth })).json()) as { sandboxes: Array<{ id: string }> };
      assert.deepEqual(snapshot.sandboxes.map((s) => s.id), [sbx!.id]);
      assert.equal((await fetch(`${server.url}/v1/sandboxes/${mine.id}/execs`, { headers: auth })).status, 404);
      assert.equal((await fetch(`${server.url}/v1/sandboxes/${mine.id}/execs`, { headers: { Authorization: `Bearer ${OTHER_KEY}` } })).status, 200);
      // Closed pages and streams leave no listener behind on the server.
      await eventually(async () => server.manager.changes.listenerCount('change') === 0 && server.manager.history.listenerCount('exec') === 0,
        'the event streams to let go of their listeners');
    } finally {
      await mine.close();
    }
  });
});
