"""Every host-side file operation on a tree a sandbox controls, done so that the sandbox cannot
redirect it. Used by the host helper (podflare_hostd.py), which runs as host root.

Threat model
------------
Code in a sandbox is hostile, and it keeps running while the host works on its files: background
processes, in the sandbox itself or in a fork child, race every step. Trees it controls:
  - its upper layer (<state>/sandboxes/<id>/upper), read while the sandbox is live (diff, the
    fork's freeze of the parent's upper);
  - the overlay root of a sandbox or fork child (where `/.pf/run` is made and bound);
  - the root of its mount namespace (where `/.pf/spawn` is made and mounted);
  - fork layers and trash entries: written by the host, but their contents (names, symlinks,
    modes, xattrs) were chosen by the sandbox, and a process that survives its sandbox may still
    write to an ended sandbox's directory.
Within those trees the sandbox can, at any moment: put a symlink (absolute, relative or a
/proc magic link) in any component of a path; exchange a directory with a symlink
(renameat2(RENAME_EXCHANGE)) between two steps of a walk; put a FIFO, socket or device where a
regular file was (opening a FIFO blocks forever); make a file whose st_size lies (procfs reports 0).

What this module guarantees, as long as the caller names the ROOT of such a tree by a path the
sandbox cannot change (a directory of the server's, or an fd it holds):
  - No path is ever resolved across a sandbox-made name in one go. A walk opens one component at a
    time below a directory fd with O_NOFOLLOW|O_DIRECTORY (a symlink, magic link or non-directory
    fails the step), so every operation stays below the root it started from, whatever is swapped.
  - stat, readlink, mkdir, symlink, mknod, chown, utime and unlink act on a name in a directory fd
    (follow_symlinks=False), or on an fd opened with O_NOFOLLOW.
  - File contents are read only from regular files: opened O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_NOCTTY
    (a FIFO does not block), then fstat'd: anything but a regular file, or a different inode than
    the stat that chose it, is refused. Reads stop at a byte cap counted on what was read.
  - Device nodes are never copied, except overlayfs whiteouts (character device 0/0).
  - Removal is fd-relative (unlinkat below directory fds opened without following symlinks),
    iterative, with a bounded number of open directories (deeper subtrees are first moved up to
    the top of the tree being removed, a rename between two fds of ours).
A redirect can therefore reach only what lies below the root it started from: at worst, the
sandbox's own files, which it could change itself anyway.

Why one component at a time rather than openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS): it refuses
the same things (a symlink or magic link anywhere, ".."), works on any kernel, and tells a
missing component from one that is not a directory, which overlay semantics need (a non-directory
in a higher layer hides the lower layers' tree). Inside a sandbox's mount namespace (after setns)
the caller starts from an fd of that namespace's root; no path through the sandbox's /proc is used.
"""
import errno
import os
import stat

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# Errors of opening a component that exists but is not a directory to walk into.
NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)
COPY_CHUNK = 1 << 30


class UnsafeEntry(OSError):
    """An entry is not what the operation may touch (a symlink or special file where a directory
    or a regular file must be, or a different inode than the one chosen)."""

    def __init__(self, what):
        super().__init__(errno.EPERM, what)


def _check_name(name):
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafeEntry(f"not a plain file name: {name!r}")


