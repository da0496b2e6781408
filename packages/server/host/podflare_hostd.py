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
                                  the stacks do not share are looked at; a reply past its bounds
                                  says `truncated: true`
  remove_tree {path}              remove a tree a sandbox made (its directory, a fork layer, a
                                  trash entry) without following anything planted in it

Every operation on a tree a sandbox controls goes through podflare_safefs.py (its threat model is
written there): fd-relative, never through a symlink, regular files only.
"""
import contextlib
import ctypes
import difflib
import errno
import fcntl
import itertools
import json
import os
import signal
import stat
import struct
import sys
from collections import OrderedDict

# Run with `python3 -I` (its directory is not on sys.path): the sibling module is found here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import podflare_safefs as safefs  # noqa: E402
import podflare_template_layer  # noqa: E402

# A fork's layer copy recurses once per directory level of a sandbox's tree (an fd pair each).
sys.setrecursionlimit(20_000)

libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT, SYS_MOUNT_SETATTR = 428, 429, 430, 431, 432, 442
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_RECURSIVE = 1, 0o2000000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 4, 0x40
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


PREPARED = {}  # handle -> (overlay mount fd, [(bind tree fd, fd of its mount point below the overlay)])
HANDLES = itertools.count(1)


def _prepare(req):
    """The overlay and its bind trees as detached mounts, ready to be moved into place."""
    root = _overlay_mount_fd(req["lowers"], req["upper"], req["work"])
    trees = []
    try:
        for bind in req.get("binds", []):
            tree = _check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, bind["source"].encode(),
                                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree")
            try:
                # The bind's mount point, made in the overlay's upper before anything else sees it.
                # The layers below came from a sandbox: a component that is not a real directory
                # (say /.pf planted as a symlink to a host path) is replaced, never followed.
                point = safefs.make_dirs(root, bind["target"], replace=True)
            except BaseException:
                os.close(tree)
                raise
            trees.append((tree, point))
    except BaseException:
        _close_prepared((root, trees))
        raise
    return root, trees


def _close_prepared(prepared):
    root, trees = prepared
    os.close(root)
    for tree, point in trees:
        os.close(tree)
        os.close(point)


def _move_mount_onto(mount_fd, target_fd, what):
    """Moves a detached mount onto the directory an fd names (no path is resolved)."""
    _check(libc.syscall(SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), what)


def _namespace_dir(target):
    """The directory `target` in the current mount namespace (a sandbox's, after setns), made where
    missing, resolved one component at a time below that namespace's root, never through a symlink
    the sandbox may have planted there."""
    ns_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return safefs.make_dirs(ns_root, target)
    except safefs.UnsafeEntry:
        raise SandboxRefused(f"the sandbox's {target} is not a directory (something else was put on the way): "
                             "podflare keeps its fork mount points there, so it cannot fork") from None
    finally:
        os.close(ns_root)


class SandboxRefused(Exception):
    """What the sandbox did makes the operation impossible (its message says what to do)."""


def _attach(prepared, pid, target):
    root, trees = prepared
    try:
        with InNamespace(pid) if pid else contextlib.nullcontext():
            if pid:
                where = _namespace_dir(target)
            else:  # a path of the server's own, on the host
                os.makedirs(target, exist_ok=True)
                where = safefs.open_root(target)
            try:
                _move_mount_onto(root, where, "move_mount")
            finally:
                os.close(where)
            # Mount points opened below the overlay's root when it was prepared.
            for tree, point in trees:
                _move_mount_onto(tree, point, "move_mount bind")
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


def op_squash_layers(req):
    """Squashes overlay layers (`sources`, topmost first) into one new layer that, over the same
    lowers, shows exactly what they showed stacked: a path in a higher layer replaces the lower
    ones' (a whiteout included: it keeps hiding what lies further down), an opaque directory drops
    what the lower layers had in it. Deep fork chains stay one lookup deep this way.

    The topmost source is a live sandbox's upper (its processes may race every step): it is read
    only through safefs, below the source's fd, and the target is written only below its own."""
    parent, name = os.path.split(req["target"].rstrip("/"))
    parent_fd = safefs.open_root(parent)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)  # a new layer: nothing in it to replace
        dst = safefs.open_dir(parent_fd, name)
    finally:
        os.close(parent_fd)
    try:
        fresh = True
        for source in reversed(req["sources"]):  # bottom first: each higher layer overrides
            src = safefs.open_root(source)
            try:
                st = os.fstat(src)
                _squash_dir(src, dst, st, fresh)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(src)
            fresh = False
    finally:
        os.close(dst)
    return {}


