// Bundles the dashboard into dist/: app.js (preact and our code, minified), index.html and
// style.css copied as they are. The server serves these files; nothing is fetched from a CDN.
import { build } from 'esbuild';
import { copyFile, mkdir, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(root, 'dist');
await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [path.join(root, 'src/main.tsx')],
  outfile: path.join(dist, 'app.js'),
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  sourcemap: 'linked',
  jsx: 'automatic',
  jsxImportSource: 'preact',
  logLevel: 'warning',
  legalComments: 'eof',
});
for (const file of ['index.html', 'style.css']) await copyFile(path.join(root, 'src', file), path.join(dist, file));
// xterm.js's own stylesheet, served beside ours (the terminal pane needs it).
const require = createRequire(import.meta.url);
await copyFile(path.join(path.dirname(require.resolve('@xterm/xterm/package.json')), 'css/xterm.css'), path.join(dist, 'xterm.css'));
