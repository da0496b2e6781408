/** `podflare doctor`: can this machine run sandboxes? */
import path from 'node:path';
import { formatDoctorReport, loadConfig, runDoctor } from '@podflare/server';
import { EXIT_FAILURE, EXIT_OK, parse, type Command } from '../args.js';

const HELP = `Usage: podflare doctor [options]

Checks what sandboxes need on this machine (bubblewrap, namespaces, overlayfs, cgroups,
slirp4netns, mmdebstrap, room for the disk volume of $PODFLARE_DISK_VOLUME_MB in the state
directory) and what is optional (KVM, QEMU, whether the image is built).
Exits 1 when a required check fails.

Options:
  --images-dir DIR   where images live (default: $PODFLARE_IMAGES_DIR, else <state dir>/images)
  --state-dir DIR    the server's state directory (default: $PODFLARE_STATE_DIR, else /var/lib/podflare)
  --json             print the report as JSON
  -h, --help         show this help
`;

export const doctorCommand: Command = {
  name: 'doctor',
  summary: 'check that this machine can run sandboxes',
  help: HELP,
  async run(argv) {
    const { values } = parse('doctor', argv, {
      'images-dir': { type: 'string' },
      'state-dir': { type: 'string' },
      json: { type: 'boolean' },
    });
    const config = loadConfig({
      stateDir: values['state-dir'] ? path.resolve(values['state-dir']) : undefined,
      imagesDir: values['images-dir'] ? path.resolve(values['images-dir']) : undefined,
    });
    const report = await runDoctor({ imagesDir: config.imagesDir, stateDir: config.stateDir, diskVolumeBytes: config.diskVolumeBytes });
    process.stdout.write(values.json ? `${JSON.stringify(report, null, 2)}\n` : `${formatDoctorReport(report)}\n`);
    return report.ok ? EXIT_OK : EXIT_FAILURE;
  },
};
