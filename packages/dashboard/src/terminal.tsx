/**
 * A terminal in a sandbox: xterm.js (bundled, nothing from a CDN) on the server's PTY WebSocket
 * (`/v1/sandboxes/:id/pty`, a `bash -l` that ends when the pane closes). A browser's WebSocket
 * cannot send the `Authorization` header, so the key goes as a subprotocol
 * (`podflare.key.<base64url>`; the server answers `podflare.pty`, never echoing the key).
 * The terminal follows its pane's size: every fit is sent as a resize (the shell sees SIGWINCH).
 */
import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { getKey, sandboxPath } from './api.js';

/** The subprotocols that carry the key (base64url: any key fits a protocol token). */
function protocols(): string[] {
  const key = getKey();
  if (!key) return ['podflare.pty'];
  const b64 = btoa(String.fromCharCode(...new TextEncoder().encode(key))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return ['podflare.pty', `podflare.key.${b64}`];
}

export function TerminalPanel({ id }: { id: string }) {
  const [open, setOpen] = useState(false);
  return (
    <div class="terminal-panel">
      <h3>Terminal</h3>
      {open
        ? <><TerminalPane id={id} /><button type="button" data-testid="terminal-close" onClick={() => setOpen(false)}>Close terminal</button></>
        : <button type="button" data-testid="terminal-open" onClick={() => setOpen(true)}>Open terminal</button>}
    </div>
  );
}

function TerminalPane({ id }: { id: string }) {
  const host = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState('connecting…');
  const [size, setSize] = useState<{ cols: number; rows: number } | null>(null);

  useEffect(() => {
    const el = host.current;
    if (!el) return;
    const term = new Terminal({ fontSize: 13, convertEol: false, scrollback: 5000, cursorBlink: true });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(el);
    fit.fit();
    setSize({ cols: term.cols, rows: term.rows });
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}${sandboxPath(id, '/pty')}?cols=${term.cols}&rows=${term.rows}`, protocols());
    const send = (msg: object) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg)); };
    ws.onopen = () => setStatus('connected');
    ws.onmessage = (e) => {
      const msg = JSON.parse(String(e.data)) as { type: string; data?: string; code?: number };
      if (msg.type === 'output' && typeof msg.data === 'string') term.write(msg.data);
      else if (msg.type === 'exit') setStatus(`exited (${msg.code ?? '?'})`);
    };
    ws.onclose = () => setStatus((s) => (s.startsWith('exited') ? s : 'disconnected'));
    ws.onerror = () => setStatus('connection failed');
    const input = term.onData((data) => send({ type: 'input', data }));
    const resized = term.onResize(({ cols, rows }) => {
      setSize({ cols, rows });
      send({ type: 'resize', cols, rows });
    });
    // The pane follows the page's width (and a person dragging the window).
    const observer = new ResizeObserver(() => fit.fit());
    observer.observe(el);
    term.focus();
    return () => {
      observer.disconnect();
      input.dispose();
      resized.dispose();
      ws.close();
      term.dispose();
    };
  }, [id]);

  return <>
    <div class="terminal" ref={host} data-testid="terminal" data-cols={size?.cols} data-rows={size?.rows} />
    <div class="status" data-testid="terminal-status">{status}{size ? ` · ${size.cols}×${size.rows}` : ''}</div>
  </>;
}
