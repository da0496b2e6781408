/**
 * Renders an exec's outputs: streamed text, rich results (PNG and SVG as images, HTML such as a
 * DataFrame's table in a sandboxed frame that can run no script) and errors with their traceback.
 */
import { useRef } from 'preact/hooks';
import { stripAnsi } from './format.js';
import type { ExecOutput } from './types.js';

function HtmlResult({ html }: { html: string }) {
  const frame = useRef<HTMLIFrameElement>(null);
  // Same origin (so its height can be read) but no scripts, forms or navigation of this page.
  const fit = () => {
    const doc = frame.current?.contentDocument;
    if (doc && frame.current) frame.current.style.height = `${Math.min(600, doc.documentElement.scrollHeight + 4)}px`;
  };
  return <iframe ref={frame} class="html-result" sandbox="allow-same-origin" srcdoc={html} onLoad={fit} title="HTML result" />;
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
  return (
    <div class="outputs">
      {outputs.map((o, i) => {
        switch (o.type) {
          case 'stdout':
          case 'stderr':
            return <pre key={i} class={o.type}>{o.data}</pre>;
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
