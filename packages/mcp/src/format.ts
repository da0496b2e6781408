/**
 * How tool outcomes become MCP `CallToolResult`s: text a model reads easily (labelled sections, the
 * exit code always last), figures as image content, and every failure as `isError: true` with a
 * message that says what to do next — never a thrown error, which would end the call as a protocol
 * error the model cannot see.
 */
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import {
  AuthenticationError,
  ConnectionError,
  NotFoundError,
  PayloadTooLargeError,
  PodflareError,
  SandboxGoneError,
  TIMEOUT_EXIT_CODE,
} from 'podflare';
import type { Execution } from 'podflare';

type Content = CallToolResult['content'][number];

/** Image MIME types a result or file may be shown as (the ones MCP clients render). */
const IMAGE_MIME_TYPES = ['image/png', 'image/jpeg'] as const;

export function textResult(text: string, isError = false): CallToolResult {
  return isError ? { content: [{ type: 'text', text }], isError: true } : { content: [{ type: 'text', text }] };
}

/**
 * The result of `run_python` / `run_bash`: stdout, stderr, rich results (PNG/JPEG figures as images,
 * the rest as their text form), the exception if it is not already in stderr, and the exit code.
 * A non-zero exit code makes it a tool error, as in the Anthropic adapter: the model should notice.
 */
export function executionResult(
  ex: Execution,
  options: { maxOutputChars: number; note?: string | undefined; cut?: { stdout: number; stderr: number }; droppedResults?: number },
): CallToolResult {
  const sections: string[] = [];
  const images: Content[] = [];
  if (options.note) sections.push(`note: ${options.note}`);
  // One trailing newline is dropped: sections are separated by a blank line anyway.
  if (ex.stdout) sections.push(`stdout:\n${clip(ex.stdout.replace(/\n$/, ''), options.maxOutputChars, options.cut?.stdout)}`);
  if (ex.stderr) sections.push(`stderr:\n${clip(ex.stderr.replace(/\n$/, ''), options.maxOutputChars, options.cut?.stderr)}`);
  for (const result of ex.results) {
    const image = IMAGE_MIME_TYPES.find((mime) => typeof result.data[mime] === 'string');
    if (image) {
      images.push({ type: 'image', data: result.data[image] as string, mimeType: image });
      continue;
    }
    const text = result.text ?? result.markdown ?? (result.json === undefined ? undefined : JSON.stringify(result.json));
    if (text === undefined) continue;
    sections.push(`${result.isMainResult ? 'result' : 'display'}:\n${clip(text, options.maxOutputChars)}`);
  }
  if (options.droppedResults) sections.push(`${options.droppedResults} more rich results were dropped (too many or too large)`);
  if (images.length > 0) sections.push(`${images.length} image${images.length === 1 ? '' : 's'} attached`);
  // The agent prints uncaught exceptions to stderr as well; repeat only what stderr lacks.
  if (ex.error && !ex.stderr.includes(ex.error.name)) {
    sections.push(`error:\n${clip(ex.error.traceback || `${ex.error.name}: ${ex.error.value}`, options.maxOutputChars)}`);
  }
  let exit = `exit code: ${ex.exitCode}`;
  if (ex.exitCode === TIMEOUT_EXIT_CODE) exit += ' (timed out: the code was interrupted after timeout_ms)';
  if (ex.stateLost) exit += '\nthe interpreter was restarted: earlier variables and imports are gone (files remain)';
  sections.push(exit);
  const result: CallToolResult = { content: [{ type: 'text', text: sections.join('\n\n') }, ...images] };
  if (ex.exitCode !== 0) result.isError = true;
  return result;
}

/** The result of `download`: the text itself for UTF-8 files, an image for PNG/JPEG/GIF/WebP, base64 otherwise. */
export function downloadResult(path: string, data: Buffer): CallToolResult {
  if (data.length === 0) return textResult(`${path} is empty (0 bytes)`);
  const image = imageMimeType(data);
  if (image) {
    return {
      content: [
        { type: 'text', text: `${path}: ${image} image, ${data.length} bytes` },
        { type: 'image', data: data.toString('base64'), mimeType: image },
      ],
    };
  }
  const text = decodeUtf8(data);
  if (text !== undefined) return textResult(text);
  return {
    content: [
      { type: 'text', text: `${path}: binary file, ${data.length} bytes; its base64 encoding follows` },
      { type: 'text', text: data.toString('base64') },
    ],
  };
}

/** Any failure as a tool error, with a hint for the ones a model can act on. */
export function errorResult(err: unknown): CallToolResult {
  return textResult(errorMessage(err), true);
}

export function errorMessage(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  if (!(err instanceof PodflareError)) return err.message;
  let hint = '';
  if (err instanceof SandboxGoneError) {
    hint = 'Create a new one with create_sandbox (or leave sandbox_id out to use this session\'s own sandbox).';
  } else if (err instanceof NotFoundError && /^sandbox /.test(err.message)) {
    hint = 'Check the id: it must be a live sandbox, not one retired by merge_into.';
  } else if (err instanceof AuthenticationError) {
    hint = 'Set PODFLARE_API_KEY in the MCP server\'s environment to a key the Podflare server accepts.';
  } else if (err instanceof PayloadTooLargeError) {
    hint = 'Send large data with upload, in several files if need be.';
  }
  const field = err.field && !err.message.includes(err.field) ? ` (field: ${err.field})` : '';
  // ConnectionError messages already say what to check.
  const message = err instanceof ConnectionError ? err.message : `${err.message}${field}`;
  return hint ? `${message}. ${hint}` : message;
}

/**
 * Keeps the start and the end of an over-long output, saying how much was cut in between
 * (`alreadyCut`: characters dropped from its middle before it got here).
 */
export function clip(text: string, max: number, alreadyCut = 0): string {
  if (text.length <= max && !alreadyCut) return text;
  const head = Math.min(text.length, Math.ceil(max * 0.6));
  const tail = Math.min(text.length - head, max - head);
  return (
    `${text.slice(0, head)}\n… [${text.length - head - tail + alreadyCut} characters cut: print less, or write the output ` +
    `to a file and read parts of it] …\n${text.slice(text.length - tail)}`
  );
}

function decodeUtf8(data: Buffer): string | undefined {
  if (data.includes(0)) return undefined;
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(data);
  } catch {
    return undefined;
  }
}

function imageMimeType(data: Buffer): string | undefined {
  if (data.length >= 8 && data.readUInt32BE(0) === 0x89504e47) return 'image/png';
  if (data.length >= 3 && data[0] === 0xff && data[1] === 0xd8 && data[2] === 0xff) return 'image/jpeg';
  if (data.length >= 6 && /^GIF8[79]a$/.test(data.toString('latin1', 0, 6))) return 'image/gif';
  if (data.length >= 12 && data.toString('latin1', 0, 4) === 'RIFF' && data.toString('latin1', 8, 12) === 'WEBP') return 'image/webp';
  return undefined;
}
