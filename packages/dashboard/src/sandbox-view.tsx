/**
 * One sandbox: what it is, a console to run Python or bash in it, what ran in it (live, from the
 * server's exec history) and its files.
 */
import { useEffect, useState } from 'preact/hooks';
import { ApiProblem, downloadFile, getJson, postJson, request, runExec, sandboxPath } from './api.js';
import { bytes, duration, shortId } from './format.js';
import { Checkpoints } from './checkpoints.js';
import { TerminalPanel } from './terminal.js';
import { Outputs, appendOutput } from './output.js';
import { isEnded } from './sandboxes.js';
import type { DashboardSandbox, ExecOutput, ExecRecord, ExecUpdate, FileStat } from './types.js';

export type ExecListener = (update: ExecUpdate) => void;

interface Props {
  sandbox: DashboardSandbox;
  now: number;
  onSelect: (id: string) => void;
  onCompare: (a: string, b: string) => void;
  subscribe: (listener: ExecListener) => () => void;
}

export function SandboxView({ sandbox, now, onSelect, onCompare, subscribe }: Props) {
  const live = !isEnded(sandbox);
  return (
    <section class="sandbox-view" data-testid="sandbox-view" data-id={sandbox.id}>
      <h2 class="mono">{sandbox.id}</h2>
      <dl class="facts">
        <dt>state</dt><dd><span class={`state state-${sandbox.state}`}>{sandbox.state}</span>{sandbox.end_reason ? ` (${sandbox.end_reason})` : ''}</dd>
        <dt>template</dt><dd>{sandbox.template}</dd>
        <dt>runtime</dt><dd>{sandbox.runtime}</dd>
        <dt>egress</dt><dd>{typeof sandbox.egress === 'object' ? `only ${sandbox.egress.allow.join(', ')}` : sandbox.egress ? 'on' : 'off'}</dd>
        <dt>age</dt><dd>{duration((sandbox.ended_at ?? now) - sandbox.created_at)}</dd>
        <dt>memory</dt><dd>{bytes(sandbox.memory_bytes)}</dd>
        <dt>parent</dt>
        <dd>{sandbox.parent ? <a href="#" class="mono" onClick={(e) => { e.preventDefault(); onSelect(sandbox.parent!); }}>{shortId(sandbox.parent)}</a> : '–'}</dd>
      </dl>
      <div class="row">
        {sandbox.parent && live && (
          <button type="button" onClick={() => onCompare(sandbox.parent!, sandbox.id)}>Compare with parent</button>
        )}
        {live && <ForkButton id={sandbox.id} />}
        {live && <DeleteButton id={sandbox.id} />}
      </div>
      {live && <Console id={sandbox.id} />}
      {live && <TerminalPanel id={sandbox.id} />}
      {live && <Checkpoints id={sandbox.id} subscribe={subscribe} />}
      <History id={sandbox.id} parent={sandbox.parent} onSelect={onSelect} subscribe={subscribe} />
      {live && <FileBrowser id={sandbox.id} subscribe={subscribe} />}
    </section>
  );
}

function ForkButton({ id }: { id: string }) {
  const [n, setN] = useState(1);
  const [message, setMessage] = useState('');
  const fork = async () => {
    setMessage('forking…');
    try {
      const res = await postJson<{ children: string[] }>(sandboxPath(id, '/fork'), { n });
      setMessage(`forked ${res?.children.map(shortId).join(', ')}`);
    } catch (err) {
      setMessage(`fork failed: ${(err as Error).message}`);
    }
  };
  return <>
    <button type="button" data-testid="fork" onClick={() => void fork()}>Fork</button>
    <input type="number" class="narrow" min={1} max={32} value={n} aria-label="children"
      onInput={(e) => setN(Math.max(1, Math.min(32, Number((e.target as HTMLInputElement).value) || 1)))} />
    {message && <span class="status">{message}</span>}
  </>;
}

function DeleteButton({ id }: { id: string }) {
  const [message, setMessage] = useState('');
  const destroy = async () => {
    if (!confirm(`Destroy ${shortId(id)}? Its processes and files are gone for good.`)) return;
    try {
      await request('DELETE', sandboxPath(id));
    } catch (err) {
      setMessage((err as Error).message);
    }
  };
  return <>
    <button type="button" class="danger" onClick={() => void destroy()}>Destroy</button>
    {message && <span class="problem">{message}</span>}
  </>;
}

