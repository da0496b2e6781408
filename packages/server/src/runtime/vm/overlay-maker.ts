/**
 * Empty qcow2 overlays over a fork point's disk layer, written from a skeleton rather than by a
 * `qemu-img create` per fork: that process (and the fork of the server that starts it) costs
 * ~7 ms on the path to the children's start, and more while the children's QEMUs start beside it.
 *
 * A skeleton is made by qemu-img once per virtual size and directory, over a placeholder backing
 * path as long as the real one (layers are named by fixed-length ids). An overlay is a copy of it
 * with the real path written over the placeholder; nothing else in a qcow2 image depends on the
 * backing file's name. Where the lengths differ, qemu-img makes the overlay as before.
 */
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { run } from '../../proc.js';

/** qcow2 header fields (big-endian): the backing file name's offset (u64) and length (u32), the virtual size (u64). */
const BACKING_OFFSET_AT = 8;
const BACKING_SIZE_AT = 16;
const VIRTUAL_SIZE_AT = 24;
const QCOW2_MAGIC = 0x514649fb;

export class OverlayMaker {
  private readonly skeletons = new Map<string, Promise<{ image: Buffer; at: number }>>();

  /**
   * Writes `overlay`: an empty qcow2 image over `backing` (which need not exist yet), as large as
   * the qcow2 image `sizeOf`.
   */
  async make(backing: string, overlay: string, sizeOf: string): Promise<void> {
    const size = await qcow2VirtualSize(sizeOf);
    const placeholder = path.join(path.dirname(backing), '_'.repeat(path.basename(backing).length));
    if (Buffer.byteLength(backing) !== Buffer.byteLength(placeholder)) return void (await create(backing, overlay, size));
    const key = `${size}:${placeholder}`;
    let skeleton = this.skeletons.get(key);
    if (!skeleton) {
      skeleton = makeSkeleton(placeholder, overlay, size);
      this.skeletons.set(key, skeleton);
      skeleton.catch(() => this.skeletons.delete(key));
    }
    const { image, at } = await skeleton;
    const copy = Buffer.from(image);
    copy.write(backing, at, 'utf8');
    await writeFile(overlay, copy, { flag: 'wx', mode: 0o600 }); // root's: copied into each child's directory, then handed to it
  }
}

/** The virtual size of a qcow2 image, from its header. */
async function qcow2VirtualSize(file: string): Promise<bigint> {
  const f = await open(file, 'r');
  try {
    const { buffer, bytesRead } = await f.read(Buffer.alloc(32), 0, 32, 0);
    if (bytesRead < 32 || buffer.readUInt32BE(0) !== QCOW2_MAGIC) throw new Error(`${file} is not a qcow2 image`);
    return buffer.readBigUInt64BE(VIRTUAL_SIZE_AT);
  } finally {
    await f.close();
  }
}

function create(backing: string, overlay: string, size: bigint): Promise<string> {
  // -u: the backing file need not exist (yet); -F: its format, so nothing probes it.
  return run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-F', 'qcow2', '-b', backing, overlay, String(size)]);
}

async function makeSkeleton(placeholder: string, near: string, size: bigint): Promise<{ image: Buffer; at: number }> {
  const file = path.join(path.dirname(near), `.skeleton-${randomBytes(4).toString('hex')}.qcow2`);
  try {
    await create(placeholder, file, size);
    const image = await readFile(file);
    if (image.readUInt32BE(0) !== QCOW2_MAGIC) throw new Error('qemu-img made no qcow2 image');
    const at = Number(image.readBigUInt64BE(BACKING_OFFSET_AT));
    const length = image.readUInt32BE(BACKING_SIZE_AT);
    if (image.toString('utf8', at, at + length) !== placeholder) throw new Error('the skeleton overlay does not name its placeholder backing file where its header says');
    return { image, at };
  } finally {
    await rm(file, { force: true });
  }
}
