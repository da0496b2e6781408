/** The live sandboxes table and the fork tree, both fed by the server's `sandboxes` events. */
import { isEndedState } from '@podflare/protocol/sandbox';
import { bytes, duration, shortId } from './format.js';
import type { DashboardSandbox } from './types.js';

export const isEnded = (s: DashboardSandbox) => isEndedState(s.state);

interface ListProps {
  sandboxes: DashboardSandbox[];
  now: number;
  selected: string | null;
  onSelect: (id: string) => void;
}

export function SandboxTable({ sandboxes, now, selected, onSelect, showEnded }: ListProps & { showEnded: boolean }) {
  const rows = sandboxes.filter((s) => showEnded || !isEnded(s));
  if (rows.length === 0) return <p class="empty">No sandboxes yet. Create one with the SDK, the CLI or the API.</p>;
  // Through a cluster gateway every sandbox names the host it runs on.
  const clustered = rows.some((s) => s.host !== undefined);
  return (
    <table class="sandboxes" data-testid="sandbox-table">
      <thead>
        <tr>
          <th>id</th>{clustered && <th>host</th>}<th>template</th><th>runtime</th><th>state</th><th>age</th><th>idle</th><th>memory</th><th>parent</th>
        </tr>
      </thead>
      <tbody>
        {rows.map((s) => (
          <tr key={s.id} data-id={s.id} class={`${selected === s.id ? 'selected' : ''} ${isEnded(s) ? 'ended' : ''}`} tabIndex={0}
            onClick={() => onSelect(s.id)} onKeyDown={(e) => { if (e.key === 'Enter') onSelect(s.id); }}>
            <td class="mono" title={s.id}>{shortId(s.id)}</td>
            {clustered && <td class="mono" data-testid="sandbox-host">{s.host ?? '–'}</td>}
            <td>{s.template}</td>
            <td>{s.runtime}</td>
            <td><span class={`state state-${s.state}`}>{s.state}</span></td>
            <td>{duration((s.ended_at ?? now) - s.created_at)}</td>
            <td>{isEnded(s) ? '–' : s.state === 'running' ? 'busy' : duration(now - s.last_active_at)}</td>
            <td>{bytes(s.memory_bytes)}</td>
            <td class="mono" title={s.parent ?? ''}>
              {s.parent ? <a href="#" onClick={(e) => { e.preventDefault(); e.stopPropagation(); onSelect(s.parent!); }}>{shortId(s.parent)}</a> : '–'}
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

interface TreeNode { sandbox: DashboardSandbox; children: TreeNode[] }

/** Lineages as trees: each root is a sandbox with no parent in view. */
export function buildForest(sandboxes: DashboardSandbox[]): TreeNode[] {
  const nodes = new Map(sandboxes.map((s) => [s.id, { sandbox: s, children: [] as TreeNode[] }]));
  const roots: TreeNode[] = [];
  for (const node of nodes.values()) {
    const parent = node.sandbox.parent ? nodes.get(node.sandbox.parent) : undefined;
    if (parent) parent.children.push(node);
    else roots.push(node);
  }
  return roots;
}

/** The ids of `id` and everything below it. */
export function descendants(sandboxes: DashboardSandbox[], id: string): Set<string> {
  const out = new Set([id]);
  let grew = true;
  while (grew) {
    grew = false;
    for (const s of sandboxes) if (s.parent && out.has(s.parent) && !out.has(s.id)) { out.add(s.id); grew = true; }
  }
  return out;
}

function TreeItem({ node, selected, onSelect }: { node: TreeNode; selected: string | null; onSelect: (id: string) => void }) {
  const s = node.sandbox;
  const mark = s.state === 'merged' ? 'merged' : isEnded(s) ? 'retired' : null;
  return (
    <li>
      <button
        type="button"
        class={`tree-node state-${s.state} ${mark ?? 'live'} ${selected === s.id ? 'selected' : ''}`}
        data-testid="tree-node"
        data-id={s.id}
        data-state={s.state}
        title={s.end_reason ? `${s.id} — ${s.end_reason}` : s.id}
        onClick={() => onSelect(s.id)}
      >
        <span class="mono">{shortId(s.id)}</span>
        <span class={`state state-${s.state}`}>{mark ?? s.state}</span>
      </button>
      {node.children.length > 0 && (
        <ul>{node.children.map((c) => <TreeItem key={c.sandbox.id} node={c} selected={selected} onSelect={onSelect} />)}</ul>
      )}
    </li>
  );
}

export function ForkTree({ sandboxes, selected, onSelect, showEnded }: ListProps & { showEnded: boolean }) {
  // A lone ended sandbox is noise; ended nodes are kept while they belong to a lineage that forked.
  const forest = buildForest(sandboxes).filter((r) => showEnded || !isEnded(r.sandbox) || r.children.length > 0);
  if (forest.length === 0) return <p class="empty">No lineages yet.</p>;
  return (
    <div class="tree" data-testid="fork-tree">
      {forest.map((root) => (
        <ul key={root.sandbox.id} class="tree-root" data-root={root.sandbox.id}>
          <TreeItem node={root} selected={selected} onSelect={onSelect} />
        </ul>
      ))}
    </div>
  );
}
