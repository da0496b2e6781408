/**
 * Writes the protocol document into the Python SDK and the agent, and the error table into
 * docs/api.md, from packages/protocol/src. `--check` writes nothing and exits 1 when a file differs
 * (test/protocol-spec.test.ts runs the same comparison).
 *
 *   npm run gen:protocol            # regenerate
 *   npm run gen:protocol -- --check
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PROTOCOL_JSON_COPIES, protocolJson, withErrorTable } from '../src/spec.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const DOCS = 'docs/api.md';

/** Every generated file (relative to the repository's root) and the content it must have. */
async function expected(): Promise<Map<string, string>> {
  const files = new Map<string, string>(PROTOCOL_JSON_COPIES.map((rel) => [rel, protocolJson()]));
  files.set(DOCS, withErrorTable(await readFile(path.join(ROOT, DOCS), 'utf8')));
  return files;
}

const check = process.argv.includes('--check');
const stale: string[] = [];
for (const [rel, content] of await expected()) {
  const current = await readFile(path.join(ROOT, rel), 'utf8').catch(() => null);
  if (current === content) continue;
  stale.push(rel);
  if (!check) await writeFile(path.join(ROOT, rel), content);
}
if (check && stale.length) {
  console.error(`out of date (run npm run gen:protocol): ${stale.join(', ')}`);
  process.exit(1);
}
console.log(stale.length ? `${check ? 'stale' : 'wrote'}: ${stale.join(', ')}` : 'protocol files up to date');
