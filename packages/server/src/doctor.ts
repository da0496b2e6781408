/**
 * `podflare doctor`: what this machine offers the runtimes, checked for real (a bubblewrap sandbox
 * is actually started). Required checks are what the namespace runtime and the image builder need;
 * the rest inform (KVM, QEMU for the future VM runtime, whether the image is built yet).
 */
import { execFile } from 'node:child_process';
import { access, constants, readFile, readdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { TIMEOUT_EXIT_CODE } from '@podflare/protocol/events';
import { inspectImages } from './image/index.js';
import { unreachableMessage, unreachableParent } from './state-dir-access.js';
import { detectKvm } from './runtime/vm/kvm.js';
import { diskImagePath, isReserved, volumeSpaceProblem } from './runtime/namespace/disk-volume.js';

export interface DoctorCheck {
  name: string;
  ok: boolean;
  detail: string;
  /** A failed required check means sandboxes cannot work here. */
  required: boolean;
}

export interface DoctorReport {
  /** Every required check passed. */
  ok: boolean;
  checks: DoctorCheck[];
}

export { detectKvm, type KvmInfo, type KvmKind } from './runtime/vm/kvm.js';

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  /** The command does not exist. */
  missing: boolean;
  ms: number;
}

function run(cmd: string, args: string[], timeoutMs = 10_000): Promise<RunResult> {
  const t = Date.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: unknown; killed?: boolean }) | null;
      // EACCES from spawn: some PATH directory is unreadable for this user and the command is in none of the others.
      const missing = e?.code === 'ENOENT' || e?.code === 'EACCES';
      const code = !e ? 0 : typeof e.code === 'number' ? e.code : e.killed ? TIMEOUT_EXIT_CODE : 1;
      resolve({ code, stdout: String(stdout ?? ''), stderr: String(stderr ?? '') || (e && !missing && typeof e.code !== 'number' ? e.message : ''), missing, ms: Date.now() - t });
    });
  });
}

function firstLine(s: string): string {
  return s.trim().split('\n')[0]?.trim() ?? '';
}

async function checkBubblewrap(): Promise<DoctorCheck> {
  const r = await run('bwrap', ['--version']);
  return {
    name: 'bubblewrap',
    required: true,
    ok: r.code === 0,
    detail: r.missing ? 'bwrap not found: apt-get install bubblewrap' : r.code === 0 ? firstLine(r.stdout) : firstLine(r.stderr) || `exit ${r.code}`,
  };
}

async function checkNamespaces(): Promise<DoctorCheck> {
  const r = await run('bwrap', ['--unshare-all', '--die-with-parent', '--ro-bind', '/', '/', 'true']);
  return {
    name: 'namespaces',
    required: true,
    ok: r.code === 0,
    detail: r.missing
      ? 'bwrap not found'
      : r.code === 0
        ? `user/mount/pid/net/ipc/uts namespaces usable (a bwrap sandbox ran in ${r.ms} ms)`
        : `bwrap --unshare-all failed: ${firstLine(r.stderr) || `exit ${r.code}`} (user namespaces disabled? see sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces)`,
  };
}

async function checkOverlay(): Promise<DoctorCheck> {
  let text = '';
  try {
    text = await readFile('/proc/filesystems', 'utf8');
  } catch {
    /* no /proc */
  }
  const ok = /\toverlay$/m.test(text);
  return { name: 'overlayfs', required: true, ok, detail: ok ? 'overlay listed in /proc/filesystems' : 'overlay not in /proc/filesystems: modprobe overlay' };
}

