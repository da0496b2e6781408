/**
 * A template's layer made from a live sandbox (POST /v1/sandboxes/:id/template): what the sandbox
 * changed over its image — its upper, and the fork layers below it when it is a fork child —
 * copied by the host helper into a new read-only layer of the images directory
 * (host/podflare_template_layer.py: never following what the sandbox planted, bounded, owners
 * shifted back to image ids). The template's layers are then that layer over the sandbox's own
 * image layers (its template's, the base): its agent layer is not among them, so a sandbox that
 * changed /opt/podflare does not pass that on (every sandbox gets the server's agent on top).
 *
 * A fork child's own files are spread over its upper and its fork layers: they are first squashed
 * into one tree in the sandbox's own directory (on its subvolume: a reflink copy, counted against
 * its disk limit like a fork layer), copied from there, then removed.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { SandboxError, type TemplateLayerBounds } from '@podflare/runtime';
import type { HostHelper } from './hostd.js';
import type { NsSandbox } from './ns-sandbox.js';

/** Directory levels a template's layer may nest (each level holds an fd pair in the copy). */
const MAX_DEPTH = 200;

export interface TemplateLayerDeps {
  hostd: HostHelper;
  /** The sandboxes' uid range (owners in an upper), shifted back to 0.. in the layer. */
  uidBase: number;
  idCount: number;
  /** The server's agent layer (above every template's layers, never part of one). */
  agentLayer: string;
  isForkLayer(layer: string): boolean;
}

/** Copies `s`'s own files into `target`; resolves with the template's lower layers (topmost first). */
export async function saveTemplateLayer(
  deps: TemplateLayerDeps, s: NsSandbox, target: string, bounds: TemplateLayerBounds,
): Promise<{ layers: string[]; bytes: number }> {
  if (!s.initPid) throw new SandboxError('conflict', 'the sandbox is not running');
  const forkLayers = s.lowers.filter((l) => deps.isForkLayer(l));
  const squashed = forkLayers.length ? path.join(s.dirs.dir, 'layers', `fork-tpl-${randomBytes(8).toString('hex')}`) : null;
  try {
    if (squashed) {
      await deps.hostd.squashLayers([s.dirs.upper, ...forkLayers], squashed).catch((err: Error) => {
        throw outOfSpace(err) ? new SandboxError('insufficient_storage', `sandbox ${s.id} has no disk space left to gather its files for the template`) : err;
      });
    }
    const bytes = await deps.hostd.templateLayer({
      source: squashed ?? s.dirs.upper, target, base: deps.uidBase, count: deps.idCount,
      maxBytes: bounds.maxBytes, maxEntries: bounds.maxEntries, maxDepth: MAX_DEPTH,
    }).catch(async (err: Error) => {
      await deps.hostd.removeTree(target).catch(() => undefined);
      const tooLarge = /TemplateTooLarge: \[Errno \d+\] (.*)$/s.exec(err.message);
      if (tooLarge) throw new SandboxError('insufficient_storage', `cannot make a template of sandbox ${s.id}: ${tooLarge[1]}`);
      if (outOfSpace(err)) throw new SandboxError('insufficient_storage', 'the images directory\'s disk is full: no room for the template');
      throw err;
    });
    const imageLayers = s.lowers.filter((l) => !deps.isForkLayer(l) && l !== deps.agentLayer);
    return { layers: [target, ...imageLayers], bytes };
  } finally {
    if (squashed) await deps.hostd.removeTree(squashed).catch(() => undefined);
  }
}

/** A host helper's OSError for a full quota (EDQUOT) or a full disk (ENOSPC). */
function outOfSpace(err: Error): boolean {
  return /\[Errno (122|28)\]/.test(err.message);
}
