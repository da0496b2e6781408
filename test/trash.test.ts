/**
 * Ended namespace sandboxes' directories (trash.ts): moved out of the sandboxes' directory at
 * once, removed only once nothing has been started for a moment, or at once past the bound, and
 * all of them when the runtime closes.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { sandboxDirs, trashDir } from '../packages/server/src/runtime/namespace/layout.js';
import { HostHelper } from '../packages/server/src/runtime/namespace/hostd.js';
import { createLogger } from '../packages/server/src/log.js';
import { Trash } from '../packages/server/src/runtime/namespace/trash.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('namespace runtime: the trash of ended sandboxes\' directories', () => {
  const state = mkdtempSync(path.join(os.tmpdir(), 'pf-trash-'));
  // Removal goes through the host helper's fd-relative remove_tree, as in the runtime.
  const hostd = new HostHelper({ log: createLogger('silent') });
  const remove = (tree: string) => hostd.removeTree(tree);
  after(() => {
    hostd.close();
    rmSync(state, { recursive: true, force: true });
  });
  mkdirSync(trashDir(state), { recursive: true });
  let n = 0;
  const sandbox = () => {
    const dirs = sandboxDirs(state, `sbx_${String(n++).padStart(32, '0')}`);
    mkdirSync(dirs.upper, { recursive: true });
    writeFileSync(path.join(dirs.upper, 'file'), 'data');
    return dirs;
  };

  it('moves a directory out at once and removes it only after a quiet moment', async () => {
    const trash = new Trash(trashDir(state), remove);
    const dirs = sandbox();
    trash.touch();
    await trash.throwAway(dirs);
    assert.equal(existsSync(dirs.dir), false, 'the sandbox\'s directory is gone from the sandboxes\' directory');
    assert.equal(readdirSync(trashDir(state)).length, 1, 'it waits in the trash');
    for (let i = 0; i < 4; i++) { // a start every 100 ms: never quiet
      await sleep(100);
      trash.touch();
      assert.equal(readdirSync(trashDir(state)).length, 1, 'not removed while sandboxes are being started');
    }
    await sleep(600);
    assert.deepEqual(readdirSync(trashDir(state)), [], 'removed once quiet');
    await trash.close();
  });

  it('removes the oldest at once past its bound, and everything on close', async () => {
    const trash = new Trash(trashDir(state), remove);
    trash.touch();
    const all: ReturnType<typeof sandbox>[] = [];
    for (let i = 0; i < 70; i++) {
      const dirs = sandbox();
      all.push(dirs);
      await trash.throwAway(dirs);
    }
    await sleep(50); // the overflow's removals run in the background
    const left = readdirSync(trashDir(state)).length;
    assert.ok(left <= 64, `at most 64 wait in the trash (${left})`);
    await sleep(300 + 64 * 5 + 500); // then quiet: the rest go too, with no further throwAway
    assert.deepEqual(readdirSync(trashDir(state)), [], 'the ones left after the overflow go once quiet');
    for (let i = 0; i < 3; i++) await trash.throwAway(sandbox());
    trash.touch();
    await trash.close();
    assert.deepEqual(readdirSync(trashDir(state)), [], 'close empties it');
    assert.ok(all.every((d) => !existsSync(d.dir)));
  });

  it('removes in place what it cannot move (no trash directory)', async () => {
    const trash = new Trash(path.join(state, 'no-such-dir'), remove);
    const dirs = sandbox();
    await trash.throwAway(dirs);
    assert.equal(existsSync(dirs.dir), false);
    await trash.throwAway(dirs); // already gone: nothing to do, no error
    await trash.close();
  });
});
