/**
 * A minimal `newc` cpio writer: the format the kernel unpacks as an initramfs. Written here because
 * the archive has a handful of entries and the `cpio` package is not otherwise needed.
 */
export interface CpioEntry {
  /** Relative path, without a leading slash. */
  name: string;
  /** Full st_mode: type bits and permissions (0o100755 file, 0o40755 directory, 0o120777 link). */
  mode: number;
  /** File contents or a symlink's target. */
  data?: Buffer;
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function header(ino: number, name: string, mode: number, size: number): Buffer {
  const fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, Buffer.byteLength(name) + 1, 0];
  const text = '070701' + fields.map((v) => v.toString(16).toUpperCase().padStart(8, '0')).join('');
  const nameBytes = Buffer.from(name + '\0');
  return Buffer.concat([Buffer.from(text), nameBytes, Buffer.alloc(pad4(110 + nameBytes.length))]);
}

/** The archive bytes (uncompressed; the kernel also accepts it gzip-compressed). */
export function cpioArchive(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  for (const e of [...entries, { name: 'TRAILER!!!', mode: 0 }]) {
    const data = e.data ?? Buffer.alloc(0);
    parts.push(header(ino++, e.name, e.mode, data.length), data, Buffer.alloc(pad4(data.length)));
  }
  return Buffer.concat(parts);
}
