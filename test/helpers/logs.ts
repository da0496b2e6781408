/**
 * The in-process server logs JSON lines to stderr: a test that checks what was logged keeps them
 * here (and lets everything else through to stderr). `restore` puts stderr back.
 */
export interface CapturedLogs {
  lines: Array<Record<string, unknown>>;
  restore(): void;
}

export function captureServerLogs(): CapturedLogs {
  const lines: Array<Record<string, unknown>> = [];
  const realWrite = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    if (text.startsWith('{"ts"')) {
      for (const line of text.split('\n').filter(Boolean)) lines.push(JSON.parse(line) as Record<string, unknown>);
      return true;
    }
    return (realWrite as (c: unknown, ...r: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stderr.write;
  return { lines, restore: () => { process.stderr.write = realWrite; } };
}
