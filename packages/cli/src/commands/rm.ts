/** `podflare rm`: destroy sandboxes. */
import { NotFoundError, SANDBOX_ID_PATTERN, Sandbox, SandboxGoneError } from 'podflare';
import { EXIT_FAILURE, EXIT_OK, parse, UsageError, type Command } from '../args.js';

const HELP = `Usage: podflare rm [options] <id> [<id>...]

Destroys the given sandboxes (their interpreter, processes and files). Exits 1 if an id is
unknown to the server; already destroyed ones are fine.

Options:
  --host URL         the server (default: $PODFLARE_HOST, else $PODFLARE_HOSTD_URL, else http://127.0.0.1:7070)
  -h, --help         show this help
`;

export const rmCommand: Command = {
  name: 'rm',
  summary: 'destroy sandboxes',
  help: HELP,
  async run(argv) {
    const { values, positionals } = parse('rm', argv, {
      host: { type: 'string' },
    }, true);
    if (positionals.length === 0) throw new UsageError('missing sandbox id', 'rm');
    const bad = positionals.find((id) => !SANDBOX_ID_PATTERN.test(id));
    if (bad) throw new UsageError(`not a sandbox id: ${bad} (expected sbx_ and 32 hex digits)`, 'rm');
    let status = EXIT_OK;
    for (const id of positionals) {
      try {
        await (await Sandbox.connect(id, { host: values.host })).close();
        process.stdout.write(`${id} destroyed\n`);
      } catch (err) {
        if (err instanceof SandboxGoneError) {
          process.stdout.write(`${id} was already destroyed\n`);
        } else if (err instanceof NotFoundError) {
          process.stderr.write(`podflare: no sandbox ${id} on this server\n`);
          status = EXIT_FAILURE;
        } else {
          throw err;
        }
      }
    }
    return status;
  },
};
