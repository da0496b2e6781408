/** `podflare ls`: the sandboxes a server knows. */
import { Sandbox, type SandboxInfo } from 'podflare';
import { EXIT_OK, parse, type Command } from '../args.js';

const HELP = `Usage: podflare ls [options]

Lists the server's sandboxes (live ones; with --all also destroyed and merged ones it remembers).

Options:
  --all              include destroyed sandboxes
  --host URL         the server (default: $PODFLARE_HOST, else $PODFLARE_HOSTD_URL, else http://127.0.0.1:7070)
  --json             print JSON instead of a table
  -h, --help         show this help
`;

function age(from: Date, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - from.getTime()) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** A plain text table: columns padded to their widest cell. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n') + '\n';
}

export function sandboxTable(list: SandboxInfo[]): string {
  return table(
    ['ID', 'STATE', 'TEMPLATE', 'RUNTIME', 'PARENT', 'CREATED'],
    list.map((s) => [s.id, s.state, s.template, s.runtime, s.parent ?? '-', `${s.createdAt.toISOString().slice(0, 19).replace('T', ' ')}Z (${age(s.createdAt)})`]),
  );
}

export const lsCommand: Command = {
  name: 'ls',
  summary: 'list sandboxes',
  help: HELP,
  async run(argv) {
    const { values } = parse('ls', argv, {
      all: { type: 'boolean' },
      host: { type: 'string' },
      json: { type: 'boolean' },
    });
    const list = await Sandbox.list({ host: values.host, all: values.all === true });
    list.sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime());
    if (values.json) process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
    else if (list.length === 0) process.stdout.write(values.all ? 'no sandboxes\n' : 'no live sandboxes (--all shows destroyed ones)\n');
    else process.stdout.write(sandboxTable(list));
    return EXIT_OK;
  },
};
