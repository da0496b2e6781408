/**
 * Two sandboxes side by side: the files added, removed and modified (with unified diffs), the
 * interpreter variables that differ, and a button merging the second into the first when it
 * descends from it.
 */
import { useEffect, useState } from 'preact/hooks';
import { getJson, postJson, sandboxPath } from './api.js';
import { shortId } from './format.js';
import { descendants, isEnded } from './sandboxes.js';
import type { DashboardSandbox, FileDiff } from './types.js';

interface Props {
  sandboxes: DashboardSandbox[];
  a: string;
  b: string;
  onPick: (a: string, b: string) => void;
}

export function Compare({ sandboxes, a, b, onPick }: Props) {
  const live = sandboxes.filter((s) => !isEnded(s));
  const [diff, setDiff] = useState<FileDiff | null>(null);
  const [message, setMessage] = useState('');
  const [busy, setBusy] = useState(false);

  const load = async () => {
    if (!a || !b || a === b) return;
    setBusy(true);
    setMessage('');
    try {
      setDiff(await getJson<FileDiff>(`${sandboxPath(a, `/diff/${encodeURIComponent(b)}`)}?content=1&vars=1`));
    } catch (err) {
      setDiff(null);
      setMessage((err as Error).message);
    } finally {
      setBusy(false);
    }
  };
  useEffect(() => { setDiff(null); void load(); }, [a, b]);

  const canMerge = Boolean(a && b && a !== b && descendants(sandboxes, a).has(b) && live.some((s) => s.id === b));
  const merge = async () => {
    if (!confirm(`Merge ${shortId(b)} into ${shortId(a)}? ${shortId(a)} takes ${shortId(b)}'s memory and files; ${shortId(b)} is retired.`)) return;
    setBusy(true);
    try {
      await postJson(sandboxPath(a, `/merge_into/${encodeURIComponent(b)}`), {});
      setMessage(`merged ${shortId(b)} into ${shortId(a)}`);
      setDiff(null);
    } catch (err) {
      setMessage(`merge failed: ${(err as Error).message}`);
    } finally {
      setBusy(false);
    }
  };

  const picker = (value: string, onChange: (v: string) => void, label: string, testid: string) => (
    <label>
      {label}{' '}
      <select data-testid={testid} value={value} onChange={(e) => onChange((e.target as HTMLSelectElement).value)}>
        <option value="">choose…</option>
        {live.map((s) => <option key={s.id} value={s.id}>{shortId(s.id)}{s.parent ? ` (child of ${shortId(s.parent)})` : ''}</option>)}
      </select>
    </label>
  );

  return (
    <section class="compare" data-testid="compare">
      <h2>Compare</h2>
      <div class="row">
        {picker(a, (v) => onPick(v, b), 'A (base)', 'compare-a')}
        {picker(b, (v) => onPick(a, v), 'B', 'compare-b')}
        <button type="button" disabled={busy || !a || !b || a === b} onClick={() => void load()}>Refresh</button>
        <button type="button" data-testid="merge" disabled={busy || !canMerge} onClick={() => void merge()}
          title={canMerge ? '' : 'B must be a live descendant of A'}>Merge B into A</button>
      </div>
      {message && <p class="status" data-testid="compare-message">{message}</p>}
      {busy && <p class="status">working…</p>}
      {diff && <DiffView diff={diff} />}
    </section>
  );
}

function DiffView({ diff }: { diff: FileDiff }) {
  const files = [
    ...diff.added.map((p) => ({ p, kind: 'added' })),
    ...diff.removed.map((p) => ({ p, kind: 'removed' })),
    ...diff.modified.map((p) => ({ p, kind: 'modified' })),
  ].sort((x, y) => x.p.localeCompare(y.p));
  const vars = diff.vars;
  return (
    <div class="diff" data-testid="diff">
      <h3>Files ({files.length} changed)</h3>
      {files.length === 0 && <p class="empty">No file differs.</p>}
      <ul class="changed-files">
        {files.map(({ p, kind }) => (
          <li key={p} class={kind} data-path={p}>
            <span class={`badge ${kind}`}>{kind}</span> <span class="mono">{p}</span>
            {diff.binary?.includes(p) && <span class="note"> (binary)</span>}
            {diff.too_large?.includes(p) && <span class="note"> (too large to show)</span>}
            {diff.content?.[p] && <UnifiedDiff text={diff.content[p]!} />}
          </li>
        ))}
      </ul>
      {vars && (
        <>
          <h3>Variables</h3>
          {vars.added.length + vars.removed.length + vars.changed.length === 0 && <p class="empty">No variable differs.</p>}
          <table class="vars">
            <tbody>
              {vars.added.map((v) => <tr key={`+${v.name}`} class="added"><td>added</td><td class="mono">{v.name}</td><td>{v.type}</td><td class="mono">{v.repr}</td></tr>)}
              {vars.removed.map((v) => <tr key={`-${v.name}`} class="removed"><td>removed</td><td class="mono">{v.name}</td><td>{v.type}</td><td class="mono">{v.repr}</td></tr>)}
              {vars.changed.map((v) => <tr key={`~${v.name}`} class="modified"><td>changed</td><td class="mono">{v.name}</td><td>{v.type}</td><td class="mono">{v.before} → {v.after}</td></tr>)}
            </tbody>
          </table>
        </>
      )}
    </div>
  );
}

function UnifiedDiff({ text }: { text: string }) {
  return (
    <pre class="unified">
      {text.split('\n').map((line, i) => {
        const cls = line.startsWith('+++') || line.startsWith('---') ? 'meta' : line.startsWith('+') ? 'plus' : line.startsWith('-') ? 'minus' : line.startsWith('@@') ? 'hunk' : '';
        return <span key={i} class={cls}>{line}{'\n'}</span>;
      })}
    </pre>
  );
}