def _squash_dir(src, dst, st, fresh):
    """Lays the directory `src` over `dst` (both open fds; `fresh`: dst was just made, empty): its
    mode, owner and xattrs, then each entry (directories recursively; their times once their
    contents are in place)."""
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    safefs.copy_xattrs(src, dst)  # overlayfs keeps opaque-directory marks in xattrs
    for name in safefs.scandir(src):
        est = safefs.lstat(src, name)
        if est is None:
            continue
        if stat.S_ISDIR(est.st_mode):
            try:
                child = safefs.open_dir(src, name)
            except OSError as exc:
                if exc.errno not in safefs.NOT_A_DIR:
                    continue  # gone meanwhile
                est = safefs.lstat(src, name)  # swapped for something else: copy that instead
            else:
                try:
                    _squash_subdir(child, dst, name, os.fstat(child), fresh)
                finally:
                    os.close(child)
                continue
        if est is None or stat.S_ISDIR(est.st_mode):
            continue  # still racing: the live sandbox changed it twice meanwhile
        if not fresh:
            safefs.remove_entry(dst, name)
        if stat.S_ISREG(est.st_mode):
            try:
                fd, fst = safefs.open_regular_stat(src, name)
            except OSError:
                continue  # not a regular file any more (a FIFO swapped in), or gone
            try:
                safefs.copy_file(fd, dst, name, fst)
            finally:
                os.close(fd)
        else:
            try:
                safefs.copy_node(src, dst, name, est)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL):  # gone or changed meanwhile
                    raise


def _squash_subdir(src, dst_parent, name, st, fresh):
    existing = None if fresh else safefs.lstat(dst_parent, name)
    if existing is not None and (not stat.S_ISDIR(existing.st_mode) or safefs.is_opaque(src)):
        safefs.remove_entry(dst_parent, name)
        existing = None
    if existing is None:
        os.mkdir(name, 0o700, dir_fd=dst_parent)
    dst = safefs.open_dir(dst_parent, name)
    try:
        _squash_dir(src, dst, st, existing is None)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(dst)


def op_remove_tree(req):
    """Removes a tree a sandbox made or filled (`path`: its parent is the server's own directory)."""
    path = req["path"]
    if not os.path.isabs(path) or os.path.normpath(path) in ("/", ""):
        raise ValueError(f"remove_tree needs an absolute path below a directory: {path!r}")
    safefs.remove_tree(path)
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
    """A small tmpfs at `target` in the mount namespace of `pid`, made once. The path is resolved
    below that namespace's root without following symlinks (the sandbox owns every component), and
    the tmpfs is made with the new mount API and moved onto the directory's fd: no path inside the
    sandbox (its /proc included) is trusted."""
    with InNamespace(req["pid"]):
        parent_rel, name = os.path.split(req["target"].rstrip("/"))
        parent = _namespace_dir(parent_rel)
        try:
            where = safefs.make_dirs(parent, name)
            try:
                if os.fstat(where).st_dev == os.fstat(parent).st_dev:  # not mounted yet
                    tmpfs = _tmpfs_mount_fd(int(req.get("uid", 0)), int(req.get("gid", 0)))
                    try:
                        _move_mount_onto(tmpfs, where, "mount tmpfs")
                    finally:
                        os.close(tmpfs)
            finally:
                os.close(where)
        finally:
            os.close(parent)
    return {}


def _tmpfs_mount_fd(uid, gid):
    """A detached small tmpfs owned by sandbox root (a fork child walks into its root there),
    invisible to others."""
    fs = _check(libc.syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC), "fsopen tmpfs")
    try:
        for key, value in (("mode", "0700"), ("size", "64k"), ("uid", str(uid)), ("gid", str(gid))):
            _check(libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0), f"fsconfig {key}")
        _check(libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create")
        return _check(libc.syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, 0), "fsmount tmpfs")
    finally:
        os.close(fs)


# ---- diff of two layer stacks -------------------------------------------------------------

