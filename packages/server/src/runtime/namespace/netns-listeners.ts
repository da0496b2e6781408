/**
 * Opens the egress proxy's listening sockets inside a sandbox's network namespace and returns them
 * to this process. Node cannot enter a namespace itself, so a short-lived Node child does it
 * (nsenter, then netns-listen-child.js) and passes the sockets back over its IPC channel; a socket
 * belongs to the namespace it was created in, wherever its file descriptor travels.
 */
import { spawn } from 'node:child_process';
import type dgram from 'node:dgram';
import { fileURLToPath } from 'node:url';
import type net from 'node:net';

export interface EgressListeners {
  http: net.Server;
  socks: net.Server;
  dns: dgram.Socket;
  transparentHttp: net.Server;
  transparentTls: net.Server;
}

const TCP_LISTENERS = ['http', 'socks', 'transparentHttp', 'transparentTls'] as const;

const CHILD = fileURLToPath(new URL('./netns-listen-child.js', import.meta.url));

export function openEgressListeners(sandboxPid: number, timeoutMs: number): Promise<EgressListeners> {
  const child = spawn('nsenter', [`--net=/proc/${sandboxPid}/ns/net`, '--', process.execPath, CHILD], {
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-2000); });
  const got: Partial<EgressListeners> = {};
  const closeAll = () => closeEgressListeners(got);
  return new Promise<EgressListeners>((resolve, reject) => {
    let settled = false;
    const fail = (err: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      closeAll();
      if (child.exitCode === null) child.kill('SIGKILL');
      reject(err);
    };
    const timer = setTimeout(() => fail(new Error('the egress listeners did not open in time')), timeoutMs);
    child.on('message', (msg: unknown, handle: unknown) => {
      if (typeof msg === 'object' && msg && 'error' in msg) return fail(new Error(`cannot open the egress listeners: ${String((msg as { error: unknown }).error)}`));
      if ((TCP_LISTENERS as readonly unknown[]).includes(msg)) got[msg as (typeof TCP_LISTENERS)[number]] = handle as net.Server;
      else if (msg === 'dns') got.dns = handle as dgram.Socket;
      if (TCP_LISTENERS.every((k) => got[k]) && got.dns && !settled) {
        settled = true;
        clearTimeout(timer);
        child.disconnect();
        resolve(got as EgressListeners);
      }
    });
    child.once('error', (err) => fail(new Error(`cannot start nsenter: ${err.message}`)));
    child.once('exit', (code) => fail(new Error(`the egress listener helper exited (${code}): ${stderr.trim()}`)));
  });
}

export function closeEgressListeners(l: Partial<EgressListeners>): void {
  for (const k of TCP_LISTENERS) l[k]?.close();
  try { l.dns?.close(); } catch { /* already closed */ }
}
