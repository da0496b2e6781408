/**
 * Exposed ports and terminals (#25):
 *   ports  HTTP GET of a small page in a sandbox through the exposed-port proxy (signed URL,
 *          keep-alive client) vs the same GET made directly from the host into the sandbox's network
 *          namespace (a socket dialled there, as the proxy's own upstream is), paired in one loop.
 *   pty    keystroke echo round trip: one character typed into bash on a PTY (WebSocket) until its
 *          echo comes back.
 */
import http from 'node:http';
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Client } from 'podflare';
import { Sandbox } from 'podflare';
import type { RunningServer } from '@podflare/server';
import { detail, Failures, failLimit, notes, rows, timingRow } from './report.js';
import { summarize } from './stats.js';

export const PORT_MEASURES = ['ports', 'pty'] as const;

interface Opts { n: number; warmup: number }

function get(agent: http.Agent | undefined, url: string, createConnection?: () => net.Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request({ hostname: u.hostname, port: u.port, path: u.pathname + u.search, agent, createConnection, setHost: true }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`status ${res.statusCode}: ${body.slice(0, 200)}`))));
    });
    req.on('error', reject);
    req.end();
  });
}

export async function measurePorts(server: RunningServer, client: Client, opts: Opts): Promise<void> {
  const sbx = await Sandbox.create({ client, egress: false });
  const failures = new Failures('ports', failLimit(opts.n));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await sbx.files.upload('/root/site/index.html', 'hello from the sandbox\n');
    await sbx.commands.run('exec python3 -m http.server 8000 --bind 127.0.0.1', { background: true, cwd: '/root/site' });
    const url = `http://${await sbx.getHost(8000)}/`;
    for (let i = 0; i < 100; i++) {
      try { await get(agent, url); break; } catch { await new Promise((r) => setTimeout(r, 100)); }
    }
    const live = await server.manager.get(sbx.id);
    const connectPort = live.rt.connectPort!.bind(live.rt);
    const proxied: number[] = [];
    const direct: number[] = [];
    for (let i = 0; i < opts.warmup + opts.n; i++) {
      const t0 = performance.now();
      const a = await failures.attempt('proxied GET', () => get(agent, url));
      const t1 = performance.now();
      // Direct: a connection dialled inside the sandbox's network namespace, one per request.
      const socket = await failures.attempt('connect', () => connectPort(8000));
      const t2 = performance.now();
      const b = socket ? await failures.attempt('direct GET', () => get(undefined, 'http://localhost:8000/', () => socket)) : undefined;
      const t3 = performance.now();
      if (i < opts.warmup || !a || !b) continue;
      proxied.push(t1 - t0);
      direct.push(t3 - t2);
    }
    const p = summarize(proxied);
    const d = summarize(direct);
    rows.push(timingRow('exposed port GET (signed URL, proxied)', p, '– (no target)', '–', failures.report('–')));
    rows.push(timingRow('  direct GET from the host into the sandbox', d, '(paired)', '–', '–'));
    notes.push(`ports: overhead of the proxy p50 ${(p.p50 - d.p50).toFixed(2)} ms, p99 ${(p.p99 - d.p99).toFixed(2)} ms ` +
      `(python3 -m http.server, egress off; direct = a socket dialled in the sandbox's netns, as the proxy's upstream, ` +
      `timed from when it is connected); ${detail('proxied', p)}; ${detail('direct', d)}`);
  } finally {
    agent.destroy();
    await sbx.close();
  }
}

export async function measurePtyEcho(client: Client, opts: Opts): Promise<void> {
  const sbx = await Sandbox.create({ client });
  const failures = new Failures('pty', failLimit(opts.n));
  let out = '';
  let waiter: (() => void) | null = null;
  const term = await sbx.pty.create({ onData: (d) => { out += d; waiter?.(); } });
  try {
    const until = (check: () => boolean, ms = 20_000) => new Promise<void>((resolve, reject) => {
      if (check()) return resolve();
      const timer = setTimeout(() => { waiter = null; reject(new Error('no echo in time')); }, ms);
      waiter = () => { if (check()) { clearTimeout(timer); waiter = null; resolve(); } };
    });
    await until(() => /# (\x1b\[[0-9;?]*[a-zA-Z])*$/.test(out) || out.endsWith('# '));
    const samples: number[] = [];
    for (let i = 0; i < opts.warmup + opts.n; i++) {
      if (i % 50 === 0) term.sendInput('\x15'); // Ctrl-U: keep the line short
      const before = out.length;
      const t0 = performance.now();
      term.sendInput('x');
      const ok = await failures.attempt('echo', () => until(() => out.length > before && out.slice(before).includes('x')).then(() => true));
      const t1 = performance.now();
      if (ok && i >= opts.warmup) samples.push(t1 - t0);
    }
    const s = summarize(samples);
    rows.push(timingRow('PTY keystroke echo round trip', s, '– (no target)', '–', failures.report('–')));
    notes.push(`pty: one character typed into bash (readline) over the WebSocket until its echo arrives; ${detail('pty echo', s)}`);
  } finally {
    term.kill();
    await sbx.close();
  }
}
