/**
 * Templates: named images a sandbox starts from. `default` is the base image itself (recipe.ts);
 * every other template is a layer over it, made from a small recipe: Debian packages, pip
 * requirements (from a local wheel directory and/or an index the host can reach), files to copy
 * and a setup script. Built-in recipes (`python-datasci`) live here; user recipes come from a JSON
 * file (`podflare template build recipe.json`):
 *
 *   {
 *     "name": "scraper",                       // [a-z][a-z0-9-]*, at most 40 characters
 *     "description": "requests + bs4",         // optional
 *     "apt": ["python3-bs4"],                  // Debian packages (no Recommends)
 *     "pip": ["tinylib==0.1"],                 // requirements (names and version specifiers)
 *     "pip_find_links": "wheels",              // a local wheel directory (relative to the recipe)
 *     "pip_index_url": "https://…/simple",     // only where the host reaches one; else --no-index
 *     "files": [{ "src": "conf/app.toml", "dest": "/etc/app.toml" }],
 *     "setup": "python3 -c 'import bs4'"       // bash, run as root in the image, after the rest
 *   }
 *
 * A layer's directory name is a hash of the recipe, of every input's content (wheels, files) and
 * of the base it is built over, so editing anything builds a new layer next to the old one.
 */
import { createHash } from 'node:crypto';
import { readFile, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { canonicalJson } from './recipe.js';

/** A template's name: lower-case, safe in a file name, a URL and a Prometheus label. */
export const TEMPLATE_NAME_PATTERN = /^[a-z][a-z0-9-]{0,39}$/;

export const DEFAULT_TEMPLATE_NAME = 'default';

/** Bump when the layer builder (template-build.ts) changes in a way the recipe does not capture. */
export const TEMPLATE_BUILDER_VERSION = 2;

/** A recipe that cannot be built as written (a bad field, a missing file): the user's to fix. */
export class RecipeError extends Error {
  override readonly name = 'RecipeError';
}

export interface TemplateFile {
  /** Absolute path on the host (a file or a directory). */
  src: string;
  /** Absolute path in the image. */
  dest: string;
}

export interface TemplateRecipe {
  name: string;
  description?: string;
  /** Debian packages installed over the default image. */
  apt: string[];
  /** pip requirements. */
  pip: string[];
  /** Absolute path of a local wheel directory (`pip install --find-links`). */
  pipFindLinks?: string;
  /** A package index the host can reach; without it pip runs with `--no-index`. */
  pipIndexUrl?: string;
  files: TemplateFile[];
  /** A bash script run as root inside the image once packages and files are in place. */
  setup?: string;
}

/** Debian policy: lower case, digits, + - . (an optional `=version` or `/release` suffix). */
const APT_PACKAGE = /^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+|\/[a-z-]+)?$/;
/** A requirement line without options: a name, extras, version specifiers, markers. */
const PIP_REQUIREMENT = /^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._ -]+\])?\s*([<>=!~]=?[^\s;,]+\s*,?\s*)*(;[^\n]*)?$/;
/** Where a template may not put files: the runtime's own paths and the kernel's. */
const FORBIDDEN_DESTS = ['/.pf', '/opt/podflare', '/proc', '/sys', '/dev'];

/**
 * The scientific stack (the hosted quick start's first line is `template="python-datasci"`).
 * scipy depends on pythran, which brings a C++ compiler: that is Debian's packaging, and why this
 * is a template of its own rather than part of `default`.
 */
export const BUILTIN_TEMPLATES: Readonly<Record<string, TemplateRecipe>> = {
  'python-datasci': {
    name: 'python-datasci',
    description: 'default + scipy, scikit-learn, seaborn, statsmodels, sympy, openpyxl (Debian packages)',
    apt: ['python3-scipy', 'python3-sklearn', 'python3-seaborn', 'python3-statsmodels', 'python3-sympy', 'python3-openpyxl'],
    pip: [],
    files: [],
    setup: [
      // The libraries' own test suites (tens of MB); nothing imports them.
      'cd /usr/lib/python3/dist-packages',
      'find scipy sklearn statsmodels sympy seaborn -depth -type d -name tests -exec rm -rf {} +',
      // Boost's headers (160 MB) come with pythran, a compiler of Python to C++ that scipy's
      // installed modules never call. (The C/C++ compilers and Python's headers stay: pip can
      // still build an extension from source here.)
      'rm -rf /usr/include/boost',
      // A smoke test: a stack that installed but cannot import fails the build, not every sandbox.
      'python3 -c "import scipy, sklearn, seaborn, statsmodels, sympy, openpyxl; print(\'datasci ok\', scipy.__version__, sklearn.__version__)"',
    ].join('\n'),
  },
};

const KNOWN_KEYS = new Set(['name', 'description', 'apt', 'pip', 'pip_find_links', 'pip_index_url', 'files', 'setup']);

/** Reads and checks a recipe file; relative paths in it are relative to the file's directory. */
export async function loadRecipeFile(file: string): Promise<TemplateRecipe> {
  let raw: unknown;
  try {
    raw = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    throw new RecipeError(`cannot read the recipe ${file}: ${(err as Error).message}`);
  }
  return parseRecipe(raw, path.dirname(path.resolve(file)));
}

