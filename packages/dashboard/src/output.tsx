/**
 * Renders an exec's outputs: streamed text, rich results (PNG and SVG as images, HTML such as a
 * DataFrame's table in a sandboxed frame that can run no script) and errors with their traceback.
 */
import { useRef } from 'preact/hooks';
import { stripAnsi } from './format.js';
import type { ExecOutput } from './types.js';

const FRAME_STYLE = '<style>body{font:13px system-ui,sans-serif;margin:8px}table{border-collapse:collapse}th,td{padding:2px 8px;border:1px solid #ddd;text-align:right}thead th{background:#f1f3f5}</style>';

function HtmlResult({ html }: { html: string }) {
  const frame = useRef<HTMLIFrameElement>(null);
  // Same origin (so its height can be read) but no scripts, forms or navigation of this page.
  const fit = () => {
    const body = frame.current?.contentDocument?.body;
    if (body && frame.current) frame.current.style.height = `${Math.min(600, Math.ceil(body.getBoundingClientRect().height) + 20)}px`;
  };
  return <iframe ref={frame} class="html-result" sandbox="allow-same-origin" srcdoc={FRAME_STYLE + html} onLoad={fit} title="HTML result" />;
}

export function Result({ data }: { data: Record<string, unknown> }) {
  const png = data['image/png'];
  if (typeof png === 'string') return <img class="png-result" alt="PNG result" src={`data:image/png;base64,${png.replace(/\s/g, '')}`} />;
  const jpeg = data['image/jpeg'];
  if (typeof jpeg === 'string') return <img class="png-result" alt="JPEG result" src={`data:image/jpeg;base64,${jpeg.replace(/\s/g, '')}`} />;
  const svg = data['image/svg+xml'];
  if (typeof svg === 'string') return <img class="svg-result" alt="SVG result" src={`data:image/svg+xml;charset=utf-8,${encodeURIComponent(svg)}`} />;
  const html = data['text/html'];
  if (typeof html === 'string') return <HtmlResult html={html} />;
  const json = data['application/json'];
  if (json !== undefined) return <pre class="result">{JSON.stringify(json, null, 2)}</pre>;
  return <pre class="result">{String(data['text/plain'] ?? '')}</pre>;
}

export function Outputs({ outputs }: { outputs: ExecOutput[] }) {
  // The agent prints an uncaught exception's traceback on stderr too: show it once, in the error.
  const tracebacks = outputs.flatMap((o) => (o.type === 'error' && o.data.traceback ? [o.data.traceback] : []));
  return (
    <div class="outputs">
      {outputs.map((o, i) => {
        switch (o.type) {
          case 'stdout':
            return <pre key={i} class="stdout">{o.data}</pre>;
          case 'stderr': {
            const text = tracebacks.reduce((t, tb) => t.replace(tb, ''), o.data);
            return text.trim() ? <pre key={i} class="stderr">{text}</pre> : null;
          }
          case 'result':
            return <Result key={i} data={o.data} />;
          case 'error':
            return (
              <div key={i} class="error-output">
                <div class="error-title">{o.data.name}: {o.data.value}</div>
                {o.data.traceback && <pre class="traceback">{stripAnsi(o.data.traceback)}</pre>}
              </div>
            );
        }
      })}
    </div>
  );
}

/** Appends an output, joining it to the previous one when both are the same text stream. */
export function appendOutput(outputs: ExecOutput[], o: ExecOutput): ExecOutput[] {
  const last = outputs[outputs.length - 1];
  if ((o.type === 'stdout' || o.type === 'stderr') && last && last.type === o.type) {
    return [...outputs.slice(0, -1), { type: o.type, data: last.data + o.data }];
  }
  return [...outputs, o];
}
