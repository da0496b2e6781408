"""Copy-on-write fork of a live sandbox, the in-sandbox half (stdlib only).

The worker (the interpreter holding the user's state) forks once per child. Each child becomes
PID 1 of a new pid namespace, takes new mount, uts, ipc and network namespaces, switches its root
to the overlay the server prepared for it (grafted at `/.pf/spawn/<id>` in the parent's mount
namespace for the moment of the fork), reopens inherited file handles in its own filesystem,
reseeds its random generators and becomes a full sandbox: supervisor (this process, PID 1) plus
worker (a fork of it that keeps the interpreter's memory, shared copy-on-write with the parent).

Why these steps (see shared/reference/machine-and-mechanisms.md):
- fds, cwd and mmaps still point into the parent's filesystem after fork: regular files are
  reopened by path and offset in the child's root, the cwd is re-entered by path;
- sockets are shared with the parent: they are closed in the child (documented);
- numpy's global RNG and `random` are not reseeded by fork: both are reseeded here;
- a new proc instance may only be mounted while a fully visible one is still in the namespace,
  so /proc is mounted before the old root is detached.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any, Callable

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_RDONLY, MS_REMOUNT = 1, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86-64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

AGENT_RUN_DIR = '/.pf/run'
AGENT_SOCKET = AGENT_RUN_DIR + '/agent.sock'


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f'{what}: {os.strerror(err)}')
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                       flags, data.encode() if data else None), f'mount {target}')


def spawn(child: Callable[[], None]) -> int:
    """Forks a child that is PID 1 of a new pid namespace; the caller's own pid namespace for
    later children is restored. `child` runs in the child and must never return."""
    own = os.open('/proc/self/ns/pid_for_children', os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWPID), 'unshare(CLONE_NEWPID)')
        try:
            pid = os.fork()
        finally:
            if os.getpid() != 1:
                _check(_libc.setns(own, CLONE_NEWPID), 'setns back to the own pid namespace')
        if pid == 0:
            try:
                child()
            except BaseException as exc:  # noqa: BLE001 - report and die, never return into the parent's code
                try:
                    os.write(2, f'podflare fork child failed: {type(exc).__name__}: {exc}\n'.encode())
                except OSError:
                    pass
            os._exit(70)
        return pid
    finally:
        os.close(own)


def capture_files(keep: set[int]) -> tuple[list[tuple[int, str, int, int]], list[int]]:
    """The regular files this process has open (fd, path, flags, offset), read while the parent's
    filesystem is still the one in view, and its sockets (fds) for the children to close. `keep`
    is left alone. Read once in the parent, before its children are forked."""
    files = []
    sockets = []
    for name in os.listdir('/proc/self/fd'):
        fd = int(name)
        if fd in keep or fd <= 2:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            sockets.append(fd)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            path = os.readlink(f'/proc/self/fd/{fd}')
            with open(f'/proc/self/fdinfo/{fd}') as info:
                fields = dict(line.split(':', 1) for line in info if ':' in line)
            flags = int(fields['flags'].strip(), 8)
            pos = int(fields['pos'].strip())
        except (OSError, KeyError, ValueError):
            continue
        if path.endswith(' (deleted)') or not path.startswith('/'):
            continue
        files.append((fd, path, flags, pos))
    return files, sockets


def close_fds(fds: list[int]) -> None:
    """In a child: the parent's sockets are shared with it, never inherited (documented)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def restore_files(files: list[tuple[int, str, int, int]]) -> None:
    """Reopens each captured file by path in the new root, at the same fd number and offset."""
    drop = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY
    for fd, path, flags, pos in files:
        try:
            new = os.open(path, flags & ~drop)
        except OSError:
            continue  # the file is gone in this root: leave the old handle (read-only view of the past)
        try:
            if not flags & os.O_APPEND:
                os.lseek(new, pos, os.SEEK_SET)
            os.dup2(new, fd, inheritable=not flags & os.O_CLOEXEC)
        finally:
            os.close(new)


def _loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack('16sH14s', b'lo', 0, b'')
        flags = struct.unpack('16sH14s', fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack('16sH14s', b'lo', flags | IFF_UP, b''))


def enter_namespaces(hostname: str) -> None:
    """New mount/uts/ipc/net namespaces (the network one with its loopback up)."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET), 'unshare')
    _mount(None, '/', None, MS_REC | MS_PRIVATE)  # nothing we do here may reach the parent
    name = hostname.encode()
    _check(_libc.sethostname(name, len(name)), 'sethostname')
    _loopback_up()


def protect_proc(proc: str = '/proc') -> None:
    """Makes the kernel's global knobs under /proc read-only in this mount namespace.

    Defense in depth only: sandbox root is an unprivileged host uid, which the kernel already
    refuses global sysctls; with CAP_SYS_ADMIN in its own user namespace it could unmount these
    covers, and that is all it would gain."""
    for path in (f'{proc}/sys', f'{proc}/sysrq-trigger'):
        try:
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError:
            pass


ROOT_READY_SIGNAL = signal.SIGUSR2
ROOT_WAIT_SECONDS = 60.0


def block_root_ready_signal() -> None:
    """Held pending until wait_for_root, so a signal sent early is not lost (nor fatal)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {ROOT_READY_SIGNAL})


