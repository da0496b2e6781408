/**
 * The microVM guest image, built from Debian packages next to the sandbox image:
 *
 *   <imagesDir>/vmkernel-<hash>/vmlinux       Debian's cloud kernel, uncompressed: an ELF with a PVH
 *                                             entry note, which QEMU's microvm boots directly
 *   <imagesDir>/vmkernel-<hash>/initrd.img    busybox-static + the virtio modules; its /init loads
 *                                             them, mounts the root, opens the agent's port and
 *                                             switch_roots into the agent
 *   <imagesDir>/vmroot-<hash>/rootfs.ext4     the sandbox image (agent layer over the Debian base)
 *                                             as an ext4 file (`mke2fs -d`), read-only and shared:
 *                                             each VM writes to its own qcow2 overlay
 *
 * The kernel part is keyed by the kernel package's version and the init script, the root by the
 * sandbox image's id; both are built into `.tmp-*` and renamed into place under the images lock,
 * like the sandbox image. The kernel .deb is only unpacked (`dpkg-deb -x`), never installed.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, readlink, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import { ImageBuildError } from './build.js';
import { cpioArchive, type CpioEntry } from './cpio.js';
import type { ImagePaths } from './index.js';
import { acquireLock } from './lock.js';
import type { ImageProgress } from './progress.js';
import { execQuiet, isDir, removeTree, treeSize } from './tree.js';

/** Bump when what the builder produces changes for the same inputs. */
export const VM_IMAGE_BUILDER_VERSION = 1;
/** The Debian metapackage whose dependency names the current cloud kernel. */
const KERNEL_METAPACKAGE = 'linux-image-cloud-amd64';
/** Loaded in dependency order by the initramfs (virtio-mmio transport, disk, agent port, network). */
const GUEST_MODULES = ['virtio_mmio', 'virtio_blk', 'virtio_console', 'virtio_net'];
/** The guest sees this name on the agent's virtio-serial port (/sys/class/virtio-ports/*\/name). */
export const AGENT_PORT_NAME = 'org.podflare.agent';
/** Size of the root filesystem: the image plus room for what a sandbox writes (sparse file). */
const ROOTFS_HEADROOM_BYTES = 3 * 1024 ** 3;
/** mke2fs -E for the root. lazy_itable_init=0: the inode tables are zeroed at build (as unwritten
 * extents: ~60 MB once on the host), or else the guest kernel's ext4lazyinit thread would zero them
 * in every VM, writing ~50 MB of zeros into each VM's overlay and taking CPU from its first seconds
 * (a fork's siblings still restoring). */
const ROOTFS_EXTENDED_OPTIONS = 'root_owner=0:0,lazy_itable_init=0';
const BUSYBOX = '/bin/busybox';

export interface VmImagePaths {
  /** `<kernelhash>-<roothash>` */
  id: string;
  vmlinux: string;
  initrd: string;
  rootfs: string;
  kernelVersion: string;
}

/**
 * The initramfs's /init. fd 3 of the agent is the virtio-serial port (found by its name, since no
 * udev runs); the agent is PID 1 of the guest. eth0 is configured for QEMU's user-mode network
 * (slirp's fixed 10.0.2.0/24) when the VM has one.
 */
const INIT_SCRIPT = (modules: string[]) => `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "podflare-init: $*"; poweroff -f; }
for m in ${modules.join(' ')}; do insmod /lib/modules/$m.ko || fail "cannot load $m"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount the root"
port=
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name 2>/dev/null)" = ${AGENT_PORT_NAME} ] && port=/dev/\${d##*/}; done
[ -n "$port" ] || fail "no agent port"
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
exec 3<>$port
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /newroot/dev/shm
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
umount /proc /sys
cd /newroot
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
  OPENBLAS_NUM_THREADS=1 PODFLARE_AGENT_FD=3 PODFLARE_RUNTIME=vm \\
  switch_root /newroot /usr/bin/python3 /opt/podflare/podflare_agent.py
`;

export interface EnsureVmImageOptions {
  imagesDir: string;
  /** The sandbox image (from ensureImage) whose root the VM boots. */
  image: ImagePaths;
  onProgress?: (p: ImageProgress) => void;
  log?: (msg: string) => void;
}

