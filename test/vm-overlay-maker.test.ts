/**
 * Fork points' empty disk overlays, written from a skeleton (overlay-maker.ts): what qemu-img
 * itself reads back from one must be a sound qcow2 image of the right size over the right backing
 * file, like one `qemu-img create` makes. The VM fork test boots children on such overlays.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { OverlayMaker } from '../packages/server/src/runtime/vm/overlay-maker.js';

const info = (file: string) => JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as {
  format: string; 'virtual-size': number; 'backing-filename': string; 'backing-filename-format': string;
};

describe('vm fork point: disk overlays from a skeleton', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pf-overlay-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('names each overlay\'s own backing layer, as large as the image asked, and passes qemu-img check', async () => {
    const maker = new OverlayMaker();
    const size = 3n * 1024n ** 3n + 512n * 1024n;
    const layers = ['0123456789ab', 'ba9876543210'].map((id) => path.join(dir, `${id}.qcow2`));
    for (const layer of layers) execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', layer, String(size)]);
    for (const [i, layer] of layers.entries()) {
      const overlay = path.join(dir, `top${i}.qcow2`);
      await maker.make(layer, overlay, layer);
      const got = info(overlay);
      assert.equal(got.format, 'qcow2');
      assert.equal(got['virtual-size'], Number(size));
      assert.equal(got['backing-filename'], layer);
      assert.equal(got['backing-filename-format'], 'qcow2');
      execFileSync('qemu-img', ['check', '-q', overlay]); // throws on a damaged image
    }
    // A layer name of another length: a skeleton (placeholder) of its own.
    const odd = path.join(dir, 'short.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', odd, String(size)]);
    await maker.make(odd, path.join(dir, 'top-odd.qcow2'), odd);
    assert.equal(info(path.join(dir, 'top-odd.qcow2'))['backing-filename'], odd);
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('.skeleton')), [], 'no skeleton file is left behind');
  });
});
