#!/usr/bin/python3
"""Podflare's host helper: the few privileged filesystem operations the Node server cannot do itself.

Node is multi-threaded, so it cannot setns(2) into a sandbox's mount namespace; this small,
single-threaded process can. The server runs a few of them (as root, like the server; see
src/helper-pool.ts), each answering one call at a time; they speak JSON lines on stdin/stdout,
exit when stdin closes, and never run sandbox code.

Operations:
  idmap   {base, count, layers}   from now on, overlays use these read-only image layers through
                                  idmapped mounts that shift their owners by `base` (image root
                                  shows up as the sandboxes' unprivileged root, host uid `base`)
  overlay {pid, lowers, upper, work, target, binds?}
                                  mount an overlay (new mount API, never in the host's table) at
                                  `target` inside the mount namespace of host process `pid`
                                  (`pid` null: in the host's own namespace)
  overlay_prepare {lowers, upper, work, binds?}
                                  the same mounts, made but not placed: returns {handle}
  overlay_attach {handle, pid, target}   place them (in `pid`'s mount namespace)
  overlay_discard {handle}        drop them unplaced
  subvolume {path, limit_bytes}   create a btrfs subvolume (a sandbox's directory on the disk
                                  volume) whose qgroup limits what the sandbox may write
  disk_limit {path, limit_bytes}  change that limit
  squash_layers {sources, target}  squash overlay layers (topmost first) into one new layer (keeps
                                  whiteouts, opaque marks and owners): a fork layer is the
                                  parent's upper squashed alone, or with the fork layers below it
  unmount {target}                lazily unmount `target` in the host's mount namespace
  tmpfs   {pid, target}           mount a small tmpfs at `target` in that namespace (once)
  diff    {a, b, paths?, content?, max_content_bytes?}
                                  compare two overlay layer stacks (lists of directories, topmost
                                  first) without mounting them: only paths present in a layer that
                                  the stacks do not share are looked at
"""
import contextlib
import ctypes
import difflib
import errno
import fcntl
import itertools
import json
import os
import shutil
import signal
import stat
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 428, 429, 430, 431, 432, 442
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_RECURSIVE = 1, 0o2000000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_IDMAP = 0x1, 0x00100000
CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
CLONE_NEWNS = 0x00020000

libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


HOST_MNT_NS = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


class InNamespace:
    """Enters the mount namespace of `pid` for the block, and always comes back to the host's."""

    def __init__(self, pid):
        self.fd = os.open(f"/proc/{int(pid)}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    def __enter__(self):
        _check(libc.setns(self.fd, CLONE_NEWNS), "setns into the sandbox")

    def __exit__(self, *exc):
        try:
            _check(libc.setns(HOST_MNT_NS, CLONE_NEWNS), "setns back to the host")
        finally:
            os.close(self.fd)
        return False


class IdMap:
    """Idmapped, read-only views of the image layers.

    The image on disk keeps its real owners (root is 0) so that the VM runtime can use it as it
    is; sandboxes run as an unprivileged host range instead (root inside = host uid `base`). An
    idmapped mount shifts the owners the overlay sees, so image files belong to sandbox root and
    what a sandbox writes lands on the host owned by `base + n`, never by host root.

    Each view is a detached mount (open_tree + mount_setattr) held open by this process for its
    whole life and named to overlayfs as /proc/self/fd/N: nothing appears in any mount table."""

    def __init__(self):
        self.views = {}  # layer path -> fd of its idmapped detached mount
        self.userns = None

    def configure(self, base, count, layers):
        if self.userns is None:
            self.userns = _userns_with_map(base, count)
        for layer in layers:
            if layer not in self.views:
                tree = _check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, layer.encode(),
                                           OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE), f"open_tree {layer}")
                attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, 0, self.userns))
                try:
                    _check(libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE, attr, 32),
                           f"idmapped mount of {layer}")
                except OSError:
                    os.close(tree)
                    raise
                self.views[layer] = tree

    def path(self, layer):
        tree = self.views.get(layer)
        return layer if tree is None else f"/proc/self/fd/{tree}"


