/**
 * What goes into the sandbox image, as data. The base image's directory name is a hash of this
 * recipe, so changing anything here (a package, a dpkg option, a post-step) or bumping
 * IMAGE_BUILDER_VERSION makes the next ensureImage() build a new base next to the old one.
 *
 * The recipe is runtime-neutral: it describes a root filesystem directory. The namespace runtime
 * mounts it as an overlay lower layer; a VM runtime can turn the same directory into an ext4 file
 * (`mke2fs -d`).
 */
import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';

/** Bump when the builder's behaviour changes in a way the recipe data does not capture. */
export const IMAGE_BUILDER_VERSION = 1;

/** The DNS server slirp4netns offers inside a sandbox's network namespace. */
export const SLIRP_DNS = '10.0.2.3';

const FALLBACK_SUITE = 'bookworm';
const FALLBACK_MIRROR = 'http://deb.debian.org/debian';

/**
 * Packages on top of minbase (Essential + apt + priority required). Their Recommends are not
 * installed: python3-pandas alone recommends scipy, numexpr, tables, lxml… (the earlier build with
 * Recommends was 1.3 GB).
 */
export const BASE_PACKAGES: readonly string[] = [
  'python3',
  'python3-numpy',
  'python3-pandas',
  'python3-matplotlib',
  'bash',
  'coreutils',
  'procps',
  'ca-certificates',
  // python3-fonttools (a matplotlib dependency) depends on "python3-scipy | python3-munkres"; apt
  // takes the first, and scipy drags in pythran, g++ and the Python headers (~500 MB). Naming the
  // small alternative makes apt use it.
  'python3-munkres',
  // The JavaScript REPL (agent/podflare_js.py).
  'nodejs',
];

/**
 * dpkg filters: the image carries no docs, man pages or translations. Byte-compiled *.pyc files are
 * kept on purpose: without them every sandbox would compile pandas on its first import. (The
 * libraries' test suites cannot be excluded here: python3-numpy's postinst byte-compiles its file
 * list and fails on missing files. A customize hook deletes them instead.)
 */
export const DPKG_OPTIONS: readonly string[] = [
  'path-exclude=/usr/share/doc/*',
  // License texts are small and keep the image redistributable.
  'path-include=/usr/share/doc/*/copyright',
  'path-exclude=/usr/share/man/*',
  'path-exclude=/usr/share/info/*',
  'path-exclude=/usr/share/locale/*',
  'path-include=/usr/share/locale/locale.alias',
  'path-exclude=/usr/share/lintian/*',
  'path-exclude=/usr/share/linda/*',
];

/** apt settings, kept in the image's /etc/apt/apt.conf.d/99mmdebstrap as well. */
export const APT_OPTIONS: readonly string[] = [
  'APT::Install-Recommends "false"',
  'APT::Install-Suggests "false"',
  'Acquire::Languages "none"',
];

/**
 * Shell commands mmdebstrap runs after installing everything (before its own cleanup), with "$1"
 * the root directory. They double as a smoke test: a broken numpy/pandas fails the build instead of
 * every sandbox (they run after the test suites are gone, so they also prove nothing needed them).
 * matplotlib's font cache is built here once; otherwise each fresh sandbox would spend
 * a second or more building it on its first `import matplotlib.pyplot`.
 */
export const CUSTOMIZE_HOOKS: readonly string[] = [
  // The libraries' own test suites (tens of MB with their .pyc); nothing imports them.
  'cd "$1"/usr/lib/python3/dist-packages && rm -rf pandas/tests matplotlib/tests mpl_toolkits/*/tests ' +
    'numpy/tests numpy/*/tests numpy/*/*/tests',
  `chroot "$1" env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin MPLBACKEND=Agg python3 -c ` +
    `'import numpy, pandas, matplotlib.pyplot as plt; plt.figure(); print("python ok", pandas.__version__)'`,
  // Leftovers of the build that no sandbox needs.
  'rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/log/apt "$1"/var/log/*.log',
];

/** Something done to the tree by the builder after mmdebstrap finished. */
export type PostStep =
  | { kind: 'dir'; path: string; mode: number }
  | { kind: 'file'; path: string; mode: number; content: string };

/** Paths inside the image; the runtime relies on the /.pf ones existing (empty). */
export const POST_STEPS: readonly PostStep[] = [
  { kind: 'file', path: '/etc/resolv.conf', mode: 0o644, content: `nameserver ${SLIRP_DNS}\n` },
  {
    kind: 'file',
    path: '/etc/hosts',
    mode: 0o644,
    content: '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n',
  },
  { kind: 'dir', path: '/root', mode: 0o700 },
  { kind: 'dir', path: '/tmp', mode: 0o1777 },
  { kind: 'dir', path: '/.pf', mode: 0o755 },
  { kind: 'dir', path: '/.pf/run', mode: 0o755 },
  { kind: 'dir', path: '/.pf/newroot', mode: 0o755 },
];

/** Where the packages come from: the text of one apt sources file, written by the builder. */
export interface AptSources {
  /** deb822 (`.sources`) or one-line (`.list`) format; mmdebstrap is told by the file name. */
  format: 'deb822' | 'one-line';
  /** Normalised text: comments and non-Debian entries dropped. Hashed, so a mirror change rebuilds. */
  text: string;
  /** Where it came from, for logs. */
  origin: string;
}

export interface BaseRecipe {
  builderVersion: number;
  arch: string;
  suite: string;
  variant: 'minbase';
  sources: AptSources;
  packages: readonly string[];
  dpkgOptions: readonly string[];
  aptOptions: readonly string[];
  customizeHooks: readonly string[];
  postSteps: readonly PostStep[];
}