/** v2 if the unified hierarchy has controllers, else v1 controllers mounted per directory. */
export async function detectCgroups(root = '/sys/fs/cgroup'): Promise<{ version: 1 | 2 | 0; controllers: string[]; note?: string }> {
  const read = async (p: string) => (await readFile(p, 'utf8').catch(() => '')).trim();
  const v2 = await read(`${root}/cgroup.controllers`);
  if (existsSync(`${root}/cgroup.controllers`)) return { version: 2, controllers: v2.split(/\s+/).filter(Boolean) };
  const known = ['cpu', 'cpuacct', 'cpuset', 'memory', 'pids', 'blkio', 'io', 'devices', 'freezer', 'net_cls', 'net_prio', 'perf_event', 'hugetlb', 'rdma', 'misc'];
  const names = await readdir(root).catch(() => [] as string[]);
  const controllers = known.filter((c) => names.includes(c) && existsSync(`${root}/${c}/cgroup.procs`));
  // Hybrid setups mount an (often empty) unified hierarchy at /sys/fs/cgroup/unified.
  const hybrid = existsSync(`${root}/unified/cgroup.controllers`) ? await read(`${root}/unified/cgroup.controllers`) : undefined;
  const note = hybrid === undefined ? undefined : hybrid ? `unified hierarchy has: ${hybrid}` : 'unified hierarchy empty';
  return { version: controllers.length ? 1 : 0, controllers, note };
}

async function checkCgroups(): Promise<DoctorCheck> {
  const cg = await detectCgroups();
  const wanted = ['memory', 'pids', 'cpu'];
  const missing = wanted.filter((c) => !cg.controllers.includes(c));
  if (cg.version === 0) return { name: 'cgroups', required: true, ok: false, detail: 'no cgroup controllers found under /sys/fs/cgroup' };
  return {
    name: 'cgroups',
    required: true,
    ok: missing.length === 0,
    detail: `v${cg.version}: ${cg.controllers.join(', ') || '(none)'}${cg.note ? ` (${cg.note})` : ''}${missing.length ? `; missing ${missing.join(', ')}: resource limits will not apply` : ''}`,
  };
}

/** Disk limits need btrfs (kernel) and btrfs-progs (mkfs.btrfs): without them, no disk quota. */
async function checkDiskLimits(): Promise<DoctorCheck> {
  const filesystems = await readFile('/proc/filesystems', 'utf8').catch(() => '');
  if (!/\tbtrfs$/m.test(filesystems)) {
    return { name: 'disk limits', required: false, ok: false, detail: 'btrfs not in /proc/filesystems (modprobe btrfs): sandboxes run without disk limits' };
  }
  const r = await run('mkfs.btrfs', ['--version']);
  if (r.missing) return { name: 'disk limits', required: false, ok: false, detail: 'mkfs.btrfs not found: apt-get install btrfs-progs (sandboxes run without disk limits)' };
  return { name: 'disk limits', required: false, ok: r.code === 0, detail: `btrfs volume with per-sandbox qgroups (${firstLine(r.stdout) || firstLine(r.stderr)})` };
}

/** The seccomp filter is compiled with libseccomp's Python binding (Debian python3-seccomp). */
async function checkSeccomp(): Promise<DoctorCheck> {
  const r = await run('/usr/bin/python3', ['-c', 'import seccomp; print(seccomp.__file__)']);
  const ok = r.code === 0;
  return { name: 'seccomp', required: true, ok, detail: ok ? 'libseccomp (python3-seccomp) compiles the sandboxes\' filter' : 'python3-seccomp missing: apt-get install python3-seccomp' };
}

async function checkTool(name: string, cmd: string, args: string[], required: boolean, hint: string): Promise<DoctorCheck> {
  const r = await run(cmd, args);
  if (r.missing) return { name, required, ok: false, detail: `${cmd} not found: ${hint}` };
  const version = firstLine(r.stdout) || firstLine(r.stderr);
  return { name, required, ok: r.code === 0, detail: r.code === 0 ? version : `${cmd} ${args.join(' ')} failed: ${version || `exit ${r.code}`}` };
}

async function checkKvm(): Promise<DoctorCheck> {
  const kvm = await detectKvm();
  const accel = kvm.kind === 'hardware' ? 'VM acceleration: KVM' : 'VM acceleration: TCG (software emulation; --runtime auto picks ns)';
  return { name: 'kvm', required: false, ok: kvm.kind === 'hardware', detail: `${accel} — ${kvm.detail}` };
}

async function checkImage(imagesDir: string): Promise<DoctorCheck> {
  const info = await inspectImages(imagesDir);
  if (info.current) return { name: 'image', required: false, ok: true, detail: `built: ${info.currentBase}` };
  return {
    name: 'image',
    required: false,
    ok: false,
    detail: info.bases.length
      ? `an older build exists (${info.bases[0]}) but not base-${info.recipeHash} for the current recipe: run \`podflare image build\``
      : `not built in ${imagesDir}: run \`podflare image build\` (or the server builds it on first start)`,
  };
}

