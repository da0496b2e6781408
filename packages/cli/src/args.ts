/**
 * Argument helpers shared by the commands: node:util parseArgs with its errors turned into usage
 * errors (exit code 2), and checked conversions for numeric and enumerated options.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** Exit codes of every podflare command. */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** A mistake on the command line: printed with a pointer to --help, exit code 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
  constructor(message: string, readonly command?: string) {
    super(message);
  }
}

/** `-h`/`--help` given to a command: main prints the command's help instead of running it. */
export class HelpRequested extends Error {
  override readonly name = 'HelpRequested';
}

/** One podflare subcommand. */
export interface Command {
  name: string;
  /** One line for `podflare --help`. */
  summary: string;
  /** The full `podflare <name> --help` text. */
  help: string;
  /** Runs with the arguments after the command name; resolves to the exit code. */
  run(argv: string[]): Promise<number>;
}

type Options = NonNullable<ParseArgsConfig['options']>;

/** What {@link parse} returns: parseArgs' result, typed by the options given. */
export type Parsed<O extends Options> = ReturnType<typeof parseArgs<{ args: string[]; options: O; allowPositionals: true; strict: true }>>;

/**
 * parseArgs in strict mode; unknown options, missing values and stray arguments become UsageErrors,
 * and -h/--help (added to every command's options) a HelpRequested.
 */
export function parse<O extends Options>(command: string, argv: string[], options: O, allowPositionals = false): Parsed<O> {
  let parsed: Parsed<O>;
  try {
    parsed = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals, strict: true }) as Parsed<O>;
  } catch (err) {
    const code = (err as { code?: string }).code ?? '';
    if (code.startsWith('ERR_PARSE_ARGS')) throw new UsageError((err as Error).message, command);
    throw err;
  }
  // Every command takes -h/--help.
  if ((parsed.values as { help?: boolean }).help) throw new HelpRequested();
  return parsed;
}

export function intOption(value: string | undefined, name: string, min: number, max: number, command: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(`--${name} must be an integer from ${min} to ${max}, got "${value}"`, command);
  }
  return n;
}

export function enumOption<T extends string>(value: string | undefined, name: string, allowed: readonly T[], command: string): T | undefined {
  if (value === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`--${name} must be one of ${allowed.join(', ')}, got "${value}"`, command);
  }
  return value as T;
}

/** Reads all of stdin as UTF-8 (for `podflare run -`). */
export async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer));
  return Buffer.concat(chunks).toString('utf8');
}

/** "1.2 s" / "340 ms" */
export function formatMs(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(ms >= 10_000 ? 0 : 1)} s` : `${Math.round(ms)} ms`;
}
