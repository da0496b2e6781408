/**
 * What each template's users import, so its zygote (zygote.ts) imports it once and every sandbox
 * of that template starts with it already in memory (shared copy-on-write): part of a template's
 * definition. A module missing from the image is skipped (the agent never fails on a preload).
 *
 * What a zygote imports every sandbox of its template holds: its interpreter is that much bigger,
 * and a fork of it copies that many more page tables (measured: fork(1) of a default sandbox about
 * 2× slower with the data stack preloaded). So `default` preloads only light standard-library
 * modules, and the data stack is for data templates (or an operator's choice: config
 * `defaultTemplatePreload`, PODFLARE_DEFAULT_PRELOAD).
 */

/** The data stack: importing it costs a cold interpreter ~0.5-1 s of CPU. */
export const DATA_STACK_PRELOAD: readonly string[] = ['numpy', 'pandas', 'matplotlib', 'matplotlib.pyplot'];

/** Standard-library modules most code uses, a few MB in all. */
export const LIGHT_PRELOAD: readonly string[] = [
  'json', 're', 'math', 'datetime', 'collections', 'itertools', 'functools', 'pathlib', 'subprocess', 'random', 'uuid',
  'hashlib', 'base64', 'csv', 'statistics', 'dataclasses', 'typing', 'textwrap', 'decimal',
];

/** Preload lists by template name; a template without an entry gets the default's. */
export const TEMPLATE_PRELOADS: Readonly<Record<string, readonly string[]>> = {
  default: LIGHT_PRELOAD,
  'python-datasci': DATA_STACK_PRELOAD,
};

/** The modules a template's zygote imports (Python module names, dotted). */
export function templatePreload(template: string): readonly string[] {
  return TEMPLATE_PRELOADS[template] ?? TEMPLATE_PRELOADS.default ?? [];
}