def open_root(path):
    """The fd of a tree's root, named by a trusted path: the server's own directories (a sandbox's
    directory, its upper, a fork layer, an image layer, the trash), which no sandbox can replace.
    Only what lies below is the sandbox's."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(dir_fd, name):
    """The directory `name` below `dir_fd`, never through a symlink."""
    _check_name(name)
    return os.open(name, O_DIR, dir_fd=dir_fd)


def make_dirs(dir_fd, rel, mode=0o755, replace=False):
    """The directory at `rel` below `dir_fd`, made where missing. A component that exists but is
    not a directory (a symlink, a file) is replaced by one if `replace`, else refused."""
    fd = os.dup(dir_fd)
    try:
        for name in [p for p in rel.split("/") if p]:
            _check_name(name)
            try:
                nxt = os.open(name, O_DIR, dir_fd=fd)
            except FileNotFoundError:
                _mkdir_quiet(fd, name, mode)
                nxt = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in NOT_A_DIR:
                    raise
                if not replace:
                    raise UnsafeEntry(f"{rel}: {name} is not a directory") from None
                remove_entry(fd, name)
                _mkdir_quiet(fd, name, mode)
                nxt = os.open(name, O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mkdir_quiet(dir_fd, name, mode):
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass  # made meanwhile; the open that follows checks what it is


def lstat(dir_fd, name):
    """The entry `name` of a directory fd (a symlink is not followed), or None."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_regular(dir_fd, name, expected=None):
    """An fd of the regular file `name`: never a FIFO, device, socket or symlink, and (given the
    stat that chose it) the same inode."""
    return open_regular_stat(dir_fd, name, expected)[0]