def wait_for_root(root: str) -> None:
    """Waits until the server has mounted this child's root at `root` (in this child's own mount
    namespace) and said so with ROOT_READY_SIGNAL. The server's socket, bound inside the new
    root, is the proof: a stray signal from code in the parent sandbox only means another look."""
    deadline = time.monotonic() + ROOT_WAIT_SECONDS
    while not os.path.exists(root + AGENT_SOCKET):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError('the server did not mount this fork child\'s root')
        signal.sigtimedwait([ROOT_READY_SIGNAL], left)
    while signal.sigtimedwait([ROOT_READY_SIGNAL], 0) is not None:
        pass  # extra ones must not stay pending: once unblocked, their default action is to kill
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {ROOT_READY_SIGNAL})


def switch_root(root: str) -> None:
    """`root` (mounted by the server) becomes /, with a fresh /proc and the sandbox's /dev."""
    _mount('proc', f'{root}/proc', 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)
    protect_proc(f'{root}/proc')
    os.makedirs(f'{root}/dev', exist_ok=True)
    _mount('/dev', f'{root}/dev', None, MS_BIND | MS_REC)
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b'.', b'.'), 'pivot_root')
    _check(_libc.umount2(b'.', MNT_DETACH), 'detach the old root')
    os.chdir('/')


def enter_new_root(root: str, hostname: str) -> None:
    """New mount/uts/ipc/net namespaces, then `root` (already mounted by the server) becomes /."""
    enter_namespaces(hostname)
    switch_root(root)


def reseed() -> None:
    """Fresh randomness per child: the kernel's is fresh by nature; the interpreters' is not."""
    import random
    random.seed()
    np = sys.modules.get('numpy')
    if np is not None:
        try:
            np.random.seed(int.from_bytes(os.urandom(4), 'little'))
        except Exception:  # noqa: BLE001 - an exotic numpy must not break the fork
            pass


RNDADDENTROPY = 0x40085203   # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207       # _IO('R', 0x07)


def add_entropy(data: bytes) -> None:
    """Mixes `data` into the kernel's pool, credited as entropy, and reseeds the CRNG at once,
    so /dev/urandom differs between clones of one VM snapshot right away (needs root)."""
    fd = os.open('/dev/urandom', os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack('ii', len(data) * 8, len(data)) + data)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def connect_server() -> socket.socket:
    """Connects to the server through the socket directory it bound at /.pf/run (overlayfs
    cannot carry a listening socket), then drops that mount: user code never sees it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(AGENT_SOCKET)
    _libc.umount2(AGENT_RUN_DIR.encode(), MNT_DETACH)
    return sock


# ---- the interpreter's variables, for diff(vars=1) ------------------------------------------

def _fingerprint(value: Any) -> str:
    import hashlib
    import pickle
    try:
        data = pickle.dumps(value, protocol=4)
        if len(data) <= 256 * 1024 * 1024:
            return hashlib.sha1(data).hexdigest()
    except Exception:  # noqa: BLE001 - unpicklable: fall back to the repr
        pass
    try:
        return 'repr:' + hashlib.sha1(repr(value).encode('utf-8', 'replace')).hexdigest()
    except Exception:  # noqa: BLE001
        return f'id:{id(value)}'


def snapshot_vars(ns: dict[str, Any]) -> dict[str, dict[str, str]]:
    """name -> {type, repr (short), fp}: the user's globals, without modules, dunders and builtins."""
    import types
    out: dict[str, dict[str, str]] = {}
    for name, value in list(ns.items()):
        if name.startswith('_') or isinstance(value, types.ModuleType):
            continue
        try:
            text = repr(value)
        except Exception as exc:  # noqa: BLE001
            text = f'<repr failed: {type(exc).__name__}>'
        if len(text) > 200:
            text = text[:197] + '...'
        kind = type(value)
        out[name] = {'type': f'{kind.__module__}.{kind.__qualname__}' if kind.__module__ != 'builtins' else kind.__qualname__,
                     'repr': text, 'fp': _fingerprint(value)}
    return out


__all__ = ['protect_proc', 'spawn', 'block_root_ready_signal', 'wait_for_root', 'capture_files', 'close_fds', 'restore_files', 'enter_namespaces', 'switch_root', 'enter_new_root', 'reseed', 'connect_server', 'snapshot_vars', 'errno']