# Bounds of one diff's reply (and of the memory the helper and the server hold for it): changed
# paths listed, bytes of their names, bytes of text diffs, entries walked. Past one, the reply
# says `truncated: true`.
MAX_DIFF_PATHS = 10_000
MAX_DIFF_PATH_BYTES = 2 << 20
MAX_DIFF_CONTENT_BYTES = 4 << 20
MAX_DIFF_WALK = 200_000
# Directories of a layer kept open during a diff (candidates come sorted: ancestors stay warm).
OPEN_DIRS_PER_LAYER = 64


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class LayerView:
    """One layer of a stack, read for a diff while its sandbox may be live: directories below its
    root are opened one component at a time without following symlinks (safefs), and the last few
    are kept open. For each directory: its fd (None where this layer has none) and whether it hides
    the lower layers' entries below it (an opaque directory, or a non-directory on the way)."""

    def __init__(self, path):
        try:
            self.fd = safefs.open_root(path)
        except FileNotFoundError:
            self.fd = None
        self.dirs = OrderedDict()

    def dir(self, rel):
        if rel == "":
            return self.fd, False
        found = self.dirs.get(rel)
        if found is not None:
            self.dirs.move_to_end(rel)
            return found
        # Down from the deepest ancestor already open (iterative: paths may be thousands deep).
        parts = rel.split("/")
        depth = len(parts) - 1
        while depth > 0 and "/".join(parts[:depth]) not in self.dirs:
            depth -= 1
        fd, hides = self.dir("/".join(parts[:depth]))
        for i in range(depth, len(parts)):
            found = (None, hides)
            if fd is not None:
                try:
                    sub = safefs.open_dir(fd, parts[i])
                    found = (sub, hides or safefs.is_opaque(sub))
                except OSError as exc:
                    if exc.errno in safefs.NOT_A_DIR:
                        found = (None, True)  # a file, whiteout or symlink hides what lies below
                    elif exc.errno != errno.ENOENT:
                        raise
            self._remember("/".join(parts[:i + 1]), found)
            fd, hides = found
        return found

    def _remember(self, rel, found):
        self.dirs[rel] = found
        if len(self.dirs) > OPEN_DIRS_PER_LAYER:
            _, (old_fd, _) = self.dirs.popitem(last=False)
            if old_fd is not None:
                os.close(old_fd)

    def close(self):
        for fd, _ in self.dirs.values():
            if fd is not None:
                os.close(fd)
        self.dirs.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Entry:
    """An entry of a merged view: the layer holding it, its directory and name there, its lstat."""

    def __init__(self, view, parent, name, st):
        self.view, self.parent, self.name, self.st = view, parent, name, st

    def dir_fd(self):
        fd, _ = self.view.dir(self.parent)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, f"{self.parent}: gone")
        return fd

    def open(self):
        """Its contents: a regular file, the same inode the stat saw (a FIFO swapped in is refused)."""
        return safefs.open_regular(self.dir_fd(), self.name, self.st)

    def readlink(self):
        return os.readlink(self.name, dir_fd=self.dir_fd())


def resolve(views, rel):
    """The entry `rel` (relative path) of the merged view of a stack (LayerViews, topmost first),
    or None (absent, or a whiteout)."""
    parent, _, name = rel.rpartition("/")
    for view in views:
        fd, hides = view.dir(parent)
        if fd is not None:
            st = safefs.lstat(fd, name)
            if st is not None:
                return None if _is_whiteout(st) else Entry(view, parent, name, st)
        if hides:  # an opaque directory or a non-directory on the way hides the lower layers
            return None
    return None


def _walk(view, prefixes, into, limit):
    """Adds to `into` the relative paths of the entries of one layer (without /.pf), restricted
    to the given path prefixes, until it holds `limit`; says whether it stopped there. Depth first
    with an explicit stack holding one open directory per level (any depth, bounded fds)."""
    if view.fd is None:
        return False

    def wanted(rel):
        return prefixes is None or any(rel == p or rel.startswith(p + "/") or p.startswith(rel + "/") for p in prefixes)

    def entries(fd):
        with os.scandir(fd) as it:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]

    top = os.dup(view.fd)
    stack = [("", top, entries(top))]  # (relative path, fd, entries not yet looked at)
    try:
        while stack:
            rel_dir, fd, todo = stack[-1]
            if not todo:
                stack.pop()
                os.close(fd)
                continue
            name, is_dir = todo.pop()
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel == ".pf" or not wanted(rel):
                continue
            if len(into) >= limit:
                return True
            into.add(rel)
            if is_dir:
                try:
                    sub = safefs.open_dir(fd, name)
                except OSError:
                    continue  # swapped for a non-directory, or gone: not entered
                try:
                    stack.append((rel, sub, entries(sub)))
                except BaseException:
                    os.close(sub)
                    raise
        return False
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def _same_content(a, b, chunk=1 << 20):
    sa, sb = a.st, b.st
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True
    try:
        if stat.S_ISLNK(sa.st_mode):
            return a.readlink() == b.readlink()
        if not stat.S_ISREG(sa.st_mode):
            return sa.st_rdev == sb.st_rdev
        if sa.st_size != sb.st_size:
            return False
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return True
        fa = a.open()
        try:
            fb = b.open()
            try:
                return safefs.same_bytes(fa, fb, chunk)
            finally:
                os.close(fb)
        finally:
            os.close(fa)
    except OSError:
        return False  # changed, replaced (a FIFO swapped in) or gone while compared: it differs


