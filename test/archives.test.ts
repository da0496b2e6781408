/** Directories as tar streams: up into a sandbox, down out of it, byte-identical files, errors. */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync, readlinkSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, it } from 'node:test';
import { BadRequestError, NotFoundError, Sandbox } from 'podflare';
import { useServerAndSandbox } from './helpers/server.js';

describe('directories as tar streams', () => {
  let sbx!: Sandbox;
  useServerAndSandbox((_s, b) => { sbx = b; });

  it('uploads a tar into a directory and downloads a directory as a tar', async () => {
    const src = mkdtempSync(path.join(os.tmpdir(), 'pf-tar-src-'));
    const dst = mkdtempSync(path.join(os.tmpdir(), 'pf-tar-dst-'));
    try {
      mkdirSync(path.join(src, 'sub/deeper'), { recursive: true });
      writeFileSync(path.join(src, 'a.txt'), 'alpha\n');
      writeFileSync(path.join(src, 'sub/deeper/b.bin'), Buffer.from([...Array(256).keys()]));
      symlinkSync('a.txt', path.join(src, 'link'));
      const tar = execFileSync('tar', ['-C', src, '-cf', '-', '.']);
      await sbx.files.uploadTar('/root/project', Readable.from([tar.subarray(0, 1000), tar.subarray(1000)]));
      assert.equal((await sbx.runCode('print(open("/root/project/a.txt").read(), end="")')).stdout, 'alpha\n');
      assert.equal((await sbx.runCode('import os\nprint(os.readlink("/root/project/link"))')).stdout, 'a.txt\n');
      await sbx.runCode('open("/root/project/made-inside.txt", "w").write("inside\\n")');
      const down = await sbx.files.downloadTar('/root/project');
      const chunks: Buffer[] = [];
      for await (const c of down as AsyncIterable<Buffer>) chunks.push(c);
      execFileSync('tar', ['-C', dst, '-xf', '-'], { input: Buffer.concat(chunks) });
      assert.equal(readFileSync(path.join(dst, 'a.txt'), 'utf8'), 'alpha\n');
      assert.deepEqual([...readFileSync(path.join(dst, 'sub/deeper/b.bin'))], [...Array(256).keys()]);
      assert.equal(readlinkSync(path.join(dst, 'link')), 'a.txt');
      assert.equal(readFileSync(path.join(dst, 'made-inside.txt'), 'utf8'), 'inside\n');
      // No temporary archive is left in the sandbox.
      assert.equal((await sbx.runCode('import glob\nprint(glob.glob("/tmp/.pf-tar-*"))')).stdout, '[]\n');
    } finally {
      rmSync(src, { recursive: true, force: true });
      rmSync(dst, { recursive: true, force: true });
    }
  });

  it('refuses what is not a tar or not a directory', async () => {
    await assert.rejects(sbx.files.uploadTar('/root/x', Buffer.from('this is not a tar archive at all')), BadRequestError);
    await sbx.files.upload('/root/plain.txt', 'x');
    await assert.rejects(sbx.files.downloadTar('/root/plain.txt'), BadRequestError);
    await assert.rejects(sbx.files.downloadTar('/root/no-such-dir'), NotFoundError);
  });
});