def open_regular_stat(dir_fd, name, expected=None):
    """open_regular, and the fstat of what it opened."""
    _check_name(name)
    fd = os.open(name, O_FILE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(f"{name}: not a regular file")
        if expected is not None and (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
            raise UnsafeEntry(f"{name}: replaced while being read")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def read_capped(fd, cap):
    """At most `cap` bytes of an open file; None if it holds more (counted on what was read, never
    on st_size, which procfs and other special files report as 0)."""
    chunks, total = [], 0
    while True:
        data = os.read(fd, min(1 << 20, cap + 1 - total))
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if total > cap:
            return None


def same_bytes(fd_a, fd_b, chunk=1 << 20):
    while True:
        a, b = os.read(fd_a, chunk), os.read(fd_b, chunk)
        if a != b:
            return False
        if not a:
            return True


def scandir(dir_fd):
    """The entries of an open directory (names only: each is stat'd by the caller, no symlink
    followed)."""
    with os.scandir(dir_fd) as it:
        return [e.name for e in it]


# ---- xattrs ------------------------------------------------------------------------------------

def get_xattr(target, name):
    """One xattr of an fd, or of a '/proc/self/fd/N/name' path (not followed); None if unset."""
    try:
        return os.getxattr(target, name, follow_symlinks=False) if isinstance(target, str) else os.getxattr(target, name)
    except OSError:
        return None


def copy_xattrs(src, dst):
    """All xattrs (overlayfs keeps opaque-directory marks there) from one fd to another, or between
    '/proc/self/fd/N/name' entries for symlinks and special files (which cannot be opened)."""
    by_path = isinstance(src, str)
    try:
        names = os.listxattr(src, follow_symlinks=False) if by_path else os.listxattr(src)
    except OSError:
        return
    for name in names:
        try:
            if by_path:
                os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
            else:
                os.setxattr(dst, name, os.getxattr(src, name))
        except OSError:
            pass


def _entry_path(dir_fd, name):
    """A path naming entry `name` of an open directory, for calls without a dir_fd form (xattrs of
    symlinks): resolved through our own fd, its last component not followed."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def is_opaque(dir_fd):
    return any(get_xattr(dir_fd, n) == b"y" for n in ("trusted.overlay.opaque", "user.overlay.opaque"))


# ---- copy and remove ---------------------------------------------------------------------------

def copy_file(src_fd, dst_dir_fd, name, st):
    """A new regular file `name` in `dst_dir_fd` with the contents of `src_fd` (a reflink on the
    same btrfs volume), its mode, owner, xattrs and times."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_dir_fd)
    try:
        remaining = st.st_size
        while remaining > 0:
            try:
                n = os.copy_file_range(src_fd, out, min(remaining, COPY_CHUNK))
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                n = os.sendfile(out, src_fd, None, min(remaining, COPY_CHUNK))
            if n == 0:
                break
            remaining -= n
        os.fchown(out, st.st_uid, st.st_gid)
        os.fchmod(out, stat.S_IMODE(st.st_mode))
        copy_xattrs(src_fd, out)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out)


def copy_node(src_dir_fd, dst_dir_fd, name, st):
    """A symlink, whiteout, FIFO or socket `name` copied from one directory fd to another (with its
    owner, xattrs and times). Other device nodes are not copied: no sandbox may plant one."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=src_dir_fd), name, dir_fd=dst_dir_fd)
    elif (stat.S_ISCHR(mode) and st.st_rdev == 0) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        os.mknod(name, mode, st.st_rdev, dir_fd=dst_dir_fd)
    else:
        return False
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir_fd, follow_symlinks=False)
    copy_xattrs(_entry_path(src_dir_fd, name), _entry_path(dst_dir_fd, name))
    if not stat.S_ISLNK(mode):
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir_fd, follow_symlinks=False)
    return True


# Directories held open at once while removing a tree; a deeper subtree is moved up to the tree's
# top first (a rename between two fds of ours), so any depth is removed with bounded fds.
REMOVE_DEPTH = 128


def remove_entry(dir_fd, name, retries=3):
    """Removes `name` from an open directory, recursively for a directory: fd-relative all the way
    down (a directory swapped for a symlink mid-walk is unlinked, never followed), iterative (any
    depth). Something still writing there is raced for a while, then the error is raised."""
    _check_name(name)
    budget = [RACE_BUDGET]
    top = _open_or_unlink(dir_fd, name, budget)
    if top is None:
        return
    # Each level: (its parent's fd, its name, its fd, names still to remove in it).
    stack = [(dir_fd, name, top, scandir(top))]
    moved = 0
    try:
        while stack:
            parent, dname, fd, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                _rmdir_or_retry(parent, dname, retries)
                continue
            child = names.pop()
            if len(stack) >= REMOVE_DEPTH and (st := lstat(fd, child)) is not None and stat.S_ISDIR(st.st_mode):
                moved += 1
                up = f".pf-removing-{moved}-{os.urandom(4).hex()}"
                os.rename(child, up, src_dir_fd=fd, dst_dir_fd=top)
                stack[0][3].append(up)
                continue
            sub = _open_or_unlink(fd, child, budget)
            if sub is not None:
                try:
                    stack.append((fd, child, sub, scandir(sub)))
                except BaseException:
                    os.close(sub)
                    raise
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


# Times an entry may change type under a removal (a live writer exchanging names) before it gives up.
RACE_BUDGET = 10_000


def _open_or_unlink(dir_fd, name, budget):
    """A directory entry on its way out: a directory is opened (never through a symlink) and its
    fd returned; anything else is unlinked (None). An entry that keeps changing between the two is
    tried again while the budget lasts."""
    while True:
        try:
            return open_dir(dir_fd, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno not in NOT_A_DIR:
                raise
        try:
            os.unlink(name, dir_fd=dir_fd)
            return None
        except FileNotFoundError:
            return None
        except IsADirectoryError:  # a directory again by now
            budget[0] -= 1
            if budget[0] < 0:
                raise


def _rmdir_or_retry(dir_fd, name, retries):
    """Removes the directory just emptied; a live writer may have exchanged it with something else
    under the same name meanwhile (then that goes: unlinked, or emptied in turn)."""
    for _ in range(RACE_BUDGET):
        try:
            os.rmdir(name, dir_fd=dir_fd)
            return
        except FileNotFoundError:
            return
        except NotADirectoryError:
            try:
                os.unlink(name, dir_fd=dir_fd)
                return
            except FileNotFoundError:
                return
            except IsADirectoryError:
                continue  # a directory again by now
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and retries:
                return remove_entry(dir_fd, name, retries - 1)  # something was added meanwhile: once more
            raise
    raise OSError(errno.EBUSY, f"{name}: keeps changing while being removed")


def _unlink_quiet(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_tree(path):
    """Removes the tree at `path` (its parent named by a trusted path; the tree itself may hold
    anything a sandbox made). Missing is fine."""
    parent, name = os.path.split(os.path.normpath(path))
    try:
        parent_fd = open_root(parent or "/")
    except FileNotFoundError:
        return
    try:
        remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)