def _text_diff(rel, a, b, cap):
    def read(entry):
        if entry is None:
            return ""
        if not stat.S_ISREG(entry.st.st_mode):
            return None
        try:
            fd = entry.open()
        except OSError:
            return None  # not a regular file any more
        try:
            data = safefs.read_capped(fd, cap)
        finally:
            os.close(fd)
        if data is None:
            return False
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
    views = {}
    try:
        for layer in req["a"] + req["b"]:
            if layer not in views:
                views[layer] = LayerView(layer)
        return _diff(req, [views[layer] for layer in a + b], [views[layer] for layer in req["a"]],
                     [views[layer] for layer in req["b"]])
    finally:
        for view in views.values():
            view.close()


def _diff(req, unshared, stack_a, stack_b):
    prefixes = None
    if req.get("paths"):
        prefixes = [p.strip("/") for p in req["paths"]]
        if "" in prefixes:
            prefixes = None
    truncated = False
    candidates = set()
    for view in dict.fromkeys(unshared):
        if _walk(view, prefixes, candidates, MAX_DIFF_WALK):
            truncated = True
            break
    added, removed, modified, content, binary, too_large = [], [], [], {}, [], []
    cap = int(req.get("max_content_bytes", 256 * 1024))
    listed = path_bytes = content_bytes = 0
    for rel in sorted(candidates):
        if prefixes is not None and not any(rel == p or rel.startswith(p + "/") for p in prefixes):
            continue
        ea, eb = resolve(stack_a, rel), resolve(stack_b, rel)
        if ea is None and eb is None:
            continue
        path = "/" + rel
        if ea is None:
            changed = added
        elif eb is None:
            changed = removed
        elif not _same_content(ea, eb):
            if stat.S_ISDIR(ea.st.st_mode) and stat.S_ISDIR(eb.st.st_mode):
                continue
            changed = modified
        else:
            continue
        listed += 1
        path_bytes += len(path)
        if listed > MAX_DIFF_PATHS or path_bytes > MAX_DIFF_PATH_BYTES:
            truncated = True
            break
        changed.append(path)
        regular_or_absent = all(e is None or stat.S_ISREG(e.st.st_mode) for e in (ea, eb))
        if req.get("content") and regular_or_absent:
            verdict = _text_diff(rel, ea, eb, min(cap, MAX_DIFF_CONTENT_BYTES - content_bytes))
            if "diff" in verdict and content_bytes + len(verdict["diff"]) <= MAX_DIFF_CONTENT_BYTES:
                content[path] = verdict["diff"]
                content_bytes += len(verdict["diff"])
            elif verdict.get("binary"):
                binary.append(path)
            else:
                too_large.append(path)
                truncated = truncated or content_bytes + cap > MAX_DIFF_CONTENT_BYTES
    out = {"added": added, "removed": removed, "modified": modified}
    if req.get("content"):
        out.update(content=content, binary=binary, too_large=too_large)
    if truncated:
        out["truncated"] = True
    return out


def op_template_layer(req):
    """A template's layer copied from a live sandbox's tree (podflare_template_layer.py)."""
    copied = podflare_template_layer.copy_tree(req["source"], req["target"], int(req["base"]), int(req["count"]),
                                               int(req["max_bytes"]), int(req["max_entries"]), int(req["max_depth"]))
    return {"bytes": copied}


OPS = {"idmap": op_idmap, "squash_layers": op_squash_layers, "subvolume": op_subvolume, "disk_limit": op_disk_limit, "overlay": op_overlay, "overlay_prepare": op_overlay_prepare, "overlay_attach": op_overlay_attach, "overlay_discard": op_overlay_discard, "unmount": op_unmount, "tmpfs": op_tmpfs, "diff": op_diff, "remove_tree": op_remove_tree, "template_layer": op_template_layer}


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