function Console({ id }: { id: string }) {
  const [code, setCode] = useState('');
  const [language, setLanguage] = useState<'python' | 'bash'>('python');
  const [outputs, setOutputs] = useState<ExecOutput[]>([]);
  const [status, setStatus] = useState('');
  const [running, setRunning] = useState(false);

  useEffect(() => { setOutputs([]); setStatus(''); }, [id]);

  const run = async () => {
    if (!code.trim() || running) return;
    setRunning(true);
    setOutputs([]);
    setStatus('running…');
    try {
      const end = await runExec(id, code, language, (o) => setOutputs((prev) => appendOutput(prev, o)));
      setStatus(`exit ${end.exit_code}${end.state_lost ? ' (interpreter restarted: variables lost)' : ''}`);
    } catch (err) {
      setStatus(`failed: ${(err as Error).message}`);
    } finally {
      setRunning(false);
    }
  };

  return (
    <div class="console" data-testid="console">
      <h3>Console</h3>
      <textarea
        data-testid="console-code"
        value={code}
        rows={5}
        spellcheck={false}
        placeholder={language === 'python' ? 'print("hello")   (Ctrl+Enter runs)' : 'ls -la   (Ctrl+Enter runs)'}
        onInput={(e) => setCode((e.target as HTMLTextAreaElement).value)}
        onKeyDown={(e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); void run(); } }}
      />
      <div class="row">
        <select data-testid="console-language" value={language} onChange={(e) => setLanguage((e.target as HTMLSelectElement).value as 'python' | 'bash')}>
          <option value="python">python</option>
          <option value="bash">bash</option>
        </select>
        <button type="button" data-testid="console-run" disabled={running} onClick={() => void run()}>Run</button>
        {running && <button type="button" onClick={() => void request('POST', sandboxPath(id, '/interrupt')).catch(() => undefined)}>Interrupt</button>}
        <span class="status" data-testid="console-status">{status}</span>
      </div>
      <div data-testid="console-output"><Outputs outputs={outputs} /></div>
    </div>
  );
}

interface HistoryProps {
  id: string;
  parent: string | null;
  onSelect: (id: string) => void;
  subscribe: (l: ExecListener) => () => void;
}

function History({ id, parent, onSelect, subscribe }: HistoryProps) {
  const [execs, setExecs] = useState<ExecRecord[]>([]);
  const [error, setError] = useState('');

  useEffect(() => {
    let cancelled = false;
    setExecs([]);
    setError('');
    // Subscribe first, then load, so nothing that happens in between is missed; the load replaces.
    const pending: ExecUpdate[] = [];
    let loaded = false;
    const apply = (u: ExecUpdate) => setExecs((prev) => applyUpdate(prev, u));
    const unsubscribe = subscribe((u) => {
      if (u.sandbox !== id) return;
      if (loaded) apply(u);
      else pending.push(u);
    });
    getJson<{ execs: ExecRecord[] }>(sandboxPath(id, '/execs')).then(
      ({ execs }) => {
        if (cancelled) return;
        loaded = true;
        setExecs(pending.reduce(applyUpdate, execs));
      },
      (err: Error) => { if (!cancelled) { loaded = true; setError(err.message); } },
    );
    return () => { cancelled = true; unsubscribe(); };
  }, [id]);

  return (
    <div class="history" data-testid="history">
      <h3>Exec history</h3>
      {error && <p class="problem">{error}</p>}
      {execs.length === 0 && !error && <p class="empty">Nothing ran here yet.</p>}
      {parent && (
        <p class="status">
          Forked from <a href="#" class="mono" onClick={(e) => { e.preventDefault(); onSelect(parent); }}>{shortId(parent)}</a>:
          what ran before the fork is in its history.
        </p>
      )}
      {[...execs].reverse().map((x) => (
        <article key={x.id} class={`exec ${x.exit_code ? 'failed' : ''}`} data-testid="exec">
          <header>
            <span class="lang">{x.language}</span>
            {x.execution_count ? <span>[{x.execution_count}]</span> : null}
            <span class="when">{new Date(x.started_at).toLocaleTimeString()}</span>
            <span class="exit">{x.ended_at === null ? 'running…' : `exit ${x.exit_code} · ${x.ended_at - x.started_at} ms`}</span>
            {x.state_lost && <span class="problem">state lost</span>}
            {x.truncated && <span class="problem">output truncated</span>}
          </header>
          <pre class="code">{x.code}</pre>
          <Outputs outputs={x.outputs} />
        </article>
      ))}
    </div>
  );
}

