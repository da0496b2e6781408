/**
 * Starts a real Podflare server in this test process: a fresh state directory per server, the
 * shared image directory that scripts/setup.sh built (so no test rebuilds the image).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { loadConfig, startServer, type RunningServer, type ServerConfig, type StartOptions } from '@podflare/server';
import { Sandbox } from 'podflare';

export const IMAGES_DIR = process.env.PODFLARE_IMAGES_DIR ?? path.join(process.env.PODFLARE_STATE_DIR ?? '/var/lib/podflare', 'images');

export interface TestServer extends RunningServer {
  stateDir: string;
  stop(): Promise<void>;
}

/**
 * Each server reserves its disk volume on the host (config.ts, diskVolumeBytes), and tests start
 * dozens of servers: a modest volume, room enough for what the tests write.
 */
export const TEST_DISK_VOLUME_BYTES = 1024 * 1024 * 1024;

/** `options`: e.g. a registry with a test's own runtime driver. */
export async function startTestServer(overrides: Partial<ServerConfig> = {}, options: StartOptions = {}): Promise<TestServer> {
  // Short and free of ':' and ',' (overlayfs option separators).
  const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-test-'));
  const config = loadConfig({
    port: 0, poolSize: 2, logLevel: 'warn', imagesDir: IMAGES_DIR, diskVolumeBytes: TEST_DISK_VOLUME_BYTES, stateDir, ...overrides,
  }, { ...process.env, PODFLARE_API_KEYS: '' });
  let server: RunningServer;
  try {
    server = await startServer(config, options);
  } catch (err) {
    await rm(stateDir, { recursive: true, force: true }); // a server that did not start leaves nothing
    throw err;
  }
  return Object.assign(server, {
    stateDir,
    async stop() {
      await server.close();
      await rm(stateDir, { recursive: true, force: true });
    },
  });
}

/**
 * For a describe block: a server and one sandbox on it, started before its tests and closed after.
 * `ready` hands them over (hooks run later than the describe body, so they cannot be returned).
 */
export function useServerAndSandbox(ready: (server: TestServer, sbx: Sandbox) => void, overrides: Partial<ServerConfig> = {}): void {
  let server: TestServer | undefined;
  let sbx: Sandbox | undefined;
  before(async () => {
    server = await startTestServer(overrides);
    sbx = await Sandbox.create({ host: server.url });
    ready(server, sbx);
  });
  after(async () => {
    await sbx?.close();
    await server?.stop();
  });
}
