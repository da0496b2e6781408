/** The toy driver's diff: two host directories compared file by file (paths shown under `a`). */
import { lstat, readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import type { DiffOptions, FileDiff } from '@podflare/runtime';

/** Regular files and directories below `dir`, by relative path: their kind, and a file's content. */
async function walk(dir: string, rel = '', out = new Map<string, Buffer | 'dir'>()): Promise<Map<string, Buffer | 'dir'>> {
  for (const name of await readdir(path.join(dir, rel)).catch(() => [] as string[])) {
    const sub = path.join(rel, name);
    const st = await lstat(path.join(dir, sub));
    if (st.isDirectory()) {
      out.set(sub, 'dir');
      await walk(dir, sub, out);
    } else if (st.isFile()) {
      out.set(sub, await readFile(path.join(dir, sub)));
    }
  }
  return out;
}

export async function diffTrees(a: string, b: string, opts: DiffOptions): Promise<FileDiff> {
  const [ta, tb] = await Promise.all([walk(a), walk(b)]);
  const shown = (rel: string) => path.join(a, rel);
  const wanted = (p: string) => !opts.paths?.length || opts.paths.some((q) => p === q || p.startsWith(q.endsWith('/') ? q : `${q}/`));
  const diff: FileDiff = { added: [], removed: [], modified: [] };
  for (const [rel, v] of tb) {
    const before = ta.get(rel);
    if (before === undefined) diff.added.push(shown(rel));
    else if (before !== v && (before === 'dir' || v === 'dir' || !before.equals(v))) diff.modified.push(shown(rel));
  }
  for (const rel of ta.keys()) if (!tb.has(rel)) diff.removed.push(shown(rel));
  for (const list of [diff.added, diff.removed, diff.modified]) {
    const kept = list.filter(wanted).sort();
    list.splice(0, list.length, ...kept);
  }
  return diff;
}