/** Checks a recipe given as JSON data (the file format above). */
export async function parseRecipe(raw: unknown, baseDir: string): Promise<TemplateRecipe> {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw new RecipeError('a recipe is a JSON object');
  const r = raw as Record<string, unknown>;
  const unknown = Object.keys(r).filter((k) => !KNOWN_KEYS.has(k));
  if (unknown.length) {
    throw new RecipeError(`unknown recipe field${unknown.length > 1 ? 's' : ''}: ${unknown.join(', ')} (known: ${[...KNOWN_KEYS].join(', ')})`);
  }
  const name = r.name;
  if (typeof name !== 'string' || !TEMPLATE_NAME_PATTERN.test(name)) {
    throw new RecipeError(`"name" must match ${TEMPLATE_NAME_PATTERN.source} (lower case, digits, dashes), got ${JSON.stringify(name)}`);
  }
  if (name === DEFAULT_TEMPLATE_NAME || name in BUILTIN_TEMPLATES) throw new RecipeError(`"${name}" is a built-in template; choose another name`);
  const strings = (key: string, pattern: RegExp, what: string): string[] => {
    const v = r[key] ?? [];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) throw new RecipeError(`"${key}" must be a list of strings`);
    for (const x of v as string[]) if (!pattern.test(x.trim())) throw new RecipeError(`"${key}": ${JSON.stringify(x)} is not ${what}`);
    return (v as string[]).map((x) => x.trim());
  };
  const recipe: TemplateRecipe = {
    name,
    apt: strings('apt', APT_PACKAGE, 'a Debian package name'),
    pip: strings('pip', PIP_REQUIREMENT, 'a pip requirement (name and version specifiers, no options)'),
    files: [],
  };
  if (r.description !== undefined) {
    if (typeof r.description !== 'string') throw new RecipeError('"description" must be a string');
    recipe.description = r.description;
  }
  if (r.pip_find_links !== undefined) {
    if (typeof r.pip_find_links !== 'string') throw new RecipeError('"pip_find_links" must be a directory path');
    recipe.pipFindLinks = path.resolve(baseDir, r.pip_find_links);
    if (!(await isDirectory(recipe.pipFindLinks))) throw new RecipeError(`"pip_find_links": ${recipe.pipFindLinks} is not a directory`);
  }
  if (r.pip_index_url !== undefined) {
    if (typeof r.pip_index_url !== 'string' || !/^https?:\/\/[^\s]+$/.test(r.pip_index_url)) throw new RecipeError('"pip_index_url" must be an http(s) URL');
    recipe.pipIndexUrl = r.pip_index_url;
  }
  if (recipe.pip.length && !recipe.pipFindLinks && !recipe.pipIndexUrl) {
    throw new RecipeError('"pip" needs "pip_find_links" (a local wheel directory) or "pip_index_url" (an index this host reaches): there is no default index');
  }
  const files = r.files ?? [];
  if (!Array.isArray(files)) throw new RecipeError('"files" must be a list of {src, dest}');
  for (const f of files as unknown[]) {
    const { src, dest } = (f ?? {}) as Record<string, unknown>;
    if (typeof src !== 'string' || typeof dest !== 'string') throw new RecipeError('each of "files" is {"src": host path, "dest": absolute path in the image}');
    const normal = path.posix.normalize(dest);
    if (!dest.startsWith('/') || normal !== dest.replace(/\/+$/, '') || normal === '/' || dest.split('/').includes('..')) {
      throw new RecipeError(`"files": dest ${JSON.stringify(dest)} must be a normalized absolute path below /`);
    }
    if (FORBIDDEN_DESTS.some((p) => normal === p || normal.startsWith(`${p}/`))) {
      throw new RecipeError(`"files": ${normal} is reserved (${FORBIDDEN_DESTS.join(', ')})`);
    }
    const abs = path.resolve(baseDir, src);
    try {
      const st = await stat(abs);
      if (!st.isFile() && !st.isDirectory()) throw new Error('not a file or directory');
    } catch (err) {
      throw new RecipeError(`"files": ${abs}: ${(err as Error).message}`);
    }
    recipe.files.push({ src: abs, dest: normal });
  }
  if (r.setup !== undefined) {
    if (typeof r.setup !== 'string') throw new RecipeError('"setup" must be a string (a bash script)');
    recipe.setup = r.setup;
  }
  return recipe;
}

async function isDirectory(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}

/** sha256 of every file under `p` (names and contents), in a stable order. */
async function contentHash(p: string, h = createHash('sha256'), rel = ''): Promise<string> {
  const st = await stat(p);
  if (st.isFile()) {
    h.update(`f ${rel} ${st.mode & 0o777}\0`).update(await readFile(p));
  } else if (st.isDirectory()) {
    h.update(`d ${rel}\0`);
    for (const name of (await readdir(p)).sort()) await contentHash(path.join(p, name), h, `${rel}/${name}`);
  }
  return rel === '' ? h.digest('hex') : '';
}

/**
 * The layer's identity: the recipe (paths replaced by what they hold) and the base it sits on.
 * 12 hex digits, like the base's.
 */
export async function templateHash(recipe: TemplateRecipe, baseHash: string): Promise<string> {
  const inputs = {
    builderVersion: TEMPLATE_BUILDER_VERSION,
    baseHash,
    name: recipe.name,
    apt: recipe.apt,
    pip: recipe.pip,
    pipFindLinks: recipe.pipFindLinks ? await contentHash(recipe.pipFindLinks) : null,
    pipIndexUrl: recipe.pipIndexUrl ?? null,
    files: await Promise.all(recipe.files.map(async (f) => ({ dest: f.dest, content: await contentHash(f.src) }))),
    setup: recipe.setup ?? null,
  };
  return createHash('sha256').update(canonicalJson(inputs)).digest('hex').slice(0, 12);
}
