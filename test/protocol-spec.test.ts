/**
 * The protocol is defined once, in packages/protocol; the Python SDK, the agent and docs/api.md carry
 * generated copies (`npm run gen:protocol`). These tests regenerate them from the TypeScript sources
 * and fail when a committed copy, or what the Python code makes of it, has drifted.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync, cpSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { AGENT_PROTOCOL_VERSION } from '../packages/protocol/src/agent.js';
import { ERROR_TABLE } from '../packages/protocol/src/errors.js';
import { EXIT_CODES } from '../packages/protocol/src/events.js';
import { ENDED_SANDBOX_STATES, SANDBOX_ID_PATTERN } from '../packages/protocol/src/sandbox.js';
import { ERROR_TABLE_MARKERS, PROTOCOL_JSON_COPIES, protocolJson, withErrorTable } from '../packages/protocol/src/spec.js';
import { agentHash, buildAgent, listAgentFiles } from '../packages/server/src/image/build.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const read = (rel: string) => readFileSync(path.join(ROOT, rel), 'utf8');
const python = (cwd: string, code: string) => JSON.parse(execFileSync('python3', ['-c', code], { cwd, encoding: 'utf8' })) as unknown;

describe('the protocol document', () => {
  it('is committed, up to date, in the Python SDK and in the agent', () => {
    for (const rel of PROTOCOL_JSON_COPIES) assert.equal(read(rel), protocolJson(), `${rel} is stale: run npm run gen:protocol`);
  });

  it('docs/api.md lists exactly the codes of the error table, with their statuses', () => {
    const docs = read('docs/api.md');
    assert.equal(docs, withErrorTable(docs), 'docs/api.md: the error table is stale: run npm run gen:protocol');
    const section = docs.slice(docs.indexOf(ERROR_TABLE_MARKERS.begin), docs.indexOf(ERROR_TABLE_MARKERS.end));
    const rows = [...section.matchAll(/^\| ([a-z_]+) \| (\d{3}) \|/gm)].map((m) => [m[1], Number(m[2])]);
    assert.deepEqual(rows, Object.entries(ERROR_TABLE).map(([code, spec]) => [code, spec.status]));
  });

  it('the Python SDK makes of it the same tables as the TypeScript', () => {
    const got = python(path.join(ROOT, 'python'), [
      'import json; from podflare import _errors, _models, _protocol',
      'print(json.dumps({"status": dict(_errors.ERROR_STATUS), "classes": sorted(_errors.ERROR_CLASSES),',
      '  "retryable": sorted(_errors._RETRYABLE), "timeout": _models.TIMEOUT_EXIT_CODE,',
      '  "ended": sorted(_protocol.ENDED_SANDBOX_STATES), "id": _protocol.SANDBOX_ID_PATTERN.pattern}))',
    ].join('\n'));
    const codes = Object.keys(ERROR_TABLE) as (keyof typeof ERROR_TABLE)[];
    assert.deepEqual(got, {
      status: Object.fromEntries(codes.map((c) => [c, ERROR_TABLE[c].status])),
      classes: [...codes].sort(),
      retryable: [...codes.filter((c) => ERROR_TABLE[c].retryable), 'connection_error'].sort(),
      timeout: EXIT_CODES.timeout,
      ended: [...ENDED_SANDBOX_STATES].sort(),
      id: SANDBOX_ID_PATTERN.source,
    });
  });

  it('the agent takes its protocol version and timeout exit code from it', () => {
    const got = python(path.join(ROOT, 'agent'), 'import json, podflare_common as c\nprint(json.dumps([c.PROTOCOL_VERSION, c.TIMEOUT_EXIT_CODE]))');
    assert.deepEqual(got, [AGENT_PROTOCOL_VERSION, EXIT_CODES.timeout]);
  });
});

describe('the agent layer carries the protocol document', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'pf-protocol-spec-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));

  it('lists, hashes and copies podflare_protocol.json: a changed document rebuilds the layer', async () => {
    const agentDir = path.join(tmp, 'agent');
    cpSync(path.join(ROOT, 'agent'), agentDir, { recursive: true, filter: (src) => !src.includes('__pycache__') });
    const files = await listAgentFiles(agentDir);
    assert.ok(files.some((f) => f.rel === 'podflare_protocol.json'), 'the document is part of the layer');
    assert.ok(!files.some((f) => f.rel.startsWith('tests/')), 'tests are not');

    // No base rootfs: nothing is byte-compiled, which this test does not need.
    const noBase = path.join(tmp, 'no-base');
    const images = path.join(tmp, 'images');
    const first = await buildAgent(images, agentDir, noBase);
    assert.equal(readFileSync(path.join(first.dir, 'opt/podflare/podflare_protocol.json'), 'utf8'), protocolJson());

    const doc = JSON.parse(protocolJson()) as { agent_protocol_version: number };
    writeFileSync(path.join(agentDir, 'podflare_protocol.json'), JSON.stringify({ ...doc, agent_protocol_version: doc.agent_protocol_version + 1 }));
    const second = await buildAgent(images, agentDir, noBase);
    assert.notEqual(second.hash, first.hash);
    assert.equal(second.hash, await agentHash(await listAgentFiles(agentDir), ''));
    assert.ok(statSync(second.dir).isDirectory());
  });
});

describe('definitions are not copied by hand', () => {
  /** Every .ts/.tsx file under `dir`, skipping build output and dependencies. */
  const sources = (dir: string): string[] => readdirSync(path.join(ROOT, dir), { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && /\.tsx?$/.test(e.name) && !/(^|\/)(dist|node_modules)(\/|$)/.test(path.relative(ROOT, e.parentPath)))
    .map((e) => path.relative(ROOT, path.join(e.parentPath, e.name)));
  const files = [...sources('packages'), ...sources('test'), ...sources('bench')]
    .filter((f) => f !== 'packages/protocol/src/sandbox.ts' && f !== 'test/protocol-spec.test.ts');

  it('the sandbox-id pattern and the ended states are written only in packages/protocol', () => {
    const copies = files.filter((f) => {
      const text = read(f);
      return /sbx_\[0-9a-f\]\{32\}/.test(text) || /'stopped', 'error', 'merged', 'lost'/.test(text);
    });
    assert.deepEqual(copies, []);
  });

  it('exit codes 124 and 137 are not bare literals in code', () => {
    const bare = /(?:===?|!==?|:|=|return|\?)\s*(?:124|137)\b(?!\s*[,)]?\s*\/\/)/;
    const copies = files.filter((f) => f !== 'packages/protocol/src/events.ts' && read(f).split('\n')
      .some((line) => !/^\s*(\*|\/\/)/.test(line) && !/assert/.test(line) && bare.test(line)));
    assert.deepEqual(copies, []);
  });
});
