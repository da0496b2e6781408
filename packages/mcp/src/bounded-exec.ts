/**
 * Runs code for a tool call holding at most a bounded amount of its output: what a model can be
 * shown is capped anyway (`maxOutputChars`), and what the sandbox prints is untrusted in size (its
 * agent's own cap lives inside the sandbox). stdout and stderr keep their head and tail, the middle
 * is counted and dropped; rich results past a count or size are dropped and noted.
 */
import { Execution, Result } from 'podflare';
import type { ExecEvent, Sandbox } from 'podflare';

/** Rich results kept per call (figures, display() calls, the last value). */
const MAX_RESULTS = 32;

/** The head and tail of a text stream, at most `2 * keep` characters held. */
class HeadTail {
  private head = '';
  private tail = '';
  /** Characters dropped between head and tail. */
  cut = 0;

  constructor(private readonly keep: number) {}

  add(text: string): void {
    if (this.head.length < this.keep) {
      const room = this.keep - this.head.length;
      this.head += text.slice(0, room);
      text = text.slice(room);
      if (!text) return;
    }
    const joined = this.tail + text;
    this.cut += Math.max(0, joined.length - this.keep);
    this.tail = joined.slice(-this.keep);
  }

  get text(): string {
    return this.head + this.tail;
  }
}

export interface BoundedExecution {
  execution: Execution;
  /** Characters of stdout and stderr dropped before formatting (besides what clip() cuts). */
  cut: { stdout: number; stderr: number };
  /** Rich results dropped. */
  droppedResults: number;
}

/** `runCode` with bounded memory: at most ~4 × maxChars characters of text and MAX_RESULTS results. */
export async function runBounded(
  sandbox: Sandbox,
  request: { code: string; language: 'python' | 'bash'; timeoutMs?: number | undefined; signal?: AbortSignal | undefined },
  maxChars: number,
): Promise<BoundedExecution> {
  const stdout = new HeadTail(maxChars);
  const stderr = new HeadTail(maxChars);
  const results: Result[] = [];
  let resultChars = 0;
  let droppedResults = 0;
  let error: Extract<ExecEvent, { type: 'error' }>['data'] | undefined;
  let exit: Extract<ExecEvent, { type: 'exit' }> | undefined;
  for await (const event of sandbox.runCodeStream(request)) {
    if (event.type === 'stdout') stdout.add(event.data);
    else if (event.type === 'stderr') stderr.add(event.data);
    else if (event.type === 'error') error = event.data;
    else if (event.type === 'exit') exit = event;
    else if (event.type === 'result') {
      const size = JSON.stringify(event.data).length;
      // Images are kept whole or not at all; the size cap leaves room for a few figures.
      if (results.length >= MAX_RESULTS || resultChars + size > 16 * maxChars + 8 * 1024 * 1024) droppedResults++;
      else {
        resultChars += size;
        results.push(new Result(event.data, event.is_main_result === true));
      }
    }
  }
  if (!exit) throw new Error('the exec stream ended without its exit event');
  const execution = new Execution({
    logs: { stdout: [stdout.text], stderr: [stderr.text] }, exitCode: exit.data, results, error,
    executionCount: exit.execution_count ?? null, stateLost: exit.state_lost === true,
  });
  return { execution, cut: { stdout: stdout.cut, stderr: stderr.cut }, droppedResults };
}
