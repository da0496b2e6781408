#!/usr/bin/env node
/**
 * The `podflare` command. Each subcommand lives in commands/<name>.ts; this file only dispatches
 * and turns errors into exit codes: 0 ok, 1 failure, 2 usage.
 */
import { readFileSync } from 'node:fs';
import { EXIT_FAILURE, EXIT_OK, EXIT_USAGE, HelpRequested, UsageError, type Command } from './args.js';

/**
 * The commands, in help order, each loaded only when it runs (or for the help): `podflare serve`
 * starts sooner without the others' modules (a restart's adoption waits for its start-up).
 */
const COMMANDS: ReadonlyArray<readonly [string, () => Promise<Command>]> = [
  ['serve', async () => (await import('./commands/serve.js')).serveCommand],
  ['demo', async () => (await import('./commands/demo.js')).demoCommand],
  ['run', async () => (await import('./commands/run.js')).runCommand],
  ['ls', async () => (await import('./commands/ls.js')).lsCommand],
  ['rm', async () => (await import('./commands/rm.js')).rmCommand],
  ['image', async () => (await import('./commands/image.js')).imageCommand],
  ['template', async () => (await import('./commands/template.js')).templateCommand],
  ['doctor', async () => (await import('./commands/doctor.js')).doctorCommand],
  ['node', async () => (await import('./commands/node.js')).nodeCommand],
  ['gateway', async () => (await import('./commands/gateway.js')).gatewayCommand],
];

const loadCommand = (name: string | undefined): Promise<Command> | undefined => COMMANDS.find(([n]) => n === name)?.[1]();

function version(): string {
  try {
    return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

async function mainHelp(): Promise<string> {
  const commands = await Promise.all(COMMANDS.map(([, load]) => load()));
  const width = Math.max(...commands.map((c) => c.name.length));
  return `Usage: podflare <command> [options]

Podflare: self-hosted sandboxes for AI agents (persistent Python interpreters with fork).

Commands:
${commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join('\n')}

Run \`podflare <command> --help\` for a command's options.
Options: -h, --help (this help), -v, --version
`;
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '-h' || name === '--help' || name === 'help') {
    const target = name === 'help' ? await loadCommand(rest[0]) : undefined;
    process.stdout.write(target ? target.help : await mainHelp());
    return name === undefined ? EXIT_USAGE : EXIT_OK;
  }
  if (name === '-v' || name === '--version') {
    process.stdout.write(`podflare ${version()}\n`);
    return EXIT_OK;
  }
  const command = await loadCommand(name);
  if (!command) {
    process.stderr.write(`podflare: unknown command "${name}"\n\n${await mainHelp()}`);
    return EXIT_USAGE;
  }
  try {
    return await command.run(rest);
  } catch (err) {
    if (err instanceof HelpRequested) {
      process.stdout.write(command.help);
      return EXIT_OK;
    }
    if (err instanceof UsageError) {
      process.stderr.write(`podflare ${command.name}: ${err.message}\nRun \`podflare ${command.name} --help\` for usage.\n`);
      return EXIT_USAGE;
    }
    const e = err as Error & { code?: unknown };
    // A PodflareError or an ImageBuildError carries a message meant for the user; a stack would hide it.
    process.stderr.write(`podflare ${command.name}: ${e.message ?? String(err)}\n`);
    if (process.env.PODFLARE_DEBUG) process.stderr.write(`${e.stack ?? ''}\n`);
    return EXIT_FAILURE;
  }
}

// Exit explicitly: a command is done when it resolves, even if a library left a timer or socket
// behind. (stdout/stderr writes are synchronous for files and pipes on Linux, so nothing is lost.)
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`podflare: ${String(err)}\n`);
    process.exit(EXIT_FAILURE);
  },
);
