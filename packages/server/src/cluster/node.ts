/**
 * `podflare node`: one host of a cluster. It is `podflare serve` (same manager, runtimes, pool and
 * HTTP API) with the records in PostgreSQL under this host's id, a heartbeat of its host row and
 * warm slots, and an API that answers only gateways (the shared node token). It fails static:
 * losing the database only stops its heartbeats (gateways then stop placing here); its sandboxes
 * keep running and answering.
 */
import type { ServerConfig } from '../config.js';
import { createLogger } from '../log.js';
import { startServer, type RunningServer, type StartOptions } from '../server.js';
import { PgStore } from '../store/pg-store.js';
import { HostRegistry } from './host-registry.js';
import { checkNodeToken, requireNodeToken, requireNodeTokenOnUpgrade } from './node-token.js';

/** How often a node checks its pool for ready counts to publish between heartbeats. */
const SLOT_PUBLISH_MS = 100;

export interface NodeOptions {
  /** PostgreSQL connection string. */
  db: string;
  /** host:port at which gateways reach this node. */
  advertise: string;
  /** This host's id in the cluster; stable across restarts (a restarted node takes its row back). */
  hostId: string;
  /** The token gateways present. */
  nodeToken: string;
  /** @default 1000 */
  heartbeatMs?: number;
}

export interface RunningNode {
  server: RunningServer;
  hostId: string;
  close(): Promise<void>;
}

export async function startNode(config: ServerConfig, node: NodeOptions, opts: StartOptions = {}): Promise<RunningNode> {
  const token = checkNodeToken(node.nodeToken);
  if (!/^[A-Za-z0-9._:-]{1,128}$/.test(node.hostId)) throw new Error(`node id ${JSON.stringify(node.hostId)}: letters, digits and . _ : - only`);
  if (!/^[^\s/]+:\d+$/.test(node.advertise)) throw new Error(`--advertise ${JSON.stringify(node.advertise)}: expected HOST:PORT`);
  const log = createLogger(config.logLevel, { host_id: node.hostId });
  const store = await PgStore.open({ connectionString: node.db, hostId: node.hostId });
  const registry = new HostRegistry(store.connections, node.hostId, node.advertise);
  let server: RunningServer;
  try {
    await registry.register();
    server = await startServer(config, { ...opts, store, wrapHandler: requireNodeToken(token), wrapUpgrade: requireNodeTokenOnUpgrade(token) });
  } catch (err) {
    await store.close();
    throw err;
  }
  const manager = server.manager;
  let beating: Promise<void> = Promise.resolve();
  let failing = false;
  const readyByTemplate = () => {
    const poolReady = new Map<string, number>();
    for (const p of manager.poolStats) poolReady.set(p.template, (poolReady.get(p.template) ?? 0) + p.ready);
    return poolReady;
  };
  /** What the slot rows were last brought to (a change between heartbeats publishes at once). */
  let published = '';
  const beat = async () => {
    const poolReady = readyByTemplate();
    published = JSON.stringify([...poolReady]);
    try {
      await registry.heartbeat({
        live: manager.liveCount, capacity: config.maxSandboxes, poolReady,
        poolTarget: manager.poolStats.reduce((a, p) => a + p.target, 0),
      });
      if (failing) log.info('heartbeats reach the database again');
      failing = false;
    } catch (err) {
      // Fail static: the sandboxes go on; gateways stop placing here until the heartbeats return.
      if (!failing) log.warn('heartbeat failed (sandboxes keep running)', { error: (err as Error).message });
      failing = true;
    }
  };
  const publishSlots = async () => {
    const poolReady = readyByTemplate();
    const now = JSON.stringify([...poolReady]);
    if (now === published || failing) return;
    published = now;
    await registry.syncSlots(poolReady).catch(() => { published = ''; });
  };
  await beat();
  const timer = setInterval(() => { beating = beating.then(beat); }, node.heartbeatMs ?? 1000);
  // Serialized with the heartbeats (one slot writer at a time); cheap when nothing changed.
  const slotTimer = setInterval(() => { beating = beating.then(publishSlots); }, SLOT_PUBLISH_MS);
  let closing: Promise<void> | null = null;
  return {
    server,
    hostId: node.hostId,
    close() {
      closing ??= (async () => {
        clearInterval(timer);
        clearInterval(slotTimer);
        await beating;
        await registry.drain().catch((err: unknown) => log.warn('could not mark the host draining', { error: String(err) }));
        await server.close(); // closes the store too
      })();
      return closing;
    },
  };
}