def _userns_with_map(base, count):
    """An fd of a user namespace mapping 0..count-1 to base..base+count-1 (a helper child creates
    it and exits; the fd keeps the namespace)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            ok = libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "cannot create a user namespace for the idmapped image")
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write(f"0 {int(base)} {int(count)}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)


IDMAP = IdMap()


def op_idmap(req):
    IDMAP.configure(req["base"], req["count"], req["layers"])
    return {}


def _fs_messages(fs):
    """What the kernel said about a failed fsconfig (read from the filesystem context's fd)."""
    said = []
    while True:
        try:
            said.append(os.read(fs, 1024).decode(errors="replace").strip())
        except OSError:
            break
    return f" ({'; '.join(said)})" if said else ""


def _open_layer(path):
    """An O_PATH fd of a layer directory, for overlayfs to be given as /proc/self/fd/N."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _overlay_mount_fd(lowers, upper, work):
    """A detached overlay mount (new mount API): nothing appears in the host's mount table.

    Every layer is named to overlayfs as /proc/self/fd/N of an fd this process holds: overlayfs
    shows the names it was given in /proc/self/mountinfo, which every process inside the sandbox
    can read, and host paths of the state directory are none of the sandbox's business."""
    fs = _check(libc.syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC), "fsopen overlay")
    held = []

    def by_fd(path):
        held.append(_open_layer(path))
        return f"/proc/self/fd/{held[-1]}"

    try:
        lowers = [IDMAP.path(layer) if layer in IDMAP.views else by_fd(layer) for layer in lowers]
        upper, work = by_fd(upper), by_fd(work)
        # fsconfig takes strings of at most 256 bytes: one "lowerdir+" per layer (Linux 6.8+)
        # where a joined "lowerdir" would be longer.
        joined = ":".join(lowers)
        options = [("lowerdir", joined)] if len(joined) < 256 else [("lowerdir+", layer) for layer in lowers]
        try:
            for key, value in options + [("upperdir", upper), ("workdir", work)]:
                _check(libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0), f"fsconfig {key}")
            _check(libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create")
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror}{_fs_messages(fs)}") from None
        return _check(libc.syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, 0), "fsmount")
    finally:
        os.close(fs)
        for fd in held:  # the mount holds the layers now
            os.close(fd)


PREPARED = {}  # handle -> (overlay mount fd, [(bind tree fd, target relative to the root)])
HANDLES = itertools.count(1)