/** Returns the VM image for the current kernel package and sandbox image, building what is missing. */
export async function ensureVmImage(opts: EnsureVmImageOptions): Promise<VmImagePaths> {
  const started = Date.now();
  const imagesDir = path.resolve(opts.imagesDir);
  const report = (message: string, step?: string, stage: ImageProgress['stage'] = 'vm') => opts.onProgress?.({ stage, message, step, elapsedMs: Date.now() - started });
  const log = opts.log ?? (() => undefined);
  report('looking for the VM kernel package', undefined, 'check');
  const pkg = await kernelPackage();
  const initScript = INIT_SCRIPT(['virtio_ring', 'virtio', ...GUEST_MODULES]);
  const kernelHash = hashOf({ v: VM_IMAGE_BUILDER_VERSION, pkg, initScript, busybox: BUSYBOX });
  const rootHash = vmRootHash(opts.image.id);
  const kernelDir = path.join(imagesDir, `vmkernel-${kernelHash}`);
  const rootDir = path.join(imagesDir, `vmroot-${rootHash}`);
  const paths = async (): Promise<VmImagePaths> => ({
    id: `${kernelHash}-${rootHash}`,
    vmlinux: path.join(kernelDir, 'vmlinux'),
    initrd: path.join(kernelDir, 'initrd.img'),
    rootfs: path.join(rootDir, 'rootfs.ext4'),
    kernelVersion: JSON.parse(await readFile(path.join(kernelDir, 'kernel.json'), 'utf8')).release as string,
  });
  if ((await isDir(kernelDir)) && (await isDir(rootDir))) {
    report(`VM image ${kernelHash}-${rootHash} ready`, undefined, 'done');
    return paths();
  }
  const lock = await acquireLock(path.join(imagesDir, '.build.lock'), {
    onWait: () => report('another process is building an image; waiting', undefined, 'wait'),
  });
  try {
    if (!(await isDir(kernelDir))) {
      const t = Date.now();
      await buildKernelDir(imagesDir, kernelDir, pkg, initScript, (step) => report(`building vmkernel-${kernelHash} from ${pkg.name} ${pkg.version}`, step));
      log(`vmkernel-${kernelHash} built in ${((Date.now() - t) / 1000).toFixed(1)} s (${pkg.name} ${pkg.version})`);
    }
    if (!(await isDir(rootDir))) {
      const t = Date.now();
      await buildRootDir(imagesDir, rootDir, opts.image, (step) => report(`building vmroot-${rootHash} (ext4 root from image ${opts.image.id})`, step));
      log(`vmroot-${rootHash} built in ${((Date.now() - t) / 1000).toFixed(1)} s`);
    }
    report(`VM image ${kernelHash}-${rootHash} ready`, undefined, 'done');
    return await paths();
  } finally {
    await lock.release();
  }
}

/** The vmroot-<hash> that goes with a sandbox image id. */
export function vmRootHash(imageId: string): string {
  return hashOf({ v: VM_IMAGE_BUILDER_VERSION, image: imageId, headroom: ROOTFS_HEADROOM_BYTES, mke2fs: ROOTFS_EXTENDED_OPTIONS });
}

/** Processes holding a file under `dir` open (QEMU keeps its kernel, and disks' backing files). */
export async function processesWithFilesUnder(dir: string): Promise<number[]> {
  const out: number[] = [];
  for (const pid of (await readdir('/proc')).filter((n) => /^\d+$/.test(n))) {
    try {
      for (const fd of await readdir(`/proc/${pid}/fd`)) {
        const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
        if (target.startsWith(dir + '/')) {
          out.push(Number(pid));
          break;
        }
      }
    } catch { /* ended, or not ours to read */ }
  }
  return out;
}

function hashOf(value: unknown): string {
  return createHash('sha256').update(JSON.stringify(value)).digest('hex').slice(0, 12);
}

interface KernelPackage { name: string; version: string }

/** The cloud kernel package the metapackage points to now, and its version (from apt's lists). */
async function kernelPackage(): Promise<KernelPackage> {
  let deps = await execQuiet('apt-cache', ['depends', KERNEL_METAPACKAGE], 60_000);
  if (deps.code !== 0 || !/Depends: linux-image-/.test(deps.stdout)) {
    // A fresh machine may have no package lists yet.
    await execQuiet('apt-get', ['update', '-qq'], 300_000);
    deps = await execQuiet('apt-cache', ['depends', KERNEL_METAPACKAGE], 60_000);
  }
  const name = /Depends: (linux-image-[\w.+-]+)/.exec(deps.stdout)?.[1];
  if (!name) throw new ImageBuildError(`apt does not know ${KERNEL_METAPACKAGE} (is a Debian mirror configured?): ${deps.stderr.trim()}`);
  const show = await execQuiet('apt-cache', ['show', '--no-all-versions', name], 60_000);
  const version = /^Version: (.+)$/m.exec(show.stdout)?.[1];
  if (!version) throw new ImageBuildError(`apt-cache show ${name} gave no version`);
  return { name, version };
}

