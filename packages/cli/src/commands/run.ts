/** `podflare run`: run code in a fresh sandbox, stream its output, exit with its exit code. */
import { Sandbox } from 'podflare';
import { enumOption, intOption, parse, readStdin, UsageError, type Command } from '../args.js';

const HELP = `Usage: podflare run [options] <code>
       podflare run [options] -          (code from stdin)

Creates a sandbox on a running server, runs the code (Python unless --bash), streams its
stdout/stderr here, prints the value of the last expression, destroys the sandbox, and exits
with the code's exit code. Ctrl-C interrupts the code; a second Ctrl-C gives up.

Options:
  --bash             the code is a bash script
  --host URL         the server (default: $PODFLARE_HOST, else $PODFLARE_HOSTD_URL, else http://127.0.0.1:7070);
                     the API key comes from $PODFLARE_API_KEY
  --timeout-ms N     interrupt the code after N ms (exit code 124)
  --runtime NAME     ns, vm (a microVM with its own kernel) or auto (default: the server's)
  -h, --help         show this help

Examples:
  podflare run 'import sys; print(sys.version)'
  podflare run --bash 'uname -a; ls /'
  podflare run --runtime vm --bash 'uname -r'
  echo 'print(6*7)' | podflare run -
`;

export const runCommand: Command = {
  name: 'run',
  summary: 'run Python (or bash) code in a fresh sandbox',
  help: HELP,
  async run(argv) {
    const { values, positionals } = parse('run', argv, {
      bash: { type: 'boolean' },
      host: { type: 'string' },
      'timeout-ms': { type: 'string' },
      runtime: { type: 'string' },
    }, true);
    if (positionals.length === 0) throw new UsageError('missing code to run (use - to read it from stdin)', 'run');
    if (positionals.length > 1) throw new UsageError('give the code as one argument (quote it)', 'run');
    const timeoutMs = intOption(values['timeout-ms'], 'timeout-ms', 1, 24 * 3600 * 1000, 'run');
    const code = positionals[0] === '-' ? await readStdin() : positionals[0]!;
    const language = values.bash ? 'bash' : 'python';

    // The server checks the name against the runtimes it registers.
    const sandbox = await Sandbox.create({ host: values.host, runtime: values.runtime });
    let interrupts = 0;
    const onSigint = () => {
      interrupts++;
      if (interrupts === 1) {
        process.stderr.write('\ninterrupting (Ctrl-C again to give up)\n');
        sandbox.interrupt().catch(() => undefined);
      } else {
        sandbox.close().catch(() => undefined).finally(() => process.exit(130));
      }
    };
    process.on('SIGINT', onSigint);
    let exitCode = 1;
    let stderrSeen = '';
    try {
      for await (const ev of sandbox.runCodeStream(code, { language, timeoutMs })) {
        switch (ev.type) {
          case 'stdout':
            process.stdout.write(ev.data);
            break;
          case 'stderr':
            process.stderr.write(ev.data);
            stderrSeen = (stderrSeen + ev.data).slice(-64 * 1024);
            break;
          case 'result': {
            const text = ev.data['text/plain'];
            if (ev.is_main_result && typeof text === 'string') process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
            break;
          }
          case 'error':
            // The interpreter usually printed the traceback to stderr already; print it only if not.
            if (!stderrSeen.includes(ev.data.name)) {
              process.stderr.write(ev.data.traceback ? ev.data.traceback.replace(/\n?$/, '\n') : `${ev.data.name}: ${ev.data.value}\n`);
            }
            break;
          case 'exit':
            exitCode = ev.data;
            if (ev.state_lost) process.stderr.write('(the interpreter was restarted: its state was lost)\n');
            break;
        }
      }
    } finally {
      process.off('SIGINT', onSigint);
      await sandbox.close().catch((err: unknown) => process.stderr.write(`podflare: could not destroy ${sandbox.id}: ${(err as Error).message}\n`));
    }
    return Math.max(0, Math.min(255, exitCode));
  },
};
