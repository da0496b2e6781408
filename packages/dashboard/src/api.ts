/**
 * Talking to the server: every call carries the API key the user entered (kept in this browser's
 * localStorage), server-sent events are read through fetch so the key travels in a header rather
 * than in a URL, and execs stream their NDJSON events as they come.
 */
import { KILLED_EXIT_CODE } from '@podflare/protocol/events';
import type { ExecOutput } from './types.js';

const KEY_STORAGE = 'podflare.apiKey';

export class ApiProblem extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

export const getKey = () => localStorage.getItem(KEY_STORAGE) ?? '';
export const setKey = (key: string) => (key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE));

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function problem(res: Response): Promise<ApiProblem> {
  const text = await res.text().catch(() => '');
  let message = text || res.statusText;
  try {
    message = (JSON.parse(text) as { error?: string }).error ?? message;
  } catch { /* not JSON */ }
  return new ApiProblem(res.status, message);
}

export async function request(method: string, path: string, body?: BodyInit, contentType = 'application/json'): Promise<Response> {
  const res = await fetch(path, { method, body, headers: headers(body !== undefined ? { 'Content-Type': contentType } : {}) });
  if (!res.ok) throw await problem(res);
  return res;
}

export async function getJson<T>(path: string): Promise<T> {
  return (await (await request('GET', path)).json()) as T;
}

export async function postJson<T>(path: string, body: unknown): Promise<T | null> {
  const res = await request('POST', path, JSON.stringify(body));
  return res.status === 204 ? null : ((await res.json()) as T);
}

export const sandboxPath = (id: string, rest = '') => `/v1/sandboxes/${encodeURIComponent(id)}${rest}`;

/** A text stream's pieces between `separator`s; at the end, what is left if `rest` (else dropped). */
async function* pieces(body: NonNullable<Response['body']>, separator: string, rest: boolean): AsyncGenerator<string> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      if (rest) yield buffer;
      return;
    }
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf(separator)) !== -1) {
      yield buffer.slice(0, end);
      buffer = buffer.slice(end + separator.length);
    }
  }
}

/** Reads a text/event-stream until it ends or `signal` aborts; throws ApiProblem on a refusal. */
export async function readEvents(path: string, onEvent: (event: string, data: unknown) => void, signal: AbortSignal): Promise<void> {
  const res = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal });
  if (!res.ok || !res.body) throw await problem(res);
  for await (const block of pieces(res.body, '\n\n', false)) {
    let event = 'message';
    const data: string[] = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) event = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
    }
    if (data.length) onEvent(event, JSON.parse(data.join('\n')));
  }
}

export interface ExecEnd { exit_code: number; execution_count: number | null; state_lost: boolean }

/** Runs code in a sandbox, handing each output to `onOutput` as it streams in. */
export async function runExec(id: string, code: string, language: 'python' | 'bash', onOutput: (o: ExecOutput) => void): Promise<ExecEnd> {
  const res = await request('POST', sandboxPath(id, '/exec'), JSON.stringify({ code, language }));
  let end: ExecEnd = { exit_code: KILLED_EXIT_CODE, execution_count: null, state_lost: true };
  const line = (text: string) => {
    if (!text.trim()) return;
    const ev = JSON.parse(text) as { type: string; data: unknown; is_main_result?: boolean; execution_count?: number | null; state_lost?: boolean };
    if (ev.type === 'exit') end = { exit_code: ev.data as number, execution_count: ev.execution_count ?? null, state_lost: ev.state_lost ?? false };
    else onOutput({ type: ev.type, data: ev.data, is_main_result: ev.is_main_result } as ExecOutput);
  };
  for await (const text of pieces(res.body!, '\n', true)) line(text);
  return end;
}

/** Downloads a sandbox file through fetch (the key goes in a header) and saves it. */
export async function downloadFile(id: string, path: string): Promise<void> {
  const res = await request('GET', sandboxPath(id, `/files?path=${encodeURIComponent(path)}`));
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = path.split('/').pop() || 'download';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
