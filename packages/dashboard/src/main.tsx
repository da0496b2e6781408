/**
 * The Podflare dashboard: sandboxes (live table and fork tree), one sandbox's history, console and
 * files, Compare with merge, and the pool and host panel. All data comes from one server-sent
 * event stream plus on-demand calls, each carrying the API key when the server wants one.
 */
import { render } from 'preact';
import { useCallback, useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { ApiProblem, getKey, readEvents, setKey } from './api.js';
import { Compare } from './compare.js';
import { HostsPanel } from './hosts.js';
import { PoolPanel } from './pool.js';
import { SandboxView, type ExecListener } from './sandbox-view.js';
import { ForkTree, SandboxTable } from './sandboxes.js';
import type { ClusterSnapshot, ExecUpdate, HostSnapshot, SandboxesSnapshot } from './types.js';

type Connection = 'connecting' | 'live' | 'needs-key' | 'offline';
type View = 'sandboxes' | 'compare' | 'pool';

function App() {
  const [keyVersion, setKeyVersion] = useState(0);
  const [connection, setConnection] = useState<Connection>('connecting');
  const [problem, setProblem] = useState('');
  const [snapshot, setSnapshot] = useState<SandboxesSnapshot>({ now: Date.now(), sandboxes: [] });
  const [host, setHost] = useState<HostSnapshot | null>(null);
  /** Set only through a cluster gateway. */
  const [cluster, setCluster] = useState<ClusterSnapshot | null>(null);
  const [skew, setSkew] = useState(0);
  const [now, setNow] = useState(Date.now());
  const [view, setView] = useState<View>('sandboxes');
  const [selected, setSelected] = useState<string | null>(null);
  const [pair, setPair] = useState<[string, string]>(['', '']);
  const [showEnded, setShowEnded] = useState(false);
  const listeners = useRef(new Set<ExecListener>());

  const subscribe = useCallback((l: ExecListener) => {
    listeners.current.add(l);
    return () => listeners.current.delete(l);
  }, []);

  // One event stream while the page is open; reconnects after a drop, stops at a refused key.
  useEffect(() => {
    const abort = new AbortController();
    let retry: ReturnType<typeof setTimeout> | undefined;
    const connect = () => {
      setConnection('connecting');
      readEvents('/v1/dashboard/events', (event, data) => {
        setConnection('live');
        setProblem('');
        if (event === 'sandboxes') {
          const snap = data as SandboxesSnapshot;
          setSkew(snap.now - Date.now());
          setSnapshot(snap);
        } else if (event === 'host') setHost(data as HostSnapshot);
        else if (event === 'cluster') setCluster(data as ClusterSnapshot);
        else if (event === 'exec') for (const l of listeners.current) l(data as ExecUpdate);
        else if (event === 'problem') setProblem((data as { message: string }).message);
      }, abort.signal).then(
        () => { if (!abort.signal.aborted) { setConnection('offline'); retry = setTimeout(connect, 2000); } },
        (err: unknown) => {
          if (abort.signal.aborted) return;
          if (err instanceof ApiProblem && err.status === 401) {
            setConnection('needs-key');
            setProblem(err.message);
            setSnapshot({ now: Date.now(), sandboxes: [] });
            setHost(null);
            return;
          }
          setConnection('offline');
          setProblem((err as Error).message);
          retry = setTimeout(connect, 2000);
        },
      );
    };
    connect();
    return () => { abort.abort(); clearTimeout(retry); };
  }, [keyVersion]);

  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(t);
  }, []);

  const serverNow = now + skew;
  const sandboxes = snapshot.sandboxes;
  const current = useMemo(() => sandboxes.find((s) => s.id === selected) ?? null, [sandboxes, selected]);
  const select = (id: string) => { setSelected(id); setView('sandboxes'); };
  const compare = (a: string, b: string) => { setPair([a, b]); setView('compare'); };
  const saveKey = (key: string) => { setKey(key); setKeyVersion((v) => v + 1); };

  return (
    <>
      <header class="top">
        <h1>Podflare</h1>
        <nav>
          {(['sandboxes', 'compare', 'pool'] as const).map((v) => (
            <button type="button" key={v} class={view === v ? 'active' : ''} data-testid={`nav-${v}`} onClick={() => setView(v)}>
              {v === 'sandboxes' ? 'Sandboxes' : v === 'compare' ? 'Compare' : cluster ? 'Hosts and pools' : 'Pool and host'}
            </button>
          ))}
        </nav>
        <span class={`connection ${connection}`} data-testid="connection">{connection === 'needs-key' ? 'API key required' : connection}</span>
        {connection !== 'needs-key' && getKey() && <button type="button" onClick={() => saveKey('')}>Forget key</button>}
      </header>
      {connection === 'needs-key' ? (
        <KeyForm problem={problem} onSave={saveKey} />
      ) : (
        <main>
          {problem && <p class="problem">{problem}</p>}
          {view === 'sandboxes' && (
            <div class="columns">
              <div class="left">
                <section>
                  <h2>Sandboxes <label class="small"><input type="checkbox" checked={showEnded} onChange={() => setShowEnded(!showEnded)} /> show ended</label></h2>
                  <SandboxTable sandboxes={sandboxes} now={serverNow} selected={selected} onSelect={select} showEnded={showEnded} />
                </section>
                <section>
                  <h2>Fork tree</h2>
                  <ForkTree sandboxes={sandboxes} now={serverNow} selected={selected} onSelect={select} showEnded={showEnded} />
                </section>
              </div>
              <div class="right">
                {current
                  ? <SandboxView key={current.id} sandbox={current} now={serverNow} onSelect={select} onCompare={compare} subscribe={subscribe} />
                  : <p class="empty">Select a sandbox to see what ran in it, run code and browse its files.</p>}
              </div>
            </div>
          )}
          {view === 'compare' && <Compare sandboxes={sandboxes} a={pair[0]} b={pair[1]} onPick={(a, b) => setPair([a, b])} />}
          {view === 'pool' && cluster && <HostsPanel cluster={cluster} />}
          {view === 'pool' && <PoolPanel host={host} />}
        </main>
      )}
    </>
  );
}

function KeyForm({ problem, onSave }: { problem: string; onSave: (key: string) => void }) {
  const [value, setValue] = useState('');
  return (
    <main class="key-form" data-testid="key-form">
      <h2>This server requires an API key</h2>
      <p>The dashboard shows nothing without one. The key is kept in this browser only and sent with each request.</p>
      {problem && <p class="problem" data-testid="key-problem">{problem}</p>}
      <form onSubmit={(e) => { e.preventDefault(); onSave(value.trim()); }}>
        <input type="password" data-testid="key-input" autocomplete="off" placeholder="API key" value={value}
          onInput={(e) => setValue((e.target as HTMLInputElement).value)} />
        <button type="submit" data-testid="key-save">Use key</button>
      </form>
    </main>
  );
}

render(<App />, document.getElementById('app')!);