/** The host's Debian code name, or bookworm on anything else (the image is always Debian). */
export async function hostSuite(osRelease = '/etc/os-release'): Promise<string> {
  try {
    const text = await readFile(osRelease, 'utf8');
    const field = (name: string) => new RegExp(`^${name}="?([^"\\n]*)"?$`, 'm').exec(text)?.[1];
    if (field('ID') === 'debian') {
      const codename = field('VERSION_CODENAME');
      if (codename && /^[a-z]+$/.test(codename)) return codename;
    }
  } catch {
    /* no os-release: fall through */
  }
  return FALLBACK_SUITE;
}

export function debianArch(nodeArch: string = process.arch): string {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', ia32: 'i386', arm: 'armhf', ppc64: 'ppc64el', s390x: 's390x', riscv64: 'riscv64' };
  return map[nodeArch] ?? nodeArch;
}

/** A URI that points at a Debian archive (the main one, security, a mirror or snapshot.debian.org). */
function isDebianUri(uri: string): boolean {
  return /^(https?|file):\/\//.test(uri) && /\/debian(-security)?\/?/.test(uri + '/');
}

/** A suite of this release: bookworm, bookworm-updates, bookworm-security, bookworm-backports… */
function isSuiteOf(s: string, suite: string): boolean {
  return s === suite || s.startsWith(`${suite}-`) || s.startsWith(`${suite}/`);
}

/** Keeps the deb822 stanzas of `text` that are binary Debian archives of `suite`. */
export function filterDeb822(text: string, suite: string): string {
  const stanzas = text.split(/\n\s*\n/);
  const kept: string[] = [];
  for (const stanza of stanzas) {
    const lines = stanza.split('\n').filter((l) => !l.trimStart().startsWith('#') && l.trim() !== '');
    if (lines.length === 0) continue;
    const fields = new Map<string, string>();
    let last = '';
    for (const line of lines) {
      if (/^\s/.test(line) && last) fields.set(last, `${fields.get(last)} ${line.trim()}`);
      else {
        const m = /^([A-Za-z0-9-]+):\s*(.*)$/.exec(line);
        if (!m) continue;
        last = m[1]!.toLowerCase();
        fields.set(last, m[2]!.trim());
      }
    }
    const words = (k: string) => (fields.get(k) ?? '').split(/\s+/).filter(Boolean);
    if (!words('types').includes('deb')) continue;
    if ((fields.get('enabled') ?? 'yes').toLowerCase() === 'no') continue;
    if (!words('uris').length || !words('uris').every(isDebianUri)) continue;
    if (!words('suites').length || !words('suites').every((s) => isSuiteOf(s, suite))) continue;
    // Only binary packages: a deb-src entry would make apt fetch source indices for nothing.
    kept.push(lines.map((l) => (/^types:/i.test(l) ? 'Types: deb' : l)).join('\n'));
  }
  return kept.length ? kept.join('\n\n') + '\n' : '';
}

/** Keeps the one-line `deb` entries of `text` that are Debian archives of `suite`. */
export function filterOneLine(text: string, suite: string): string {
  const kept: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*$/, '').trim();
    const m = /^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)(\s+.*)?$/.exec(line);
    if (!m || !isDebianUri(m[2]!) || !isSuiteOf(m[3]!, suite)) continue;
    kept.push(line.replace(/\s+/g, ' '));
  }
  return kept.length ? kept.join('\n') + '\n' : '';
}

/**
 * The host's apt sources when they are Debian ones (so a host pinned to a snapshot or a local
 * mirror builds from the same place), else deb.debian.org. Never stdin: mmdebstrap would read the
 * mirror list from it when given none, and CI runs with no stdin.
 */
export async function resolveSources(suite: string, aptDir = '/etc/apt'): Promise<AptSources> {
  const deb822: string[] = [];
  const origins: string[] = [];
  try {
    const dir = path.join(aptDir, 'sources.list.d');
    for (const name of (await readdir(dir)).filter((n) => n.endsWith('.sources')).sort()) {
      const text = filterDeb822(await readFile(path.join(dir, name), 'utf8'), suite);
      if (text) {
        deb822.push(text);
        origins.push(path.join(dir, name));
      }
    }
  } catch {
    /* no sources.list.d */
  }
  if (deb822.length) return { format: 'deb822', text: deb822.join('\n'), origin: origins.join(', ') };
  try {
    const file = path.join(aptDir, 'sources.list');
    const text = filterOneLine(await readFile(file, 'utf8'), suite);
    if (text) return { format: 'one-line', text, origin: file };
  } catch {
    /* no sources.list */
  }
  return { format: 'one-line', text: `deb ${FALLBACK_MIRROR} ${suite} main\n`, origin: FALLBACK_MIRROR };
}

/** The recipe for this host. */
export async function baseRecipe(opts: { aptDir?: string; osRelease?: string } = {}): Promise<BaseRecipe> {
  const suite = await hostSuite(opts.osRelease);
  return {
    builderVersion: IMAGE_BUILDER_VERSION,
    arch: debianArch(),
    suite,
    variant: 'minbase',
    sources: await resolveSources(suite, opts.aptDir),
    packages: BASE_PACKAGES,
    dpkgOptions: DPKG_OPTIONS,
    aptOptions: APT_OPTIONS,
    customizeHooks: CUSTOMIZE_HOOKS,
    postSteps: POST_STEPS,
  };
}

/** First 12 hex digits of the SHA-256 of the recipe's canonical JSON (the `origin` is not hashed). */
export function recipeHash(recipe: BaseRecipe): string {
  const { origin: _origin, ...sources } = recipe.sources;
  return hash12(canonicalJson({ ...recipe, sources }));
}

export function hash12(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex').slice(0, 12);
}

/** JSON with object keys sorted, so the hash does not depend on property order. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}