def _prepare(req):
    """The overlay and its bind trees as detached mounts, ready to be moved into place."""
    root = _overlay_mount_fd(req["lowers"], req["upper"], req["work"])
    trees = []
    try:
        for bind in req.get("binds", []):
            trees.append((_check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, bind["source"].encode(),
                                              OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree"), bind["target"]))
            # The bind's mount point, made in the overlay's upper before anything else sees it.
            os.makedirs(f"/proc/self/fd/{root}/{bind['target'].strip('/')}", exist_ok=True)
    except BaseException:
        _close_prepared((root, trees))
        raise
    return root, trees


def _close_prepared(prepared):
    root, trees = prepared
    os.close(root)
    for tree, _ in trees:
        os.close(tree)


def _attach(prepared, pid, target):
    root, trees = prepared
    try:
        with InNamespace(pid) if pid else contextlib.nullcontext():
            os.makedirs(target, exist_ok=True)
            _check(libc.syscall(SYS_MOVE_MOUNT, root, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
            for tree, rel in trees:
                where = os.path.join(target, rel.lstrip("/"))
                _check(libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, where.encode(), MOVE_MOUNT_F_EMPTY_PATH), "move_mount bind")
    finally:
        _close_prepared(prepared)


def op_overlay(req):
    """Mounts an overlay (lowers, upper, work) at `target` inside the mount namespace of `pid`,
    plus bind mounts of host directories below it (binds: [{source, target}], targets relative
    to the overlay's root)."""
    _attach(_prepare(req), req.get("pid"), req["target"])
    return {}


def op_overlay_prepare(req):
    """The mounts of op_overlay, made but not yet placed anywhere (a fork child's root, made while
    the child is still being forked); returns a handle for overlay_attach or overlay_discard."""
    handle = next(HANDLES)
    PREPARED[handle] = _prepare(req)
    return {"handle": handle}


def op_overlay_attach(req):
    _attach(PREPARED.pop(int(req["handle"])), req["pid"], req["target"])
    return {}


def op_overlay_discard(req):
    prepared = PREPARED.pop(int(req["handle"]), None)
    if prepared is not None:
        _close_prepared(prepared)
    return {}


# ---- disk limits: btrfs subvolumes with qgroup limits -------------------------------------------

BTRFS_IOC_SUBVOL_CREATE = 0x5000940E   # _IOW(0x94, 14, struct btrfs_ioctl_vol_args), 4096 bytes
BTRFS_IOC_QGROUP_LIMIT = 0x8030942B    # _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args), 48 bytes
BTRFS_QGROUP_LIMIT_MAX_RFER = 1


def op_subvolume(req):
    parent, name = os.path.split(req["path"].rstrip("/"))
    args = struct.pack("q4088s", 0, name.encode())
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, bytearray(args))
    finally:
        os.close(fd)
    return op_disk_limit(req)


def op_disk_limit(req):
    """qgroup id 0 means the subvolume the fd is in: the sandbox's own."""
    args = struct.pack("QQQQQQ", 0, BTRFS_QGROUP_LIMIT_MAX_RFER, int(req["limit_bytes"]), 0, 0, 0)
    fd = os.open(req["path"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, bytearray(args))
    finally:
        os.close(fd)
    return {}


def _copy_xattrs(src, dst):
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError:
            pass


def _copy_entry(src, dst, st):
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(dst, stat.S_IMODE(mode))
    elif stat.S_ISREG(mode):
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            remaining = st.st_size
            while remaining > 0:
                try:
                    # Same filesystem (the btrfs disk volume): a reflink, no data copied.
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), min(remaining, 1 << 30))
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    n = os.sendfile(fout.fileno(), fin.fileno(), None, min(remaining, 1 << 30))
                if n == 0:
                    break
                remaining -= n
        os.chmod(dst, stat.S_IMODE(mode))
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        os.mknod(dst, mode, st.st_rdev)  # whiteouts are character devices 0/0
    else:
        return
    os.lchown(dst, st.st_uid, st.st_gid)
    _copy_xattrs(src, dst)  # overlayfs keeps opaque-directory marks in xattrs
    if not stat.S_ISLNK(mode):
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _remove(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def op_squash_layers(req):
    """Squashes overlay layers (`sources`, topmost first) into one new layer that, over the same
    lowers, shows exactly what they showed stacked: a path in a higher layer replaces the lower
    ones' (a whiteout included: it keeps hiding what lies further down), an opaque directory drops
    what the lower layers had in it. Deep fork chains stay one lookup deep this way."""
    dst = req["target"]
    dirs = {}
    for src in reversed(req["sources"]):  # bottom first: each higher layer overrides
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            target_dir = dst if rel == "." else os.path.join(dst, rel)
            st = os.lstat(dirpath)
            if rel != "." and (_is_opaque(dirpath) or not os.path.isdir(target_dir) or os.path.islink(target_dir)):
                _remove(target_dir)
            if not os.path.lexists(target_dir):
                _copy_entry(dirpath, target_dir, st)
            else:
                os.chmod(target_dir, stat.S_IMODE(st.st_mode))
                os.lchown(target_dir, st.st_uid, st.st_gid)
                _copy_xattrs(dirpath, target_dir)
            dirs[target_dir] = st
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                target = os.path.join(target_dir, name)
                _remove(target)
                _copy_entry(path, target, os.lstat(path))
    for target_dir in sorted(dirs, key=len, reverse=True):
        if os.path.isdir(target_dir):
            st = dirs[target_dir]
            os.utime(target_dir, ns=(st.st_atime_ns, st.st_mtime_ns))
    return {}


def op_unmount(req):
    """Lazily unmounts `target` in the host's mount namespace (a new sandbox's root, once bwrap
    holds it): a syscall here instead of a umount process the server would have to fork."""
    if libc.umount2(req["target"].encode(), MNT_DETACH) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more), or gone
            raise OSError(err, f"umount {req['target']}: {os.strerror(err)}")
    return {}


def op_tmpfs(req):
    with InNamespace(req["pid"]):
        target = req["target"]
        os.makedirs(target, exist_ok=True)
        if not os.path.ismount(target):
            # Owned by sandbox root (a fork child walks into its root here), invisible to others.
            owner = f"uid={int(req.get('uid', 0))},gid={int(req.get('gid', 0))}"
            _check(libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, f"mode=0700,size=64k,{owner}".encode()), "mount tmpfs")
    return {}


# ---- diff of two layer stacks -------------------------------------------------------------