/**
 * The disk volume the server reserves at start (PODFLARE_DISK_VOLUME_MB): reserved already, or
 * room for it on the state directory's filesystem. Without that room the server refuses to start.
 */
async function checkDiskVolume(stateDir: string, sizeBytes: number): Promise<DoctorCheck> {
  const name = 'disk volume';
  const mb = Math.ceil(sizeBytes / 1024 ** 2);
  if (process.env.PODFLARE_DISK_LIMITS === '0') return { name, required: false, ok: true, detail: 'disk limits turned off (PODFLARE_DISK_LIMITS=0): no volume' };
  if (await isReserved(diskImagePath(stateDir), Math.floor(sizeBytes / 4096) * 4096)) {
    return { name, required: true, ok: true, detail: `${mb} MB reserved in ${diskImagePath(stateDir)}` };
  }
  let dir = path.resolve(stateDir);
  while (!existsSync(dir) && path.dirname(dir) !== dir) dir = path.dirname(dir);
  const problem = await volumeSpaceProblem(dir, sizeBytes).catch((e: Error) => e.message);
  return problem
    ? { name, required: true, ok: false, detail: problem }
    : { name, required: true, ok: true, detail: `${mb} MB to reserve in ${stateDir} at start: the host has room for it` };
}

async function checkRoot(): Promise<DoctorCheck> {
  const uid = process.getuid?.();
  return {
    name: 'root',
    required: false,
    ok: uid === 0,
    detail: uid === 0 ? 'running as root' : `running as uid ${uid}: building the image (mmdebstrap --mode=root) and cgroup limits need root`,
  };
}

export async function runDoctor(opts: { imagesDir: string; stateDir?: string; diskVolumeBytes?: number }): Promise<DoctorReport> {
  const checks = await Promise.all([
    ...(opts.stateDir ? [checkStateDir(opts.stateDir)] : []),
    checkBubblewrap(),
    checkNamespaces(),
    checkOverlay(),
    checkCgroups(),
    checkSeccomp(),
    checkDiskLimits(),
    ...(opts.stateDir && opts.diskVolumeBytes ? [checkDiskVolume(opts.stateDir, opts.diskVolumeBytes)] : []),
    checkTool('slirp4netns', 'slirp4netns', ['--version'], true, 'apt-get install slirp4netns (sandbox network egress)'),
    checkTool('nsenter', 'nsenter', ['--version'], true, 'apt-get install util-linux (egress allowlists: the policy proxy listens inside sandboxes)'),
    checkTool('mmdebstrap', 'mmdebstrap', ['--version'], true, 'apt-get install mmdebstrap (builds the sandbox image)'),
    checkRoot(),
    checkKvm(),
    checkTool('qemu', 'qemu-system-x86_64', ['--version'], false, 'apt-get install qemu-system-x86 qemu-utils busybox-static (for the VM runtime)'),
    checkImage(opts.imagesDir),
  ]);
  return { ok: checks.every((c) => c.ok || !c.required), checks };
}

/** The sandboxes' unprivileged uids must be able to reach the state directory. */
async function checkStateDir(stateDir: string): Promise<DoctorCheck> {
  const p = await unreachableParent(stateDir);
  return { name: 'state dir', required: true, ok: p === null, detail: p ? unreachableMessage(stateDir, p) : `${stateDir} (reachable by the sandboxes' uids)` };
}

/** One line per check: `[ ok ]`, `[FAIL]` (required), `[warn]` (optional), then a verdict. */
export function formatDoctorReport(report: DoctorReport): string {
  const width = Math.max(...report.checks.map((c) => c.name.length));
  const lines = report.checks.map((c) => {
    const tag = c.ok ? '[ ok ]' : c.required ? '[FAIL]' : '[warn]';
    return `${tag} ${c.name.padEnd(width)}  ${c.detail}`;
  });
  const failed = report.checks.filter((c) => !c.ok && c.required).map((c) => c.name);
  lines.push('');
  lines.push(report.ok ? 'podflare can run sandboxes here.' : `podflare cannot run sandboxes here: ${failed.join(', ')} failed (see above).`);
  return lines.join('\n');
}