function applyUpdate(execs: ExecRecord[], u: ExecUpdate): ExecRecord[] {
  switch (u.phase) {
    case 'start':
      return execs.some((x) => x.id === u.exec.id) ? execs : [...execs, u.exec];
    case 'end':
      return execs.some((x) => x.id === u.exec.id) ? execs.map((x) => (x.id === u.exec.id ? u.exec : x)) : [...execs, u.exec];
    case 'output':
      return execs.map((x) => (x.id === u.id ? { ...x, outputs: appendOutput(x.outputs, u.output) } : x));
  }
}

function FileBrowser({ id, subscribe }: { id: string; subscribe: (l: ExecListener) => () => void }) {
  const [dir, setDir] = useState('/root');
  const [input, setInput] = useState('/root');
  const [entries, setEntries] = useState<FileStat[]>([]);
  const [message, setMessage] = useState('');
  const [version, setVersion] = useState(0);

  // Code that ran here may have changed the files: list them again after each exec.
  useEffect(() => subscribe((u) => { if (u.sandbox === id && u.phase === 'end') setVersion((v) => v + 1); }), [id]);

  useEffect(() => {
    let cancelled = false;
    getJson<{ entries: FileStat[] }>(sandboxPath(id, `/files/list?path=${encodeURIComponent(dir)}`)).then(
      ({ entries }) => { if (!cancelled) { setEntries(entries.sort((a, b) => (a.type === 'dir' ? 0 : 1) - (b.type === 'dir' ? 0 : 1) || a.name.localeCompare(b.name))); setMessage(''); } },
      (err: ApiProblem) => { if (!cancelled) { setEntries([]); setMessage(err.message); } },
    );
    return () => { cancelled = true; };
  }, [id, dir, version]);

  const go = (path: string) => { setDir(path); setInput(path); };
  const up = () => go(dir.replace(/\/[^/]+\/?$/, '') || '/');
  const join = (name: string) => (dir.endsWith('/') ? dir : dir + '/') + name;

  const upload = async (files: FileList | null) => {
    for (const file of Array.from(files ?? [])) {
      try {
        await request('PUT', sandboxPath(id, `/files?path=${encodeURIComponent(join(file.name))}`), file, 'application/octet-stream');
        setMessage(`uploaded ${file.name} (${bytes(file.size)})`);
      } catch (err) {
        setMessage(`upload failed: ${(err as Error).message}`);
      }
    }
    setVersion((v) => v + 1);
  };

  return (
    <div class="files" data-testid="files">
      <h3>Files</h3>
      <form class="row" onSubmit={(e) => { e.preventDefault(); go(input || '/'); }}>
        <button type="button" onClick={up} title="parent directory">↑</button>
        <input class="mono grow" value={input} onInput={(e) => setInput((e.target as HTMLInputElement).value)} aria-label="directory" />
        <button type="submit">Open</button>
        <button type="button" onClick={() => setVersion((v) => v + 1)}>Refresh</button>
        <label class="button">Upload<input type="file" multiple hidden data-testid="upload" onChange={(e) => void upload((e.target as HTMLInputElement).files)} /></label>
      </form>
      {message && <p class="status">{message}</p>}
      <table class="file-list">
        <tbody>
          {entries.map((f) => (
            <tr key={f.path} data-path={f.path}>
              <td class="kind">{f.type}</td>
              <td class="mono">
                {f.type === 'dir' ? <a href="#" onClick={(e) => { e.preventDefault(); go(f.path); }}>{f.name}/</a> : f.name}
              </td>
              <td>{f.type === 'dir' ? '' : bytes(f.size)}</td>
              <td>{new Date(f.mtime * 1000).toLocaleString()}</td>
              <td>{f.type === 'file' && <button type="button" onClick={() => downloadFile(id, f.path).catch((err: Error) => setMessage(`download failed: ${err.message}`))}>Download</button>}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