def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path):
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def resolve(stack, rel):
    """The entry `rel` (relative path) of the merged view of `stack`: (layer path, lstat) or None."""
    parts = rel.split("/")
    for layer in stack:
        full = os.path.join(layer, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            st = None
        if st is not None:
            return None if _is_whiteout(st) else (full, st)
        # An opaque directory or a whiteout on the way hides everything below in lower layers.
        for i in range(1, len(parts)):
            parent = os.path.join(layer, *parts[:i])
            try:
                pst = os.lstat(parent)
            except OSError:
                continue
            if _is_whiteout(pst) or (stat.S_ISDIR(pst.st_mode) and _is_opaque(parent)) or not stat.S_ISDIR(pst.st_mode):
                return None
    return None


def _walk(layer, prefixes):
    """Relative paths of every entry in one layer, restricted to the given path prefixes."""
    for dirpath, dirnames, filenames in os.walk(layer):
        rel_dir = os.path.relpath(dirpath, layer)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == ".pf" or rel_dir.startswith(".pf/"):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel == ".pf":
                continue
            if prefixes is None or any(rel == p or rel.startswith(p + "/") or p.startswith(rel + "/") for p in prefixes):
                yield rel


def _same_content(a, b, chunk=1 << 20):
    (pa, sa), (pb, sb) = a, b
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if not stat.S_ISREG(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if sa.st_size != sb.st_size:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        while True:
            ba, bb = fa.read(chunk), fb.read(chunk)
            if ba != bb:
                return False
            if not ba:
                return True


def _text_diff(rel, a, b, cap):
    def read(entry):
        if entry is None:
            return ""
        path, st = entry
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > cap:
            return False
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    ta, tb = read(a), read(b)
    if ta is None or tb is None:
        return {"binary": True}
    if ta is False or tb is False:
        return {"too_large": True}
    diff = "".join(difflib.unified_diff(ta.splitlines(True), tb.splitlines(True), f"a/{rel}", f"b/{rel}"))
    return {"diff": diff}


def op_diff(req):
    a, b = list(req["a"]), list(req["b"])
    # Layers both stacks share (a common suffix) cannot hold a difference.
    while a and b and a[-1] == b[-1]:
        a.pop()
        b.pop()
    stack_a, stack_b = list(req["a"]), list(req["b"])
    prefixes = None
    if req.get("paths"):
        prefixes = [p.strip("/") for p in req["paths"]]
        if "" in prefixes:
            prefixes = None
    candidates = set()
    for layer in a + b:
        candidates.update(_walk(layer, prefixes))
    added, removed, modified, content, binary, too_large = [], [], [], {}, [], []
    cap = int(req.get("max_content_bytes", 256 * 1024))
    for rel in sorted(candidates):
        if prefixes is not None and not any(rel == p or rel.startswith(p + "/") for p in prefixes):
            continue
        ea, eb = resolve(stack_a, rel), resolve(stack_b, rel)
        if ea is None and eb is None:
            continue
        path = "/" + rel
        if ea is None:
            added.append(path)
        elif eb is None:
            removed.append(path)
        elif not _same_content(ea, eb):
            if stat.S_ISDIR(ea[1].st_mode) and stat.S_ISDIR(eb[1].st_mode):
                continue
            modified.append(path)
        else:
            continue
        regular_or_absent = all(e is None or stat.S_ISREG(e[1].st_mode) for e in (ea, eb))
        if req.get("content") and regular_or_absent:
            verdict = _text_diff(rel, ea, eb, cap)
            if "diff" in verdict:
                content[path] = verdict["diff"]
            elif verdict.get("binary"):
                binary.append(path)
            else:
                too_large.append(path)
    out = {"added": added, "removed": removed, "modified": modified}
    if req.get("content"):
        out.update(content=content, binary=binary, too_large=too_large)
    return out


OPS = {"idmap": op_idmap, "squash_layers": op_squash_layers, "subvolume": op_subvolume, "disk_limit": op_disk_limit, "overlay": op_overlay, "overlay_prepare": op_overlay_prepare, "overlay_attach": op_overlay_attach, "overlay_discard": op_overlay_discard, "unmount": op_unmount, "tmpfs": op_tmpfs, "diff": op_diff}


def _ignore_stop_signals():
    """SIGINT/SIGTERM to the server's whole process group (Ctrl-C, systemd's stop, `timeout`) are
    for the server: it then stops its sandboxes, with this helper's help, and closes our stdin,
    which is when we exit. A handler that does nothing, not SIG_IGN: anything this process execs
    starts with the default action again."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def main():
    _ignore_stop_signals()
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            result = OPS[req["op"]](req)
            reply = {"id": rid, "ok": True, **result}
        except KeyError as exc:
            reply = {"id": rid, "ok": False, "error": f"bad request: missing {exc}"}
        except Exception as exc:  # every failure goes back to the server, never kills the helper
            reply = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the server is gone: nobody to answer, nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            return


if __name__ == "__main__":
    main()
