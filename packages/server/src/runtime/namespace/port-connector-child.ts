/**
 * Runs on the host inside one sandbox's network namespace only (started through nsenter by
 * port-connector.ts): on each request `{n, port}` it connects to 127.0.0.1:port — the sandbox's own
 * loopback, the only address it ever dials — and hands the connected socket to the server over the
 * IPC channel. It exits when the server goes (the IPC channel closes).
 */
import { execFileSync } from 'node:child_process';
import net from 'node:net';

// A sandbox without egress has only `lo`: make sure it is up so its servers can be reached.
try {
  execFileSync('ip', ['link', 'set', 'lo', 'up'], { stdio: 'ignore' });
} catch { /* already up, or no ip: connecting says what is wrong */ }

process.on('disconnect', () => process.exit(0));
process.on('message', (msg: unknown) => {
  const { n, port } = (msg ?? {}) as { n?: unknown; port?: unknown };
  if (typeof n !== 'number' || typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) return;
  const socket = net.connect({ host: '127.0.0.1', port });
  socket.once('connect', () => {
    socket.pause();
    // The fd travels to the server; this process's copy is closed once it is sent.
    process.send!({ n }, socket, {}, () => socket.destroy());
  });
  socket.once('error', (err: NodeJS.ErrnoException) => {
    process.send!({ n, error: err.code ?? err.message });
  });
});
process.send!({ ready: true });
