/**
 * Directories as tar streams, reached as `manager.archives`. `tar` itself runs inside the sandbox,
 * as a background process (so symlinks, special files and whatever a member name holds are the
 * sandbox's own business, confined to it), writing or reading a temporary archive in the sandbox's
 * /tmp that moves through the ordinary streamed file transfer and is removed afterwards. It takes
 * the archive's size in the sandbox's disk for the moment.
 */
import { randomBytes } from 'node:crypto';
import { SandboxError } from '@podflare/runtime';
import type { SandboxFiles } from './files.js';
import type { LiveSandbox } from './live-sandbox.js';
import type { SandboxProcesses } from './processes.js';

const tmpName = () => `/tmp/.pf-tar-${randomBytes(8).toString('hex')}.tar`;

export class SandboxArchives {
  constructor(private readonly files: SandboxFiles, private readonly processes: SandboxProcesses) {}

  /** Packs `dir` into a temporary tar in the sandbox; the caller streams it and then calls `discard`. */
  async pack(s: LiveSandbox, dir: string): Promise<string> {
    const tmp = tmpName();
    await this.run(s, 'cd -- "$PF_DIR" && tar -cf "$PF_ARCHIVE" .', { PF_DIR: dir, PF_ARCHIVE: tmp }, `cannot pack ${dir}`);
    return tmp;
  }

  async discard(s: LiveSandbox, tmp: string): Promise<void> {
    await this.files.remove(s, tmp, false).catch(() => undefined);
  }

  /** Unpacks a tar stream into `dir` (created if missing); resolves once it is all there. */
  async unpack(s: LiveSandbox, dir: string, body: AsyncIterable<Buffer>, complete: () => boolean): Promise<void> {
    const tmp = tmpName();
    try {
      await this.files.upload(s, tmp, body, complete);
      await this.run(s, 'mkdir -p -- "$PF_DIR" && tar --no-same-owner -xf "$PF_ARCHIVE" -C "$PF_DIR"',
        { PF_DIR: dir, PF_ARCHIVE: tmp }, `cannot unpack into ${dir}`);
    } finally {
      await this.discard(s, tmp);
    }
  }

  /** Runs `cmd` (paths passed in the environment, never in the command line) to its end; 400 with its stderr if it fails. */
  private async run(s: LiveSandbox, cmd: string, env: Record<string, string>, what: string): Promise<void> {
    const info = await this.processes.start(s, { cmd, env });
    let output = '';
    let code = -1;
    await this.processes.output(s, info.pid, 0, true, (ev) => {
      if (ev.type === 'stdout' || ev.type === 'stderr') output = (output + ev.data).slice(-4000);
      else if (ev.type === 'exit') code = ev.data;
    }, () => false);
    if (code !== 0) throw new SandboxError('bad_request', `${what}: ${output.trim() || `tar exited with ${code}`}`, { field: 'path' });
  }
}
