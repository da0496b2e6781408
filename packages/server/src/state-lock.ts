/**
 * One server per state directory. On start-up a server removes whatever sandboxes an earlier one
 * left in its state directory, so a second server on the same directory would destroy the first
 * one's sandboxes. `<stateDir>/server.pid` names the owner (pid and process start time, so a
 * reused pid is not mistaken for it); a stale file, left by a killed server, is taken over.
 */
import { open, readFile, unlink } from 'node:fs/promises';
import path from 'node:path';

export interface StateDirLock {
  release(): Promise<void>;
}

/** The start time of a process (clock ticks since boot), or null when it is not running. */
async function startTime(pid: number): Promise<string | null> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  if (!stat) return null;
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields[0] === 'Z' ? null : (fields[19] ?? null);
}

export async function lockStateDir(stateDir: string): Promise<StateDirLock> {
  const file = path.join(stateDir, 'server.pid');
  const mine = `${process.pid} ${await startTime(process.pid)}\n`;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const handle = await open(file, 'wx', 0o644);
      await handle.writeFile(mine);
      await handle.close();
      return {
        async release() {
          if ((await readFile(file, 'utf8').catch(() => '')) === mine) await unlink(file).catch(() => undefined);
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const [pid, started] = (await readFile(file, 'utf8').catch(() => '')).trim().split(' ');
    if (pid && Number(pid) !== process.pid && started && (await startTime(Number(pid))) === started) {
      throw new Error(`another podflare server (pid ${pid}) uses the state directory ${stateDir}: stop it, or choose another --state-dir`);
    }
    if (pid && Number(pid) === process.pid && started === (await startTime(process.pid))) {
      throw new Error(`this process already runs a podflare server on the state directory ${stateDir}`);
    }
    await unlink(file).catch(() => undefined); // stale: its server is gone
  }
  throw new Error(`cannot lock the state directory ${stateDir}`);
}
