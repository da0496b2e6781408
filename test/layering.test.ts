/**
 * The server's layers, checked on its sources: HTTP (`packages/server/src/http/`) sits on top of
 * the sandbox manager, which sits on the runtimes and the agent channel. Nothing below HTTP may
 * import from it (only the composition root, server.ts, the package entry, index.ts, and the
 * cluster gateway, another HTTP front end, are above it); the domain error below HTTP is
 * `SandboxError`, not the HTTP `ApiError`; and the routes reach a sandbox only through the
 * manager, never its runtime sandbox, agent channel or queue.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';

const SRC = path.resolve(import.meta.dirname, '../packages/server/src');
const HTTP = path.join(SRC, 'http');
/** Above HTTP: they wire it up (the cluster gateway is an HTTP front end of its own, over the same parts). */
const ABOVE_HTTP = new Set(['server.ts', 'index.ts', path.join('cluster', 'gateway.ts')]);

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts'))
    .map((e) => path.join(e.parentPath, e.name));
}

/** Every module specifier a file imports or re-exports (static and dynamic). */
function specifiers(text: string): string[] {
  const found = [...text.matchAll(/(?:^|[\s;])(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]/g)].map((m) => m[1]!);
  found.push(...[...text.matchAll(/\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g)].map((m) => m[1]!));
  found.push(...[...text.matchAll(/^\s*import\s+['"]([^'"]+)['"]/gm)].map((m) => m[1]!));
  return found;
}

const inHttp = (file: string) => file.startsWith(HTTP + path.sep);
const rel = (file: string) => path.relative(SRC, file);
/** Source text without comments (a comment may name what code must not). */
const code = (file: string) => readFileSync(file, 'utf8').replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:'"`])\/\/.*$/gm, '$1');

describe('server layering', () => {
  const files = sources(SRC);

  it('finds the sources', () => {
    assert.ok(files.length > 50, `only ${files.length} sources under ${SRC}`);
    assert.ok(files.some(inHttp));
  });

  it('no module below HTTP imports from http/', () => {
    const offenders: string[] = [];
    for (const file of files) {
      if (inHttp(file) || ABOVE_HTTP.has(rel(file))) continue;
      for (const spec of specifiers(readFileSync(file, 'utf8'))) {
        if (!spec.startsWith('.')) continue;
        const target = path.resolve(path.dirname(file), spec);
        if (target === HTTP || inHttp(target)) offenders.push(`${rel(file)} imports ${spec}`);
      }
    }
    assert.deepEqual(offenders, []);
  });

  it('the HTTP error (ApiError) is named only in http/: the layers below throw SandboxError', () => {
    const offenders = files.filter((f) => !inHttp(f) && !ABOVE_HTTP.has(rel(f)) && /\bApiError\b/.test(code(f))).map(rel);
    assert.deepEqual(offenders, []);
  });

  it('SandboxError stands alone (it imports only the protocol), so the runtimes can take it with them', () => {
    const file = path.resolve(SRC, '../../runtime/src/sandbox-error.ts');
    assert.deepEqual(specifiers(readFileSync(file, 'utf8')).filter((s) => !s.startsWith('@podflare/protocol')), []);
  });

  it('runtime code takes its configuration as a slice: it imports no ServerConfig, doctor or limits from above it', () => {
    const above = ['config.js', 'doctor.js', 'limits.js'].map((f) => path.join(SRC, f.replace(/\.js$/, '')));
    const offenders: string[] = [];
    for (const file of files.filter((f) => f.startsWith(path.join(SRC, 'runtime') + path.sep))) {
      for (const spec of specifiers(readFileSync(file, 'utf8'))) {
        if (spec.startsWith('.') && above.includes(path.resolve(path.dirname(file), spec).replace(/\.js$/, ''))) offenders.push(`${rel(file)} imports ${spec}`);
      }
    }
    assert.deepEqual(offenders, []);
  });

  it('the store knows no runtime: it imports nothing from runtime/ or @podflare/runtime', () => {
    const offenders: string[] = [];
    for (const file of files.filter((f) => f.startsWith(path.join(SRC, 'store') + path.sep))) {
      for (const spec of specifiers(readFileSync(file, 'utf8'))) {
        const target = spec.startsWith('.') ? path.resolve(path.dirname(file), spec) : spec;
        if (target === '@podflare/runtime' || target.startsWith(path.join(SRC, 'runtime'))) offenders.push(`${rel(file)} imports ${spec}`);
      }
    }
    assert.deepEqual(offenders, []);
  });

  it('routes reach a sandbox only through the manager (no runtime sandbox, agent channel or queue)', () => {
    const offenders: string[] = [];
    for (const file of files.filter(inHttp)) {
      for (const m of code(file).matchAll(/\.(rt|channel|queue|diffs|runtime)\.\w+/g)) offenders.push(`${rel(file)}: ${m[0]}`);
    }
    assert.deepEqual(offenders, []);
  });
});
