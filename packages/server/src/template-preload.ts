/**
 * What each template's users import, so its zygote (zygote.ts) imports it once and every sandbox
 * of that template starts with it already in memory (shared copy-on-write): part of a template's
 * definition. A module missing from the image is skipped (the agent never fails on a preload).
 */

/**
 * The data stack: most code an AI agent runs starts with these, and importing them costs a cold
 * interpreter ~0.5-1 s of CPU. Memory is shared with the zygote, so the cost per sandbox is small.
 */
export const DATA_STACK_PRELOAD: readonly string[] = ['numpy', 'pandas', 'matplotlib', 'matplotlib.pyplot'];

/**
 * Preload lists by template name. `default` ships the data stack (the image has it); a template
 * without an entry gets the default's list.
 */
export const TEMPLATE_PRELOADS: Readonly<Record<string, readonly string[]>> = {
  default: DATA_STACK_PRELOAD,
  'python-datasci': DATA_STACK_PRELOAD,
};

/** The modules a template's zygote imports (Python module names, dotted). */
export function templatePreload(template: string): readonly string[] {
  return TEMPLATE_PRELOADS[template] ?? TEMPLATE_PRELOADS.default ?? [];
}
