/**
 * The examples' Podflare server: PODFLARE_HOST when set, otherwise a server started in this process
 * with its own state directory (and the shared image directory), removed again by stop().
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export async function podflareServer(): Promise<{ host: string; stop(): Promise<void> }> {
  if (process.env.PODFLARE_HOST) return { host: process.env.PODFLARE_HOST, stop: async () => {} };
  const { loadConfig, startServer } = await import('@podflare/server');
  const stateDir = await mkdtemp(path.join(os.tmpdir(), 'pf-example-'));
  const imagesDir = process.env.PODFLARE_IMAGES_DIR ?? path.join(process.env.PODFLARE_STATE_DIR ?? '/var/lib/podflare', 'images');
  try {
    const server = await startServer(loadConfig({ port: 0, poolSize: 1, logLevel: 'warn', stateDir, imagesDir }, { ...process.env, PODFLARE_API_KEYS: '' }));
    console.log(`(started a Podflare server at ${server.url}; set PODFLARE_HOST to use your own)`);
    return {
      host: server.url,
      async stop() {
        await server.close();
        await rm(stateDir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await rm(stateDir, { recursive: true, force: true });
    throw err;
  }
}
