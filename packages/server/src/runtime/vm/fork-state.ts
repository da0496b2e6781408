/**
 * A fork's migration state made without migrating the parent: the template's own stream supplies
 * the frame (header, configuration, the RAM section with its block list and the ROM blocks'
 * pages), the parent's private pages go into that RAM section, and the parent's device state
 * (QMP `xen-save-devices-state`: every device section, no RAM) follows it. A child that maps the
 * template's RAM file copy-on-write and loads this stream is where the parent stopped: every page
 * the parent had not written is still the file's.
 *
 * Stream format: see migration-split.ts.
 */
import { Flag, MAGIC, MigrationStreamError, PAGE, Section, StreamSplitter, VERSION } from './migration-split.js';

/**
 * A template's stream cut where a fork's pages go: after the RAM section's setup. (Byte arrays:
 * what Buffers become when posted to the fork worker.)
 */
export interface ForkSkeleton {
  /** Header, configuration and the RAM section's setup (START: its block list). */
  head: Uint8Array;
  /** The rest of the RAM section: other blocks' pages (ROMs), up to its END. */
  ramRest: Uint8Array;
  ramSection: number;
}

/**
 * The skeleton of a template's state; throws if the stream has pages of `ramBlock` (a template's
 * RAM is shared, so its stream has none).
 */
export function forkSkeleton(templateState: Buffer, ramBlock: string, ramSize: number): ForkSkeleton {
  const splitter = new StreamSplitter(ramBlock, null, ramSize);
  splitter.push(templateState, false);
  const { state, ram } = splitter.end();
  return { head: state.subarray(0, ram.setupEnd), ramRest: state.subarray(ram.setupEnd, ram.end), ramSection: ram.section };
}

const ZERO_PAGE = Buffer.alloc(PAGE);
/** Device state: the header, then sections, then EOF. */
const DEVICE_STATE_HEADER = 8;

/** Pages read at most at once (a run of consecutive pages). */
export const MAX_RUN = 256;

/**
 * The state for children of a fork, up to the device state: `skeleton` with the parent's private
 * pages of `ramBlock` (`pages`, page numbers, ascending) in its RAM section, read run by run with
 * `readRun` (consecutive pages, at most MAX_RUN); an all-zero page becomes a one-byte record.
 */
export function forkStateHead(skeleton: ForkSkeleton, ramBlock: string, pages: Uint32Array, readRun: (first: number, count: number) => Buffer): Buffer {
  const n = pages.length;
  const name = Buffer.from(ramBlock, 'latin1');
  // Section PART of RAM: records (offset | flags), the first naming the block; EOS; footer. At
  // most this long (an all-zero page takes one byte, not a page).
  const out = Buffer.allocUnsafeSlow(skeleton.head.length + 5 + 1 + name.length + n * (8 + PAGE) + 8 + 5 + skeleton.ramRest.length);
  out.set(skeleton.head, 0);
  let at = skeleton.head.length;
  out[at] = Section.Part;
  out.writeUInt32BE(skeleton.ramSection, at + 1);
  at += 5;
  let run: Buffer = Buffer.alloc(0);
  let runStart = 0;
  for (let i = 0; i < n; i++) {
    if (i >= runStart + run.length / PAGE) {
      let j = i + 1;
      while (j < n && pages[j] === pages[j - 1]! + 1 && j - i < MAX_RUN) j++;
      run = readRun(pages[i]!, j - i);
      runStart = i;
    }
    const data = run.subarray((i - runStart) * PAGE, (i - runStart + 1) * PAGE);
    const zero = data.equals(ZERO_PAGE);
    const offset = pages[i]! * PAGE;
    out.writeUInt32BE(Math.floor(offset / 2 ** 32), at);
    out.writeUInt32BE((offset % 2 ** 32) + (zero ? Flag.Zero : Flag.Page) + (i ? Flag.Continue : 0), at + 4);
    at += 8;
    if (!i) {
      out[at] = name.length;
      at += 1 + name.copy(out, at + 1);
    }
    if (zero) out[at++] = 0; // the fill byte
    else at += data.copy(out, at);
  }
  out.writeUInt32BE(0, at);
  out.writeUInt32BE(Flag.Eos, at + 4);
  out[at + 8] = Section.Footer;
  out.writeUInt32BE(skeleton.ramSection, at + 9);
  at += 13;
  out.set(skeleton.ramRest, at);
  return out.subarray(0, at + skeleton.ramRest.length);
}

/** The device sections and EOF of a `xen-save-devices-state` file (throws if it is not one). */
export function deviceSections(devices: Buffer): Buffer {
  if (devices.length < DEVICE_STATE_HEADER + 1 || devices.readUInt32BE(0) !== MAGIC || devices.readUInt32BE(4) !== VERSION || devices[devices.length - 1] !== Section.Eof) {
    throw new MigrationStreamError('the device state is not a complete QEMU device state');
  }
  return devices.subarray(DEVICE_STATE_HEADER);
}
