/** Every example agent loop runs end to end with its scripted model against a real server. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { startTestServer, type TestServer } from './helpers/server.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const EXAMPLES = readdirSync(path.join(ROOT, 'examples')).filter((f) => f.endsWith('.ts'));

describe('examples', () => {
  let server: TestServer;
  before(async () => { server = await startTestServer({ poolSize: 1 }); });
  after(async () => server?.stop());

  for (const example of EXAMPLES) {
    it(`${example} runs with its scripted model`, async () => {
      // No provider keys: the examples must use their scripted models and make no network calls.
      const env: NodeJS.ProcessEnv = { ...process.env, PODFLARE_HOST: server.url };
      for (const key of ['OPENAI_API_KEY', 'ANTHROPIC_API_KEY']) delete env[key];
      const child = spawn(process.execPath, ['--import', 'tsx', path.join('examples', example)], { cwd: ROOT, env });
      let output = '';
      child.stdout.on('data', (d: Buffer) => { output += d.toString(); });
      child.stderr.on('data', (d: Buffer) => { output += d.toString(); });
      const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
      assert.equal(code, 0, output);
      assert.ok(output.trim().length > 0);
    });
  }
});
