/** `podflare image build|prune`: the sandbox image (Debian base + agent layer). */
import path from 'node:path';
import { builtinRuntimes, ensureImage, loadConfig, pruneImages } from '@podflare/server';
import { EXIT_OK, formatMs, parse, UsageError, type Command } from '../args.js';
import { imageProgress } from '../image-progress.js';

const HELP = `Usage: podflare image build [options]
       podflare image prune [options]

build   Builds the sandbox image if it is missing or out of date: a Debian root filesystem
        (mmdebstrap, needs root, about a minute) and the agent layer (the repo's agent/*.py,
        milliseconds). Instant when both are current. The server does the same on start.
        With --runtime vm, also the microVM guest: Debian's cloud kernel (uncompressed), a
        busybox initramfs and the image as an ext4 root (seconds; the server builds it on the
        first VM sandbox otherwise).
prune   Removes images other than the current one that no running sandbox uses, and the
        leftovers of interrupted builds.

Options:
  --images-dir DIR   where images live (default: $PODFLARE_IMAGES_DIR, else <state dir>/images)
  --state-dir DIR    the server's state directory (default: $PODFLARE_STATE_DIR, else /var/lib/podflare)
  --agent-dir DIR    the agent's Python files (default: the repo's agent/ folder)
  --runtime NAME     build: ns (default) or vm (also the microVM guest image)
  --force            build: rebuild both layers even if they exist
  --dry-run          prune: only list what would be removed
  -q, --quiet        build: print nothing when the image is already current
  -h, --help         show this help
`;

const OPTIONS = {
  'images-dir': { type: 'string' },
  'state-dir': { type: 'string' },
  'agent-dir': { type: 'string' },
  runtime: { type: 'string' },
  force: { type: 'boolean' },
  'dry-run': { type: 'boolean' },
  quiet: { type: 'boolean', short: 'q' },
} as const;

function mib(bytes: number | undefined): string {
  if (bytes === undefined) return '?';
  return bytes < 1024 * 1024 ? `${Math.ceil(bytes / 1024)} KiB` : `${(bytes / 1024 / 1024).toFixed(0)} MiB`;
}

export const imageCommand: Command = {
  name: 'image',
  summary: 'build (or prune) the sandbox image',
  help: HELP,
  async run(argv) {
    const { values, positionals } = parse('image', argv, OPTIONS, true);
    const [sub, ...rest] = positionals;
    if (rest.length) throw new UsageError(`unexpected argument: ${rest[0]}`, 'image');
    const config = loadConfig({
      stateDir: values['state-dir'] ? path.resolve(values['state-dir']) : undefined,
      imagesDir: values['images-dir'] ? path.resolve(values['images-dir']) : undefined,
      agentDir: values['agent-dir'] ? path.resolve(values['agent-dir']) : undefined,
    });
    if (sub === 'build') {
      if (values['dry-run']) throw new UsageError('--dry-run is an option of `image prune`', 'image');
      const runtimes = builtinRuntimes();
      const driver = values.runtime === undefined ? undefined : runtimes.get(values.runtime);
      if (values.runtime !== undefined && !driver) throw new UsageError(`--runtime must be ${runtimes.names().join(' or ')}, got "${values.runtime}"`, 'image');
      // Progress only when something is built or waited for; --quiet (setup scripts) also drops the summary.
      const reporter = imageProgress({ quiet: true });
      const started = Date.now();
      try {
        const image = await ensureImage({
          imagesDir: config.imagesDir,
          agentDir: config.agentDir,
          force: values.force,
          onProgress: reporter.onProgress,
          log: reporter.log,
        });
        // A runtime's own image beyond the sandbox image (the VM guest), where it has one.
        const own = await driver?.buildImage?.({ imagesDir: config.imagesDir, image, onProgress: reporter.onProgress, log: reporter.log });
        reporter.finish();
        if (values.quiet && !reporter.worked) return EXIT_OK;
        process.stdout.write(`image ${image.id} ready (${formatMs(Date.now() - started)})\n  base:  ${image.base}\n  agent: ${image.agent}\n`);
        if (own) process.stdout.write(own.map((line) => `${line}\n`).join(''));
        return EXIT_OK;
      } finally {
        reporter.finish();
      }
    }
    if (sub === 'prune') {
      if (values.force) throw new UsageError('--force is an option of `image build`', 'image');
      const result = await pruneImages({
        imagesDir: config.imagesDir,
        agentDir: config.agentDir,
        dryRun: values['dry-run'],
        log: (m) => process.stderr.write(`${m}\n`),
      });
      const verb = values['dry-run'] ? 'would remove' : 'removed';
      for (const r of result.removed) process.stdout.write(`${verb} ${r.path}${r.bytes === undefined ? '' : ` (${mib(r.bytes)})`}\n`);
      for (const k of result.kept) process.stdout.write(`kept ${k.path} (${k.reason})\n`);
      const total = result.removed.reduce((sum, r) => sum + (r.bytes ?? 0), 0);
      process.stdout.write(`${result.removed.length} ${values['dry-run'] ? 'to remove' : 'removed'}, ${mib(total)}\n`);
      return EXIT_OK;
    }
    throw new UsageError(sub ? `unknown image subcommand: ${sub} (build or prune)` : 'missing subcommand: build or prune', 'image');
  },
};
