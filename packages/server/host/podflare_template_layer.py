"""A template's layer copied from a live sandbox's files (POST /v1/sandboxes/:id/template).

The source is a sandbox's own layer (its upper, or a squash of its upper and fork layers): every
name, type, mode, owner and xattr in it was chosen by code in the sandbox, which may still be
running and changing it while we copy (podflare_safefs.py's threat model applies as it stands).
The target is a new directory of the server's in the images directory, which every later sandbox
of the template mounts read-only (through an idmapped view) below its own upper.

What this copy guarantees on top of safefs's walk:
  - Nothing outside the source tree is read: symlinks are copied as symlinks (their target is
    resolved later, inside the sandboxes that use the template, never on the host); FIFOs and
    sockets are copied as such (never opened); device nodes other than overlay whiteouts are
    dropped; a regular file is read only through an fd opened O_NOFOLLOW|O_NONBLOCK and fstat'd.
  - Bounded: at most `max_bytes` of regular-file contents (counted on each file's size as opened,
    so a sparse file whose apparent size is huge is refused, not expanded onto the images disk),
    at most `max_entries` entries and `max_depth` directory levels. Past a bound the copy stops
    with TemplateTooLarge and the caller removes what was copied.
  - Owners are shifted back from the sandbox's host range (base..base+count-1) to 0..count-1,
    the on-disk ids of image layers (which sandboxes see through an idmapped mount at base+n);
    an id outside the range becomes nobody (65534). Modes (set-id bits included) are kept, so the
    target's parent directory must be root-only: the caller makes it 0700.
  - Hard links become separate files (each counted); a file that grows while copied is cut at
    the size it had when opened; an entry that changes type mid-copy is skipped or copied as what
    it became, never followed.
"""
import errno
import os
import stat

import podflare_safefs as safefs

NOBODY = 65534


class TemplateTooLarge(OSError):
    """The sandbox's files exceed a bound of the copy (bytes, entries or depth)."""

    def __init__(self, what):
        super().__init__(errno.EFBIG, what)


class _Budget:
    def __init__(self, max_bytes, max_entries, max_depth):
        self.bytes_left = max_bytes
        self.entries_left = max_entries
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.max_entries = max_entries

    def entry(self):
        self.entries_left -= 1
        if self.entries_left < 0:
            raise TemplateTooLarge(f"the sandbox holds more than {self.max_entries} files and directories")

    def take(self, n):
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise TemplateTooLarge(f"the sandbox's files (sparse files counted at their full size) exceed {self.max_bytes} bytes")


def copy_tree(source, target, base, count, max_bytes, max_entries, max_depth):
    """Copies the tree at `source` (a trusted path naming a sandbox-controlled tree's root) into
    a new directory `target` (its parent a trusted directory of the server's). Returns the bytes
    of regular files copied."""
    budget = _Budget(max_bytes, max_entries, max_depth)
    parent, name = os.path.split(target.rstrip("/"))
    parent_fd = safefs.open_root(parent)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)  # new: a leftover of ours is an error, not reused
        dst = safefs.open_dir(parent_fd, name)
    finally:
        os.close(parent_fd)
    try:
        src = safefs.open_root(source)
        try:
            _copy_dir(src, dst, os.fstat(src), base, count, budget, 0)
        finally:
            os.close(src)
    finally:
        os.close(dst)
    return max_bytes - budget.bytes_left


def _owner(st, base, count):
    def shift(i):
        return i - base if base <= i < base + count else NOBODY
    return shift(st.st_uid), shift(st.st_gid)


def _copy_dir(src, dst, st, base, count, budget, depth):
    if depth > budget.max_depth:
        raise TemplateTooLarge(f"the sandbox's directories nest deeper than {budget.max_depth} levels")
    for name in safefs.scandir(src):
        budget.entry()
        est = safefs.lstat(src, name)
        if est is None:
            continue  # gone meanwhile
        if stat.S_ISDIR(est.st_mode):
            try:
                child = safefs.open_dir(src, name)
            except OSError as exc:
                if exc.errno not in safefs.NOT_A_DIR:
                    continue
                est = safefs.lstat(src, name)  # swapped for something else: copy that instead
            else:
                try:
                    os.mkdir(name, 0o700, dir_fd=dst)
                    sub = safefs.open_dir(dst, name)
                    try:
                        _copy_dir(child, sub, os.fstat(child), base, count, budget, depth + 1)
                    finally:
                        os.close(sub)
                finally:
                    os.close(child)
                continue
        if est is None or stat.S_ISDIR(est.st_mode):
            continue  # still racing
        if stat.S_ISREG(est.st_mode):
            _copy_regular(src, dst, name, base, count, budget)
        else:
            _copy_special(src, dst, name, est, base, count)
    # The directory's own attributes last: its mode may deny writing into it.
    uid, gid = _owner(st, base, count)
    os.fchown(dst, uid, gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    safefs.copy_xattrs(src, dst)  # overlayfs keeps opaque-directory marks in xattrs
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_regular(src, dst, name, base, count, budget):
    try:
        fd, st = safefs.open_regular_stat(src, name)
    except OSError:
        return  # not a regular file any more (a FIFO swapped in), or gone
    try:
        budget.take(st.st_size)
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst)
        try:
            remaining = st.st_size
            while remaining > 0:
                try:
                    n = os.copy_file_range(fd, out, min(remaining, safefs.COPY_CHUNK))
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    n = os.sendfile(out, fd, None, min(remaining, safefs.COPY_CHUNK))
                if n == 0:
                    break  # shrunk meanwhile
                remaining -= n
            uid, gid = _owner(st, base, count)
            os.fchown(out, uid, gid)  # before the mode: a chown clears set-id bits
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            safefs.copy_xattrs(fd, out)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _copy_special(src, dst, name, st, base, count):
    """A symlink (copied as a link, never followed), whiteout, FIFO or socket. Other device nodes
    are dropped: a sandbox cannot make one, and a template must not carry one."""
    mode = st.st_mode
    try:
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        elif (stat.S_ISCHR(mode) and st.st_rdev == 0) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.mknod(name, mode, st.st_rdev, dir_fd=dst)
        else:
            return
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):
            return  # gone or changed meanwhile (readlink of what is no longer a link)
        raise
    uid, gid = _owner(st, base, count)
    os.chown(name, uid, gid, dir_fd=dst, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dst)  # just made by us, not a link: mknod's mode met the umask
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
