/**
 * The dashboard's event stream through a gateway (`GET /v1/dashboard/events`): one stream to the
 * page made of every node's. For each caller the gateway opens the same stream to each live node
 * (with the caller's key, so each node scopes to the caller's sandboxes) and passes on:
 * - `sandboxes`: the nodes' latest snapshots merged, each sandbox with its `host` (a node that went
 *   away keeps its last snapshot in view: its sandboxes are not gone, only unreachable);
 * - `exec` steps as they come, from any node;
 * - `host` (pools, histograms, load of one node): from the first live node by id, as before;
 * - `cluster` (ours): every host — freshness, reachability, load, pool — every second.
 * Nodes that appear are joined, dropped streams are reopened, all upstreams close with the page.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ClusterHost, DashboardSandbox } from '@podflare/protocol';
import type { HostTable, HostView } from './host-table.js';
import { sendToNode, type ForwardTarget } from './proxy.js';

/** A page that does not read its events is cut off past this much queued. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024;
const SYNC_EVERY_MS = 1000;
const COALESCE_MS = 100;

export interface DashboardEventsDeps {
  hosts: HostTable;
  isReachable(hostId: string): boolean;
  target(h: HostView): ForwardTarget;
  /** The hosts as `/v1/cluster/hosts` shows them. */
  clusterHosts(): ClusterHost[];
}

/** Serves the merged stream to one page until it goes away. */
export async function serveClusterDashboardEvents(req: IncomingMessage, res: ServerResponse, deps: DashboardEventsDeps): Promise<void> {
  res.writeHead(200, { 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-store', 'X-Accel-Buffering': 'no' });
  res.flushHeaders();
  const send = (event: string, data: unknown) => {
    if (res.writableEnded || res.destroyed) return;
    if (res.writableLength > MAX_BUFFERED_BYTES) return void res.destroy();
    res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  };
  const snapshots = new Map<string, DashboardSandbox[]>();
  const loads = new Map<string, number[]>();
  const upstreams = new Map<string, IncomingMessage | 'opening'>();
  let closed = false;
  let timer: NodeJS.Timeout | null = null;
  const sendSandboxes = () => {
    timer ??= setTimeout(() => {
      timer = null;
      const merged = [...snapshots.values()].flat().sort((a, b) => a.created_at - b.created_at);
      send('sandboxes', { now: Date.now(), sandboxes: merged });
    }, COALESCE_MS);
  };
  /** The node whose `host` events the page gets: the first live one by id. */
  const hostEventsFrom = () => [...upstreams.keys()].filter((id) => upstreams.get(id) !== 'opening').sort()[0];

  const open = async (h: HostView) => {
    upstreams.set(h.id, 'opening');
    try {
      const answer = await sendToNode(deps.target(h), { method: 'GET', path: '/v1/dashboard/events', headers: req.headers, body: null });
      if (closed || answer.statusCode !== 200) {
        answer.destroy();
        upstreams.delete(h.id);
        return;
      }
      upstreams.set(h.id, answer);
      answer.setEncoding('utf8');
      let buffer = '';
      answer.on('data', (chunk: string) => {
        buffer += chunk;
        let end: number;
        while ((end = buffer.indexOf('\n\n')) !== -1) {
          onEvent(h.id, buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      });
      const gone = () => { if (upstreams.get(h.id) === answer) upstreams.delete(h.id); };
      answer.on('close', gone);
      answer.on('error', gone);
    } catch {
      upstreams.delete(h.id); // unreachable now: the next sync tries again
    }
  };

  const onEvent = (hostId: string, block: string) => {
    let event = 'message';
    let data = '';
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) event = line.slice(6).trim();
      else if (line.startsWith('data:')) data += line.slice(5).replace(/^ /, '');
    }
    let parsed: unknown;
    try { parsed = JSON.parse(data); } catch { return; }
    if (event === 'sandboxes') {
      const list = (parsed as { sandboxes?: DashboardSandbox[] }).sandboxes ?? [];
      snapshots.set(hostId, list.map((s) => ({ ...s, host: hostId })));
      sendSandboxes();
    } else if (event === 'host') {
      const loadavg = (parsed as { host?: { loadavg?: number[] } }).host?.loadavg;
      if (Array.isArray(loadavg)) loads.set(hostId, loadavg);
      if (hostId === hostEventsFrom()) send('host', { ...(parsed as object), cluster_host: hostId });
    } else if (event === 'exec') {
      send('exec', parsed);
    } else if (event === 'problem') {
      send('problem', { message: `${hostId}: ${(parsed as { message?: string }).message ?? ''}` });
    }
  };

  const sync = () => {
    for (const h of deps.hosts.all()) {
      if (!upstreams.has(h.id) && deps.hosts.isFresh(h) && deps.isReachable(h.id)) void open(h);
    }
    send('cluster', { hosts: deps.clusterHosts().map((h) => (loads.has(h.id) ? { ...h, loadavg: loads.get(h.id) } : h)) });
  };
  sync();
  const every = setInterval(sync, SYNC_EVERY_MS);
  await new Promise<void>((resolve) => res.once('close', () => resolve()));
  closed = true;
  clearInterval(every);
  if (timer) clearTimeout(timer);
  for (const u of upstreams.values()) if (u !== 'opening') u.destroy();
}