async function must(cmd: string, args: string[], what: string, cwd?: string, timeoutMs = 300_000): Promise<string> {
  const res = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(cmd, args, { cwd, timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) =>
      resolve({ code: err ? 1 : 0, stdout: String(stdout), stderr: String(stderr) || (err ? err.message : '') }));
  });
  if (res.code !== 0) throw new ImageBuildError(`${what} failed: ${(res.stderr || res.stdout).trim().split('\n').slice(-5).join(' | ')}`);
  return res.stdout;
}

async function buildKernelDir(imagesDir: string, target: string, pkg: KernelPackage, initScript: string, step: (s: string) => void): Promise<void> {
  if (!existsSync(BUSYBOX)) throw new ImageBuildError(`${BUSYBOX} is missing: install busybox-static (bash scripts/setup.sh)`);
  const tmp = path.join(imagesDir, `.tmp-vmkernel-${path.basename(target).slice('vmkernel-'.length)}-${process.pid}-${randomBytes(3).toString('hex')}`);
  const work = await mkdtemp(path.join(os.tmpdir(), 'podflare-kernel-'));
  try {
    await mkdir(tmp, { recursive: true });
    step(`downloading ${pkg.name}`);
    await chmod(work, 0o777); // apt's download sandbox user (_apt) writes here
    await must('apt-get', ['download', '-qq', `${pkg.name}=${pkg.version}`], `apt-get download ${pkg.name}`, work);
    const deb = (await readdir(work)).find((n) => n.endsWith('.deb'));
    if (!deb) throw new ImageBuildError(`apt-get download ${pkg.name} produced no .deb`);
    step('unpacking the kernel package (dpkg-deb -x)');
    const tree = path.join(work, 'tree');
    await must('dpkg-deb', ['-x', path.join(work, deb), tree], 'dpkg-deb -x');
    const vmlinuz = (await readdir(path.join(tree, 'boot'))).find((n) => n.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new ImageBuildError(`${pkg.name} has no /boot/vmlinuz-*`);
    const release = vmlinuz.slice('vmlinuz-'.length);
    step('uncompressing vmlinuz to a PVH vmlinux');
    await writeFile(path.join(tmp, 'vmlinux'), await uncompressKernel(path.join(tree, 'boot', vmlinuz), work));
    step('building the initramfs (busybox-static + virtio modules)');
    const modulesRoot = path.join(tree, 'lib/modules', release);
    await writeFile(path.join(tmp, 'initrd.img'), gzipSync(await initramfs(modulesRoot, initScript), { level: 6 }));
    await writeFile(path.join(tmp, 'kernel.json'), JSON.stringify({ package: pkg.name, version: pkg.version, release, builtAt: new Date().toISOString() }, null, 2) + '\n');
    await rename(tmp, target);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * bzImage → vmlinux: the setup header (at 0x1f1) says where the compressed payload starts and how
 * long it is; Debian compresses it with LZ4 (legacy frame, followed by the 4-byte size the kernel
 * build appends, which `lz4` reports as trailing garbage: the output is complete all the same).
 */
async function uncompressKernel(vmlinuz: string, work: string): Promise<Buffer> {
  const image = await readFile(vmlinuz);
  const setupSects = image[0x1f1] || 4;
  const payloadOffset = image.readUInt32LE(0x248);
  const payloadLength = image.readUInt32LE(0x24c);
  const start = (setupSects + 1) * 512 + payloadOffset;
  const payload = image.subarray(start, start + payloadLength);
  let out: Buffer;
  if (payload.readUInt32LE(0) === 0x184c2102) {
    const file = path.join(work, 'payload.lz4');
    await writeFile(file, payload);
    await execQuiet('lz4', ['-d', '-f', '-q', file, path.join(work, 'vmlinux')], 120_000);
    out = await readFile(path.join(work, 'vmlinux')).catch(() => Buffer.alloc(0));
  } else if (payload[0] === 0x1f && payload[1] === 0x8b) {
    out = gunzipSync(payload);
  } else {
    throw new ImageBuildError(`unsupported kernel compression (payload magic ${payload.subarray(0, 4).toString('hex')})`);
  }
  if (out.length < 1024 || out.readUInt32BE(0) !== 0x7f454c46) throw new ImageBuildError('uncompressing the kernel did not give an ELF file (is lz4 installed?)');
  return out;
}

/** Module load order: each module after what its `.modinfo` says it depends on. */
async function moduleFiles(modulesRoot: string): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  const walk = async (dir: string) => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      const full = path.join(dir, e.name);
      if (e.isDirectory()) await walk(full);
      else if (e.name.endsWith('.ko')) found.set(e.name.slice(0, -3).replace(/-/g, '_'), full);
    }
  };
  await walk(path.join(modulesRoot, 'kernel'));
  return found;
}

