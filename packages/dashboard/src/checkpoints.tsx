/**
 * A sandbox's checkpoints on its timeline (named ones and its exec history, oldest first), with
 * the buttons an operator needs: take one, restore one, rewind the last call. Listed again after
 * every exec (a sandbox with history gains one per exec).
 */
import { useEffect, useState } from 'preact/hooks';
import { getJson, postJson, request, sandboxPath } from './api.js';
import type { ExecListener } from './sandbox-view.js';

interface Checkpoint {
  id: string;
  name: string | null;
  kind: 'manual' | 'history';
  created_at: string;
  before_code: string | null;
}

export function Checkpoints({ id, subscribe }: { id: string; subscribe: (l: ExecListener) => () => void }) {
  const [list, setList] = useState<Checkpoint[]>([]);
  const [message, setMessage] = useState('');
  const [version, setVersion] = useState(0);
  const [busy, setBusy] = useState(false);

  useEffect(() => subscribe((u) => { if (u.sandbox === id && u.phase === 'end') setVersion((v) => v + 1); }), [id]);
  useEffect(() => {
    let cancelled = false;
    getJson<{ checkpoints: Checkpoint[] }>(sandboxPath(id, '/checkpoints')).then(
      ({ checkpoints }) => { if (!cancelled) setList(checkpoints); },
      (err: Error) => { if (!cancelled) setMessage(err.message); },
    );
    return () => { cancelled = true; };
  }, [id, version]);

  const act = async (what: string, work: () => Promise<unknown>) => {
    setBusy(true);
    setMessage(`${what}…`);
    try {
      await work();
      setMessage(`${what}: done`);
    } catch (err) {
      setMessage(`${what} failed: ${(err as Error).message}`);
    } finally {
      setBusy(false);
      setVersion((v) => v + 1);
    }
  };
  const history = list.some((c) => c.kind === 'history');

  return (
    <div class="checkpoints" data-testid="checkpoints">
      <h3>Checkpoints</h3>
      <div class="row">
        <button type="button" data-testid="checkpoint" disabled={busy}
          onClick={() => void act('checkpoint', () => postJson(sandboxPath(id, '/checkpoints'), {}))}>Checkpoint</button>
        {history && (
          <button type="button" data-testid="rewind" disabled={busy}
            onClick={() => void act('rewind', () => postJson(sandboxPath(id, '/rewind'), { steps: 1 }))}>Rewind last call</button>
        )}
        {message && <span class="status" data-testid="checkpoints-status">{message}</span>}
      </div>
      {list.length === 0 && <p class="empty">No checkpoints.</p>}
      <ol class="timeline">
        {list.map((c) => (
          <li key={c.id} data-testid="checkpoint-item" class="mono">
            <span class="when">{new Date(c.created_at).toLocaleTimeString()}</span>{' '}
            {c.kind === 'history' ? <span title={c.before_code ?? ''}>before: {(c.before_code ?? '').split('\n')[0]}</span> : <span>{c.name ?? c.id}</span>}{' '}
            <button type="button" disabled={busy}
              onClick={() => void act(`restore ${c.name ?? c.id}`, () => postJson(sandboxPath(id, `/checkpoints/${c.id}/restore`), {}))}>Restore</button>
            <button type="button" class="danger" disabled={busy}
              onClick={() => void act('delete', () => request('DELETE', sandboxPath(id, `/checkpoints/${c.id}`)))}>Delete</button>
          </li>
        ))}
      </ol>
    </div>
  );
}
