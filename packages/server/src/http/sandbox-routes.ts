/** Sandbox lifecycle and exec endpoints (docs/api.md). */
import type { ServerResponse } from 'node:http';
import {
  CreateSandboxBody, ExecBody, KILLED_EXIT_CODE, SANDBOX_ID_PATTERN, SANDBOX_STATES, isSandboxState, type ExecEvent, type ExecStreamMessage,
} from '@podflare/protocol';
import { ApiError } from './api-error.js';
import type { ExecOutputMessage } from '../agent-channel.js';
import type { SandboxManager } from '../sandbox-manager.js';
import { readBody, sendEmpty, sendJson } from './body.js';
import { noteSandbox } from './observe.js';
import { flagParam } from './params.js';
import type { RequestContext, Router } from './router.js';
import { drainedOrClosed } from './drain.js';


export function sandboxId(ctx: RequestContext, param = 'id'): string {
  const id = ctx.params[param] ?? '';
  if (!SANDBOX_ID_PATTERN.test(id)) throw new ApiError('bad_request', `"${id}" is not a sandbox id (sbx_ followed by 32 hex digits)`, param);
  return id;
}

export function addSandboxRoutes(router: Router, manager: SandboxManager): void {
  router.add('POST', '/v1/sandboxes', async (ctx) => {
    const body = await readBody(ctx.req, CreateSandboxBody);
    const { record, poolMiss } = await manager.create({ ...body, owner: ctx.owner });
    noteSandbox(ctx.res, record.id);
    // `pool`: ours, so a client can tell a warm create from a cold one and why (the hosted shape is id + state).
    sendJson(ctx.res, 201, { id: record.id, state: 'ready', pool: poolMiss ? { hit: false, miss_reason: poolMiss } : { hit: true } });
  });

  router.add('GET', '/v1/sandboxes', async (ctx) => {
    const ancestor = ctx.query.get('ancestor') ?? undefined;
    if (ancestor !== undefined && !SANDBOX_ID_PATTERN.test(ancestor)) throw new ApiError('bad_request', 'ancestor: not a sandbox id', 'ancestor');
    const state = ctx.query.get('state') ?? undefined;
    if (state !== undefined && !isSandboxState(state)) throw new ApiError('bad_request', `state: must be one of ${SANDBOX_STATES.join(', ')}`, 'state');
    const all = flagParam(ctx.query, 'all');
    const sandboxes = await manager.list({ ancestor, state, all }, ctx.owner || undefined);
    sendJson(ctx.res, 200, { sandboxes });
  });

  router.add('GET', '/v1/sandboxes/:id', async (ctx) => {
    sendJson(ctx.res, 200, await manager.info(sandboxId(ctx), ctx.owner || undefined));
  });

  router.add('DELETE', '/v1/sandboxes/:id', async (ctx) => {
    await manager.destroy(sandboxId(ctx), ctx.owner || undefined);
    sendEmpty(ctx.res);
  });

  router.add('POST', '/v1/sandboxes/:id/exec', async (ctx) => {
    const id = sandboxId(ctx);
    const body = await readBody(ctx.req, ExecBody);
    const sandbox = await manager.get(id, ctx.owner || undefined);
    const stream = new EventStream(ctx.res);
    // A caller that hangs up does not leave its code running: interrupt it.
    let finished = false;
    ctx.res.on('close', () => { if (!finished) void manager.interrupt(sandbox).catch(() => undefined); });
    try {
      const exit = await manager.exec(sandbox, {
        op: 'exec', language: body.language ?? 'python', code: body.code,
        timeout_ms: body.timeout_ms, env: body.env, cwd: body.cwd,
      }, (msg) => stream.output(msg), { atomic: body.atomic });
      stream.exit(exit);
    } catch (err) {
      // Refused before any output (the agent's 4xx, a protocol violation, a sandbox gone): a JSON
      // error answer, not a bare exit 137 that hides why.
      if (!stream.started) {
        finished = true;
        throw err;
      }
      // The sandbox died mid-call: say so in the stream, which has already begun.
      stream.emit({ type: 'error', data: { name: 'SandboxError', value: (err as Error).message, traceback: '' } });
      stream.emit({ type: 'exit', data: KILLED_EXIT_CODE, execution_count: null, state_lost: true });
    } finally {
      finished = true;
      if (stream.started) stream.end();
    }
  });

  router.add('GET', '/v1/sandboxes/:id/events', async (ctx) => {
    const sandbox = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    const afterText = ctx.query.get('after');
    if (afterText !== null && !/^(-1|\d{1,15})$/.test(afterText)) throw new ApiError('bad_request', 'after: must be an event sequence number', 'after');
    sendJson(ctx.res, 200, { events: manager.events(sandbox, afterText === null ? undefined : Number(afterText)) });
  });

  router.add('POST', '/v1/sandboxes/:id/interrupt', async (ctx) => {
    const sandbox = await manager.get(sandboxId(ctx), ctx.owner || undefined);
    sendJson(ctx.res, 200, { interrupted: await manager.interrupt(sandbox) });
  });
}

type EventBody = ExecEvent extends infer E ? (E extends ExecEvent ? Omit<E, 'seq' | 'ts'> : never) : never;

/**
 * Writes exec events as NDJSON, numbering and timestamping them, headers sent on the first. When
 * the client does not keep up (its socket's buffer is full), `agentMessage` returns a promise that
 * settles once it has drained or gone: the agent channel holds until then, so the server keeps at
 * most one message (≤ 4 MiB, the channel's line cap) beyond the socket's high-water mark per exec.
 */
class EventStream {
  private seq = 0;
  started = false;

  constructor(private readonly res: ServerResponse) {}

  /** One output message of the exec (its exit comes once, through {@link exit}). */
  output(msg: ExecOutputMessage): Promise<void> | undefined {
    switch (msg.type) {
      case 'stdout':
      case 'stderr':
        return this.emit({ type: msg.type, data: msg.data });
      case 'result':
        return this.emit({ type: 'result', data: msg.data, is_main_result: msg.is_main_result });
      case 'error':
        return this.emit({ type: 'error', data: msg.data });
    }
  }

  /** The exec's exit: the last event of the stream. */
  exit(msg: Extract<ExecStreamMessage, { type: 'exit' }>): void {
    void this.emit({
      type: 'exit', data: msg.code, execution_count: msg.execution_count ?? null, state_lost: msg.state_lost ?? false,
      ...(msg.rolled_back ? { rolled_back: true } : {}),
    });
  }

  /** Writes one event; a promise when the client's buffer is full (settles when it drained or left). */
  emit(event: EventBody): Promise<void> | undefined {
    if (!this.started) {
      this.started = true;
      this.res.writeHead(200, { 'Content-Type': 'application/x-ndjson', 'Cache-Control': 'no-store', 'X-Accel-Buffering': 'no' });
    }
    if (this.res.writableEnded || this.res.destroyed) return;
    if (this.res.write(JSON.stringify({ ...event, seq: this.seq++, ts: Date.now() }) + '\n')) return;
    return drainedOrClosed(this.res);
  }

  end(): void {
    if (!this.started) this.emit({ type: 'exit', data: KILLED_EXIT_CODE, execution_count: null, state_lost: true });
    if (!this.res.writableEnded) this.res.end();
  }
}
