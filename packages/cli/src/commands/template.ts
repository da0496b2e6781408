/** `podflare template build|ls|save|rm`: named images (templates) sandboxes start from. */
import path from 'node:path';
import {
  BUILTIN_TEMPLATES, buildTemplate, builtinRuntimes, ensureImage, inspectImages, loadConfig, loadRecipeFile, TemplateCatalog, templateRuntimeNames, type TemplateRecipe,
} from '@podflare/server';
import { SANDBOX_ID_PATTERN, Sandbox } from 'podflare';
import { EXIT_OK, formatMs, parse, UsageError, type Command } from '../args.js';
import { imageProgress } from '../image-progress.js';

const HELP = `Usage: podflare template build <recipe.json | ${Object.keys(BUILTIN_TEMPLATES).join(' | ')}> [options]
       podflare template ls [options]
       podflare template save <sandbox-id> <name> [--description TEXT] [--host URL]
       podflare template rm <name> [--host URL]

build   Builds a template: a layer over the default image made from a recipe (Debian packages,
        pip requirements, files, a setup script), with progress. Instant when it is built
        already. A user template is registered under its name; a running server finds it on the
        next create (template="<name>"). Needs root. The recipe format is in docs/templates.md:
          {"name": "scraper", "apt": ["python3-bs4"], "pip": ["mylib"], "pip_find_links": "wheels",
           "files": [{"src": "conf.toml", "dest": "/etc/conf.toml"}], "setup": "echo ready"}
ls      Lists the templates: name, built or not, size, runtimes.
save    Asks the server to make a template of a live sandbox's files (and, while the server runs,
        its interpreter's state): POST /v1/sandboxes/:id/template. Namespace runtime only.
rm      Asks the server to delete a template made from a sandbox (refused while sandboxes started
        from it live).

Options:
  --images-dir DIR   where images live (default: $PODFLARE_IMAGES_DIR, else <state dir>/images)
  --state-dir DIR    the server's state directory (default: $PODFLARE_STATE_DIR, else /var/lib/podflare)
  --agent-dir DIR    the agent's Python files (default: the repo's agent/ folder)
  --json             ls: the list as JSON (as GET /v1/templates has it)
  --host URL         save, rm: the server (default: $PODFLARE_HOST, else http://127.0.0.1:7070)
  --description TEXT save: the template's description
  -q, --quiet        build: print nothing when the template is already built
  -h, --help         show this help
`;

const OPTIONS = {
  'images-dir': { type: 'string' },
  'state-dir': { type: 'string' },
  'agent-dir': { type: 'string' },
  json: { type: 'boolean' },
  quiet: { type: 'boolean', short: 'q' },
  host: { type: 'string' },
  description: { type: 'string' },
} as const;

function size(bytes: number | null): string {
  if (bytes === null) return '-';
  return bytes < 1024 * 1024 ? `${Math.ceil(bytes / 1024)} KiB` : `${(bytes / 1024 / 1024).toFixed(0)} MiB`;
}

export const templateCommand: Command = {
  name: 'template',
  summary: 'build or list templates (named images)',
  help: HELP,
  async run(argv) {
    const { values, positionals } = parse('template', argv, OPTIONS, true);
    const [sub, ...rest] = positionals;
    const config = loadConfig({
      stateDir: values['state-dir'] ? path.resolve(values['state-dir']) : undefined,
      imagesDir: values['images-dir'] ? path.resolve(values['images-dir']) : undefined,
      agentDir: values['agent-dir'] ? path.resolve(values['agent-dir']) : undefined,
    });
    if (sub === 'build') {
      if (rest.length !== 1) throw new UsageError('template build takes one recipe file (or a built-in name)', 'template');
      const arg = rest[0]!;
      const recipe: TemplateRecipe = BUILTIN_TEMPLATES[arg] ?? (await loadRecipeFile(path.resolve(arg)));
      const reporter = imageProgress({ quiet: true });
      const started = Date.now();
      try {
        const image = await ensureImage({ imagesDir: config.imagesDir, agentDir: config.agentDir, onProgress: reporter.onProgress, log: reporter.log });
        const record = await buildTemplate(recipe, {
          imagesDir: config.imagesDir, base: { rootfs: image.base, hash: image.baseHash }, onProgress: reporter.onProgress, log: reporter.log,
        });
        reporter.finish();
        if (values.quiet && !reporter.worked) return EXIT_OK;
        const took = formatMs(Date.now() - started);
        process.stdout.write(`template ${record.name} ready (${took}, ${size(record.sizeBytes ?? null)} over the default image)\n  layer: ${record.layers[0]}\n`);
        return EXIT_OK;
      } finally {
        reporter.finish();
      }
    }
    if (sub === 'save') {
      const [id, name, extra] = rest;
      if (!id || !name || extra !== undefined) throw new UsageError('template save takes a sandbox id and a template name', 'template');
      if (!SANDBOX_ID_PATTERN.test(id)) throw new UsageError(`not a sandbox id: ${id} (expected sbx_ and 32 hex digits)`, 'template');
      const sbx = await Sandbox.connect(id, { host: values.host });
      const saved = await sbx.saveTemplate(name, values.description === undefined ? {} : { description: values.description });
      process.stdout.write(`template ${saved.name} made from ${saved.fromSandbox} (${size(saved.sizeBytes)} of files` +
        `${saved.carries.interpreter ? ', and its interpreter\'s state' : ''})\n`);
      return EXIT_OK;
    }
    if (sub === 'rm') {
      if (rest.length !== 1) throw new UsageError('template rm takes one template name', 'template');
      await Sandbox.deleteTemplate(rest[0]!, { host: values.host });
      process.stdout.write(`template ${rest[0]} deleted\n`);
      return EXIT_OK;
    }
    if (sub === 'ls') {
      if (rest.length) throw new UsageError(`unexpected argument: ${rest[0]}`, 'template');
      const images = await inspectImages(config.imagesDir);
      if (!images.current) {
        process.stderr.write(`the default image is not built in ${config.imagesDir}: run \`podflare image build\`\n`);
        return 1;
      }
      const catalog = new TemplateCatalog({
        imagesDir: config.imagesDir, base: { rootfs: images.currentBase, hash: images.recipeHash }, runtimes: builtinRuntimes().names(), templateRuntimes: templateRuntimeNames(builtinRuntimes()), log: () => undefined,
      });
      const list = await catalog.list();
      if (values.json) {
        process.stdout.write(JSON.stringify({ templates: list }, null, 2) + '\n');
        return EXIT_OK;
      }
      const rows = [['NAME', 'KIND', 'BUILT', 'SIZE', 'RUNTIMES', 'DESCRIPTION'], ...list.map((t) => [
        t.name, t.kind, t.built ? 'yes' : 'no', size(t.size_bytes), t.runtimes.join(','), t.description ?? '',
      ])];
      const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
      for (const r of rows) process.stdout.write(r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ') + '\n');
      return EXIT_OK;
    }
    throw new UsageError(sub ? `unknown template subcommand: ${sub} (build, ls, save or rm)` : 'missing subcommand: build, ls, save or rm', 'template');
  },
};