function dependsOf(ko: Buffer): string[] {
  const at = ko.indexOf('\0depends=');
  if (at === -1) return [];
  const end = ko.indexOf(0, at + 1);
  return ko.subarray(at + 9, end).toString().split(',').filter(Boolean).map((m) => m.replace(/-/g, '_'));
}

async function initramfs(modulesRoot: string, initScript: string): Promise<Buffer> {
  const files = await moduleFiles(modulesRoot);
  const order: string[] = [];
  const contents = new Map<string, Buffer>();
  const visit = async (name: string, chain: string[]) => {
    if (order.includes(name)) return;
    if (chain.includes(name)) throw new ImageBuildError(`module dependency cycle: ${[...chain, name].join(' → ')}`);
    const file = files.get(name);
    if (!file) throw new ImageBuildError(`the kernel package has no module ${name}`);
    const ko = await readFile(file);
    contents.set(name, ko);
    for (const dep of dependsOf(ko)) await visit(dep, [...chain, name]);
    order.push(name);
  };
  for (const m of GUEST_MODULES) await visit(m, []);
  const entries: CpioEntry[] = [];
  for (const d of ['bin', 'dev', 'proc', 'sys', 'newroot', 'lib', 'lib/modules']) entries.push({ name: d, mode: 0o40755 });
  entries.push({ name: 'bin/busybox', mode: 0o100755, data: await readFile(BUSYBOX) });
  for (const m of order) entries.push({ name: `lib/modules/${m}.ko`, mode: 0o100644, data: contents.get(m)! });
  // The script's module list is the computed order (the hash used a fixed list naming the same set).
  const script = initScript.replace(/^for m in .*; do insmod/m, `for m in ${order.join(' ')}; do insmod`);
  entries.push({ name: 'init', mode: 0o100755, data: Buffer.from(script) });
  return cpioArchive(entries);
}

async function buildRootDir(imagesDir: string, target: string, image: ImagePaths, step: (s: string) => void): Promise<void> {
  const tmp = path.join(imagesDir, `.tmp-vmroot-${path.basename(target).slice('vmroot-'.length)}-${process.pid}-${randomBytes(3).toString('hex')}`);
  const merged = path.join(tmp, 'merged');
  let mounted = false;
  try {
    await mkdir(merged, { recursive: true });
    // A read-only overlay of the two layers is the tree mke2fs copies (no copy on the host).
    await must('mount', ['-t', 'overlay', 'overlay', '-o', `ro,lowerdir=${image.agent}:${image.base}`, merged], 'mounting the image layers');
    mounted = true;
    const used = (await treeSize(image.base)) ?? 1024 ** 3;
    const size = Math.ceil((used + ROOTFS_HEADROOM_BYTES) / 1024 ** 2);
    step(`mke2fs -d (${size} MiB, sparse)`);
    await must('mke2fs', ['-q', '-F', '-t', 'ext4', '-O', '^has_journal', '-m', '0', '-L', 'podflare-root', '-E', ROOTFS_EXTENDED_OPTIONS, '-d', merged, path.join(tmp, 'rootfs.ext4'), `${size}M`], 'mke2fs -d');
    await must('umount', [merged], 'unmounting the image layers');
    mounted = false;
    await rm(merged, { recursive: true, force: true });
    await chmod(path.join(tmp, 'rootfs.ext4'), 0o444);
    await writeFile(path.join(tmp, 'image.json'), JSON.stringify({ image: image.id, builtAt: new Date().toISOString() }, null, 2) + '\n');
    await rename(tmp, target);
  } catch (err) {
    if (mounted) await execQuiet('umount', ['-l', merged]);
    await removeTree(tmp).catch(() => undefined);
    throw err;
  }
}
