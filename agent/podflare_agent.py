#!/usr/bin/python3
"""Podflare in-sandbox agent.

The agent is two processes:

* the **supervisor** (the process the server launches) speaks the channel protocol over fd 3
  (JSON lines; defined in packages/protocol/src/agent.ts, explained in docs/protocol.md). It does
  file operations, runs bash commands, watches the worker and enforces timeouts. It never runs
  user code, so user code cannot take the channel down.
* the **worker**, forked from the supervisor, runs user Python code in one persistent namespace.
  Its fd 1 and 2 are pipes read by the supervisor (fd-level capture: C extensions and child
  processes are caught too), and a private pair of pipes carries JSON-line commands and results.

The supervisor is a single-threaded `selectors` loop; the worker is single-threaded too, so that it
can itself be fork()ed later for copy-on-write sandbox forks. Standard library only (Python 3.11).
"""
from __future__ import annotations

import ast
import base64
import binascii
import builtins
import codecs
import errno
import importlib
import importlib.util
import io
import json
import linecache
import os
import re
import secrets
import select
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import podflare_fork

PROTOCOL_VERSION = 1
AGENT_DIR = os.path.dirname(os.path.abspath(__file__))
AGENT_FILE = os.path.abspath(__file__)
#: Relative paths are taken from here, and it is the default working directory.
HOME = os.environ.get('PODFLARE_AGENT_HOME', '/root')
#: How long an interrupted exec may take to stop before its process (group) is killed.
INTERRUPT_GRACE_S = int(os.environ.get('PODFLARE_INTERRUPT_GRACE_MS', '2000')) / 1000
MPL_BACKEND = 'module://podflare_mpl_backend'
#: A fork child starts its worker on the first request that needs it, or after this idle time.
FORK_CHILD_WORKER_DELAY_S = 0.05
FORK_CHILD = False  # set in a sandbox made by fork: its supervisor holds the parent's memory

READ_CHUNK = 64 * 1024            # one stdout/stderr message carries at most one read of this size
CHANNEL_READ = 1024 * 1024
MAX_LINE = 64 * 1024 * 1024       # longer request lines are answered with bad_request and dropped
MAX_FILE_READ = 16 * 1024 * 1024  # file_read answers at most this many bytes
IDLE_OUTPUT_CAP = 1024 * 1024     # output produced between execs kept for the next exec
# What one exec may send (characters of stdout and stderr together): past it the output is read
# and dropped, so the code still runs to its end, and a notice closes the exec's stderr.
EXEC_OUTPUT_CAP = int(os.environ.get('PODFLARE_MAX_EXEC_OUTPUT_BYTES') or 64 * 1024 * 1024)
CO_COROUTINE = 0x0080             # code flag of a cell compiled with top-level await
TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
SIMPLE_TYPES = (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

class AgentError(Exception):
    """An error answer: `code` is one of the stable codes of packages/protocol/src/errors.ts."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def bad_request(message: str) -> AgentError:
    return AgentError('bad_request', message)


def encode_line(obj: Any) -> bytes:
    """One JSON line. Lone surrogates (undecodable file names) cannot be UTF-8 encoded; such
    messages fall back to ASCII escapes, which JSON.parse turns back into the same string."""
    text = json.dumps(obj, ensure_ascii=False, separators=(',', ':'))
    try:
        return text.encode('utf-8') + b'\n'
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(',', ':')).encode('ascii') + b'\n'


class LineBuffer:
    """Splits a byte stream into lines. A line longer than `limit` is dropped and reported once
    as None, so one bad line cannot exhaust memory."""

    def __init__(self, limit: int = MAX_LINE):
        self.buf = bytearray()
        self.scan = 0              # bytes before this offset hold no newline
        self.limit = limit
        self.discarding = False    # inside an over-long line: drop until its newline

    def feed(self, data: bytes) -> list[bytes | None]:
        buf = self.buf
        buf += data
        lines: list[bytes | None] = []
        start = 0
        while (end := buf.find(b'\n', max(start, self.scan))) >= 0:
            if self.discarding:
                self.discarding = False
            else:
                lines.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        self.scan = len(buf)
        if len(buf) > self.limit:
            if not self.discarding:
                lines.append(None)
            self.discarding = True
            buf.clear()
            self.scan = 0
        return lines


def resolve_path(value: Any) -> str:
    """A request path: non-empty text without NUL; relative paths are joined to HOME."""
    if not isinstance(value, str) or not value:
        raise bad_request('path must be a non-empty string')
    if '\0' in value:
        raise bad_request('path must not contain NUL')
    return value if os.path.isabs(value) else os.path.join(HOME, value)


def opt_field(req: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """An optional request field of the given type (bools are not ints here)."""
    value = req.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f'{name} has the wrong type')
    return value


def req_int(req: dict, name: str, minimum: int) -> int:
    value = opt_field(req, name, int)
    if value is None or value < minimum:
        raise bad_request(f'{name} must be an integer >= {minimum}')
    return value


def error_info(exc: BaseException) -> tuple[str, str]:
    """Maps an exception from a request handler to (code, message)."""
    if isinstance(exc, AgentError):
        return exc.code, exc.message
    if isinstance(exc, FileNotFoundError):
        return 'not_found', str(exc)
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return 'bad_request', str(exc)
    if isinstance(exc, PermissionError):
        return 'forbidden', str(exc)
    if isinstance(exc, FileExistsError):
        return 'conflict', str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.ENAMETOOLONG,
                                                  errno.ELOOP, errno.EINVAL):
        return 'bad_request', str(exc)
    # What the caller asked for cannot be done in this sandbox: the caller's problem, not ours.
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EPERM):
        return 'forbidden', str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.ETXTBSY):
        return 'conflict', str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return 'payload_too_large', str(exc)
    return 'internal', f'{type(exc).__name__}: {exc}'


def exit_code_of(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def log(message: str) -> None:
    """Diagnostics of the agent itself go to its own stderr (the server's log), never the channel."""
    try:
        sys.stderr.write(f'podflare-agent: {message}\n')
        sys.stderr.flush()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# Supervisor: files
# --------------------------------------------------------------------------------------------

@dataclass
class Upload:
    fd: int
    tmp: str
    path: str
    mode: int
    size: int = 0


class FileOps:
    """The file operations. Run by the supervisor itself, so they work while an exec runs;
    contents are streamed in chunks and never held whole in memory."""

    def __init__(self) -> None:
        self.uploads: dict[str, Upload] = {}

    def upload_begin(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        mode = opt_field(req, 'mode', int)
        parent, name = os.path.split(path)
        if not name:
            raise bad_request(f'{path} names a directory')
        os.makedirs(parent or '/', exist_ok=True)
        if mode is None:
            mode = 0o644
            try:  # replacing a file keeps its permissions (an executable script stays executable)
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    mode = stat.S_IMODE(st.st_mode)
            except OSError:
                pass
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, 'Is a directory', path)
        # The temp file lives next to the target so the final rename is atomic.
        tmp = os.path.join(parent, f'.{name[:200]}.pf-upload-{secrets.token_hex(6)}')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        handle = secrets.token_hex(8)
        self.uploads[handle] = Upload(fd, tmp, path, mode & 0o7777)
        return {'handle': handle}

    def upload_chunk(self, req: dict) -> dict:
        upload = self._upload(req)
        data = req.get('data')
        if not isinstance(data, str):
            raise bad_request('data must be a base64 string')
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request('data is not valid base64') from None
        view = memoryview(raw)
        while view:
            view = view[os.write(upload.fd, view):]
        upload.size += len(raw)
        return {}

    def upload_end(self, req: dict) -> dict:
        upload = self._upload(req)
        del self.uploads[req['handle']]
        try:
            if opt_field(req, 'abort', bool, False):
                os.close(upload.fd)
                os.unlink(upload.tmp)
                return {'size': upload.size}
            os.fchmod(upload.fd, upload.mode)
            os.close(upload.fd)
            os.rename(upload.tmp, upload.path)
        except BaseException:
            self._discard(upload)
            raise
        return {'size': upload.size}

    def file_read(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        offset = req_int(req, 'offset', 0)
        length = min(req_int(req, 'length', 1), MAX_FILE_READ)
        # O_NONBLOCK: opening a FIFO must not hang the supervisor (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, 'Is a directory', path)
            if not stat.S_ISREG(st.st_mode):
                raise bad_request(f'{path} is not a regular file')
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        # A short read means EOF; so does reaching the size (but /proc files report size 0).
        eof = len(data) < length or (st.st_size > 0 and offset + len(data) >= st.st_size)
        return {'data': base64.b64encode(data).decode('ascii'), 'eof': eof, 'size': st.st_size}

    def stat(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        return {'stat': file_stat(path, os.lstat(path))}

    def manifest(self, req: dict) -> dict:
        """Every entry of the root filesystem under `paths` (other mounts skipped: /proc, /sys,
        /dev ...) as JSON lines `[path, type, size, mode, mtime_ns, link target]` written to `out`
        (on a tmpfs, so the listing does not list itself). The VM runtime diffs two of these."""
        paths = req.get('paths') or ['/']
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith('/') for p in paths):
            raise bad_request('paths must be absolute paths')
        out = resolve_path(req.get('out'))
        root_dev = os.lstat('/').st_dev
        count = 0
        with open(out, 'w', encoding='ascii') as f:
            def emit(path: str, st: os.stat_result) -> None:
                nonlocal count
                mode = st.st_mode
                kind = 'd' if stat.S_ISDIR(mode) else 'f' if stat.S_ISREG(mode) else 'l' if stat.S_ISLNK(mode) else 'o'
                link = os.readlink(path) if kind == 'l' else None
                f.write(json.dumps([path, kind, st.st_size if kind != 'd' else 0, stat.S_IMODE(mode), st.st_mtime_ns, link]) + '\n')
                count += 1

            def walk(path: str) -> None:
                try:
                    st = os.lstat(path)
                except OSError:
                    return
                if st.st_dev != root_dev:
                    return
                emit(path, st)
                if not stat.S_ISDIR(st.st_mode):
                    return
                try:
                    names = sorted(os.listdir(path))
                except OSError:
                    return
                for name in names:
                    walk(os.path.join(path, name))

            for p in paths:
                walk(p)
        return {'entries': count}

    def list(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        entries = []
        with os.scandir(path) as it:
            for entry in it:
                try:
                    entries.append(file_stat(entry.path, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:  # removed while we were listing
                    continue
        entries.sort(key=lambda e: e['name'])
        return {'entries': entries}

    def remove(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        recursive = opt_field(req, 'recursive', bool, False)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if recursive:
                shutil.rmtree(path)
            else:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise bad_request(f'{path} is a non-empty directory (pass recursive)') from None
                    raise
        else:
            os.unlink(path)
        return {}

    def mkdir(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        if opt_field(req, 'parents', bool, True):
            os.makedirs(path, exist_ok=True)
        else:
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
        return {}

    def open_fds(self) -> list[int]:
        return [u.fd for u in self.uploads.values()]

    def abort_all(self) -> None:
        """Uploads left open when the channel closes are removed."""
        for upload in self.uploads.values():
            self._discard(upload)
        self.uploads.clear()

    def _upload(self, req: dict) -> Upload:
        upload = self.uploads.get(req.get('handle'))  # type: ignore[arg-type]
        if upload is None:
            raise bad_request('unknown upload handle')
        return upload

    @staticmethod
    def _discard(upload: Upload) -> None:
        for action in (lambda: os.close(upload.fd), lambda: os.unlink(upload.tmp)):
            try:
                action()
            except OSError:
                pass


def file_stat(path: str, st: os.stat_result) -> dict:
    mode = st.st_mode
    kind = ('dir' if stat.S_ISDIR(mode) else 'file' if stat.S_ISREG(mode)
            else 'symlink' if stat.S_ISLNK(mode) else 'other')
    name = os.path.basename(path.rstrip('/')) or '/'
    return {'name': name, 'path': path, 'type': kind, 'size': st.st_size,
            'mode': stat.S_IMODE(mode), 'mtime': st.st_mtime}


# --------------------------------------------------------------------------------------------
# Supervisor: processes and execs
# --------------------------------------------------------------------------------------------

class OutputPipe:
    """The read end of a pipe carrying stdout or stderr, decoded incrementally (UTF-8, errors
    replaced) so a character split across two reads is not mangled."""

    def __init__(self, fd: int, ev: str):
        os.set_blocking(fd, False)
        self.fd = fd
        self.ev = ev
        self.decoder = codecs.getincrementaldecoder('utf-8')('replace')
        self.eof = False

    def read(self) -> str:
        """What one read returns ('' when nothing is available); sets `eof` at the end."""
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return ''
        if not data:
            self.eof = True
            return self.decoder.decode(b'', True)
        return self.decoder.decode(data)


@dataclass
class WorkerHandle:
    """The supervisor's view of the worker process."""
    pid: int
    ctl_r: int                      # worker -> supervisor messages
    cmd_w: int                      # supervisor -> worker commands
    lines: LineBuffer = field(default_factory=LineBuffer)
    outbox: bytearray = field(default_factory=bytearray)
    ready: bool = False


@dataclass
class Exec:
    id: int
    language: str
    code: str
    timeout_ms: int | None
    env: dict | None
    cwd: str | None
    count: int | None = None        # python: the execution counter of this call
    state_lost: bool = False
    dispatched: bool = False        # python: sent to the worker
    deadline: float | None = None   # monotonic time of the timeout
    kill_at: float | None = None    # monotonic time of the escalation to SIGKILL
    reason: str | None = None       # 'interrupt' or 'timeout' once signalled
    killed: bool = False
    proc: subprocess.Popen | None = None
    pipes: list[OutputPipe] = field(default_factory=list)
    output_size: int = 0            # characters sent so far
    output_dropped: int = 0         # characters dropped past EXEC_OUTPUT_CAP


class ChannelClosed(Exception):
    pass


class PortChannel:
    """The channel over a character device: a microVM's virtio-serial port (the host end is a
    socket). Offers the few socket methods the supervisor uses."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.fd, flag)

    def recv(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


def open_channel(fd: int) -> 'socket.socket | PortChannel':
    """A socket in the namespace runtime; a virtio-serial port in the VM runtime."""
    if stat.S_ISCHR(os.fstat(fd).st_mode):
        return PortChannel(fd)
    return socket.socket(fileno=fd)


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (readable once it ends), where the kernel and Python have them."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def hello_message() -> dict:
    return {'ev': 'hello', 'version': PROTOCOL_VERSION, 'pid': os.getpid(), 'hostname': socket.gethostname()}


class Supervisor:
    def __init__(self, channel_fd: int, inherited: 'Worker | None' = None, exec_count: int = 0):
        # In a fork child: the interpreter to adopt as the first worker (later restarts exec a
        # fresh one, since this process's memory holds the parent's state).
        self.inherited = inherited
        if inherited is not None:
            global FORK_CHILD
            FORK_CHILD = True
        self.pending_worker_ops: dict[int, str] = {}
        self.deferred_worker_msgs: list[dict] = []
        self.sel = selectors.DefaultSelector()
        self.sock = open_channel(channel_fd)
        self.sock.setblocking(True)  # sends block (the server always reads); reads follow select
        self.requests = LineBuffer()
        self.files = FileOps()
        self.worker: WorkerHandle | None = None
        self.exec: Exec | None = None
        self.exec_count = exec_count
        self.state_lost_pending = False   # the idle worker died; tell the next python exec
        self.hello_sent = False
        self.worker_start_at: float | None = None  # a fork child's deferred worker start
        self.early_deaths = 0             # consecutive worker deaths before it became ready
        self.preload = True
        self.children: dict[int, Callable[[int, int], None]] = {}
        self.bash_groups: set[int] = set()
        self.idle_output: list[list[str]] = []
        self.idle_output_size = 0
        self.terminate = False

        # Signals reach the loop through a self-pipe. SIGINT gets a no-op handler rather than
        # SIG_IGN because an ignored disposition would be inherited by bash and its commands.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        # As PID 1 of a sandbox, only the host ends the agent (with SIGKILL, which code inside
        # cannot send to its namespace's init); a SIGTERM can only come from sandbox code.
        signal.signal(signal.SIGTERM, self._on_sigterm if os.getpid() != 1 else lambda *_: None)

        # The worker's stdout/stderr pipes persist across worker restarts; the supervisor keeps
        # the write ends to hand them to each new worker.
        out_r, self.out_w = os.pipe()
        err_r, self.err_w = os.pipe()
        self.worker_pipes = [OutputPipe(out_r, 'stdout'), OutputPipe(err_r, 'stderr')]
        for pipe in self.worker_pipes:
            self.sel.register(pipe.fd, selectors.EVENT_READ, self._pipe_reader(pipe))
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wakeup)
        self.sel.register(self.sock, selectors.EVENT_READ, self._on_channel)

        self.ops: dict[str, Callable[[dict], dict | None]] = {
            'exec': self._op_exec,
            'interrupt': self._op_interrupt,
            'ping': lambda req: {'pid': os.getpid(), 'hostname': socket.gethostname()},
            'upload_begin': self.files.upload_begin,
            'upload_chunk': self.files.upload_chunk,
            'upload_end': self.files.upload_end,
            'file_read': self.files.file_read,
            'stat': self.files.stat,
            'list': self.files.list,
            'manifest': self.files.manifest,
            'remove': self.files.remove,
            'mkdir': self.files.mkdir,
            'fork': self._op_fork,
            'vars': self._op_vars,
            'restore': self._op_restore,
            'set_time': self._op_set_time,
        }

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        try:
            if FORK_CHILD:
                # A fork child's interpreter already holds its state (and it said hello as soon
                # as it connected). Its worker (a fork of this process) is started by the first
                # request that needs it, or once the child has been idle a moment: not while its
                # siblings are still being forked, nor at all in a child closed at once.
                self.worker_start_at = time.monotonic() + FORK_CHILD_WORKER_DELAY_S
            else:
                self._start_worker()
            while not self.terminate:
                events = self.sel.select(self._next_timeout())
                fd_map = self.sel.get_map()
                for key, mask in events:
                    # A handler earlier in this batch may have closed (and even reused) this fd.
                    if fd_map.get(key.fd) is key:
                        key.data(mask)
                self._check_timers()
        except ChannelClosed:
            pass
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        """Channel gone: remove pending uploads and kill everything we started."""
        self.files.abort_all()
        self._prune_bash_groups()
        groups = set(self.bash_groups)
        if self.worker is not None:
            groups.add(self.worker.pid)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        if os.getpid() == 1:
            # PID 1 of the sandbox: the pid namespaces of forked children are nested in ours and
            # die with it. Their inits are our children now: outlive them, reaping, then go.
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue

    def _on_sigterm(self, *_: Any) -> None:
        self.terminate = True

    def _on_wakeup(self, _mask: int) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        """Reaps every exited child (the agent may be PID 1 of the sandbox: orphans are ours)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handler = self.children.pop(pid, None)
            if handler is not None:
                handler(pid, status)

    def _next_timeout(self) -> float | None:
        ex = self.exec
        times = [t for t in (ex.deadline, ex.kill_at) if t is not None] if ex is not None else []
        if self.worker_start_at is not None:
            times.append(self.worker_start_at)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _check_timers(self) -> None:
        now = time.monotonic()
        if self.worker_start_at is not None and (now >= self.worker_start_at or self.worker is not None):
            self.worker_start_at = None
            if self.worker is None:
                self._start_worker()
        ex = self.exec
        if ex is None:
            return
        if ex.deadline is not None and now >= ex.deadline:
            self._interrupt(ex, 'timeout')
        if ex.kill_at is not None and now >= ex.kill_at:
            self._kill(ex)

    # ---- channel --------------------------------------------------------------------------

    def send(self, obj: dict) -> None:
        try:
            self.sock.sendall(encode_line(obj))
        except OSError as exc:  # BrokenPipe, ConnectionReset: the server is gone
            raise ChannelClosed() from exc

    def _on_channel(self, _mask: int) -> None:
        try:
            data = self.sock.recv(CHANNEL_READ)
        except OSError as exc:
            raise ChannelClosed() from exc
        if not data:
            raise ChannelClosed()
        for line in self.requests.feed(data):
            self._handle_line(line)

    def _handle_line(self, line: bytes | None) -> None:
        if line is None:
            self.send({'ok': False, 'error': {'code': 'bad_request', 'message': 'request line too long'}})
            return
        if not line.strip():
            return
        try:
            req = json.loads(line)
        except ValueError as exc:  # also invalid UTF-8
            self._fail(None, 'bad_request', f'malformed JSON: {exc}')
            return
        req_id = None
        try:
            if not isinstance(req, dict):
                raise bad_request('a request must be a JSON object')
            if isinstance(req.get('id'), int) and not isinstance(req['id'], bool) and req['id'] >= 0:
                req_id = req['id']
            else:
                raise bad_request('id must be a non-negative integer')
            handler = self.ops.get(req.get('op'))  # type: ignore[arg-type]
            if handler is None:
                raise bad_request(f'unknown op {req.get("op")!r}')
            reply = handler(req)
        except ChannelClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            code, message = error_info(exc)
            if code == 'internal':
                log(f'request failed: {"".join(traceback.format_exception(exc)).rstrip()}')
            self._fail(req_id, code, message)
            return
        if reply is not None:
            self.send({'id': req_id, 'ok': True, **reply})

    def _fail(self, req_id: int | None, code: str, message: str) -> None:
        msg: dict[str, Any] = {'ok': False, 'error': {'code': code, 'message': message}}
        if req_id is not None:
            msg = {'id': req_id, **msg}
        self.send(msg)

    # ---- output routing -------------------------------------------------------------------

    def _pipe_reader(self, pipe: OutputPipe) -> Callable[[int], None]:
        def on_readable(_mask: int) -> None:
            text = pipe.read()
            if text:
                self._output(pipe.ev, text)
            if pipe.eof:
                self.sel.unregister(pipe.fd)
                os.close(pipe.fd)
        return on_readable

    def _drain(self, pipes: list[OutputPipe]) -> None:
        """Forwards everything already written to these pipes (non-blocking)."""
        for pipe in pipes:
            while not pipe.eof:
                text = pipe.read()
                if not text:
                    break
                self._output(pipe.ev, text)

    def _output(self, ev: str, text: str) -> None:
        """Output belongs to the running exec; between execs it waits for the next one
        (background threads and processes), up to IDLE_OUTPUT_CAP, beyond which it is dropped."""
        ex = self.exec
        if ex is not None:
            room = EXEC_OUTPUT_CAP - ex.output_size
            if len(text) > room:
                ex.output_dropped += len(text) - max(room, 0)
                text = text[:max(room, 0)]
                if not text:
                    return
            ex.output_size += len(text)
            self.send({'id': ex.id, 'ev': ev, 'data': text})
            return
        if self.idle_output_size + len(text) > IDLE_OUTPUT_CAP:
            return
        self.idle_output_size += len(text)
        if self.idle_output and self.idle_output[-1][0] == ev:
            self.idle_output[-1][1] += text
        else:
            self.idle_output.append([ev, text])

    def _flush_idle_output(self, ex: Exec) -> None:
        for ev, text in self.idle_output:
            self.send({'id': ex.id, 'ev': ev, 'data': text})
        self.idle_output.clear()
        self.idle_output_size = 0

    # ---- exec / interrupt -----------------------------------------------------------------

    def _op_exec(self, req: dict) -> None:
        language = req.get('language')
        if language not in ('python', 'bash'):
            raise bad_request('language must be "python" or "bash"')
        code = req.get('code')
        if not isinstance(code, str):
            raise bad_request('code must be a string')
        timeout_ms = opt_field(req, 'timeout_ms', int)
        if timeout_ms is not None and timeout_ms <= 0:
            raise bad_request('timeout_ms must be positive')
        env = opt_field(req, 'env', dict)
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) and '\0' not in k + v
                                       and k and '=' not in k for k, v in env.items()):
            raise bad_request('env must map names to strings')
        cwd = opt_field(req, 'cwd', str)
        if cwd is not None:
            cwd = resolve_path(cwd)
        if self.exec is not None:
            raise AgentError('conflict', f'exec {self.exec.id} is still running')

        ex = Exec(req['id'], language, code, timeout_ms, env, cwd)
        self.exec = ex
        self._flush_idle_output(ex)
        if language == 'bash':
            self._start_bash(ex)
            return None
        self.exec_count += 1
        ex.count = self.exec_count
        if self.state_lost_pending:
            ex.state_lost, self.state_lost_pending = True, False
        if self.worker is not None and self.worker.ready:
            self._dispatch(ex)
        elif self.worker is None:
            self._start_worker()
        return None

    def _dispatch(self, ex: Exec) -> None:
        """Hands a python exec to the (ready) worker; its timeout starts now."""
        ex.dispatched = True
        if ex.timeout_ms is not None:
            ex.deadline = time.monotonic() + ex.timeout_ms / 1000
        self._worker_send({'op': 'exec', 'id': ex.id, 'count': ex.count, 'code': ex.code,
                           'env': ex.env, 'cwd': ex.cwd})

    def _worker_op(self, req: dict, kind: str, msg: dict) -> None:
        """Hands an op to the idle worker; the answer comes from _on_worker_message."""
        if self.exec is not None:
            raise AgentError('conflict', f'exec {self.exec.id} is running')
        self.pending_worker_ops[req['id']] = kind
        if self.worker is None or not self.worker.ready:
            # Starting (e.g. a fork child's worker right after hello): sent once it is ready.
            self.deferred_worker_msgs.append({**msg, 'id': req['id']})
            if self.worker is None:
                self._start_worker()
            return
        self._worker_send({**msg, 'id': req['id']})

    def _op_fork(self, req: dict) -> None:
        children = req.get('children')
        if not isinstance(children, list) or not children or not all(
                isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ('id', 'root', 'hostname')) for c in children):
            raise bad_request('children must be a list of {id, root, hostname}')
        self._worker_op(req, 'forked', {'op': 'fork', 'children': children, 'exec_count': self.exec_count})

    def _op_vars(self, req: dict) -> None:
        self._worker_op(req, 'vars', {'op': 'vars'})

    def _op_restore(self, req: dict) -> None:
        """A microVM clone just resumed from its template's (or fork point's) snapshot: every
        clone has the same clock, the same kernel RNG state and the same hostname. Take the
        host's time and entropy, reseed the kernel's RNG and then the interpreter's."""
        time_ns = opt_field(req, 'time_ns', int)
        entropy = opt_field(req, 'entropy', str)
        hostname = opt_field(req, 'hostname', str)
        sandbox_id = opt_field(req, 'sandbox_id', str)
        if time_ns is not None:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        if entropy:
            podflare_fork.add_entropy(base64.b64decode(entropy))
        if hostname:
            socket.sethostname(hostname)
        env = {'PODFLARE_SANDBOX_ID': sandbox_id} if sandbox_id else {}
        os.environ.update(env)
        self._worker_op(req, 'reseeded', {'op': 'reseed', 'env': env})

    def _op_set_time(self, req: dict) -> dict:
        """A VM paused for a while (a fork's parent) resumes with its clock where the pause
        began: take the host's time. Its RNGs stay as they were (it is the original)."""
        time.clock_settime_ns(time.CLOCK_REALTIME, req_int(req, 'time_ns', 0))
        return {}

    def _op_interrupt(self, _req: dict) -> dict:
        ex = self.exec
        if ex is None:
            return {'interrupted': False}
        self._interrupt(ex, 'interrupt')
        return {'interrupted': True}

    def _interrupt(self, ex: Exec, reason: str) -> None:
        """SIGINT now; SIGKILL (and for python a fresh worker) if not done after the grace period."""
        ex.deadline = None
        if ex.reason is not None:
            return
        ex.reason = reason
        if ex.language == 'python' and not ex.dispatched:
            self._finish(ex, *self._stop_error(ex, restarted=False))
            return
        ex.kill_at = time.monotonic() + INTERRUPT_GRACE_S
        try:
            if ex.language == 'python' and self.worker is not None:
                # The note tells the worker why, so its traceback can say TimeoutError.
                self._worker_send({'t': 'interrupt', 'id': ex.id, 'reason': reason,
                                   'timeout_ms': ex.timeout_ms})
                os.kill(self.worker.pid, signal.SIGINT)
            elif ex.proc is not None:
                os.killpg(ex.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass  # already gone: its exit is on its way

    def _kill(self, ex: Exec) -> None:
        ex.kill_at = None
        ex.killed = True
        pgid = self.worker.pid if ex.language == 'python' and self.worker else (
            ex.proc.pid if ex.proc else None)
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _stop_error(self, ex: Exec, restarted: bool) -> tuple[int, dict]:
        """The exit code and error of an exec stopped by timeout or interrupt."""
        note = '; the interpreter did not stop in time and was restarted (its state is lost)' \
            if restarted and ex.language == 'python' else ''
        if ex.reason == 'timeout':
            value = f'execution exceeded timeout_ms={ex.timeout_ms}{note}'
            return 124, {'name': 'TimeoutError', 'value': value, 'traceback': f'TimeoutError: {value}\n'}
        value = f'interrupted{note}' if note else 'interrupted'
        return 130, {'name': 'KeyboardInterrupt', 'value': value,
                     'traceback': f'KeyboardInterrupt: {value}\n'}

    def _finish(self, ex: Exec, code: int, error: dict | None = None, echo: bool = True) -> None:
        """Ends an exec: error (mirrored on stderr when the agent made it up), then exit."""
        if ex.output_dropped:
            self.send({'id': ex.id, 'ev': 'stderr', 'data':
                       f'\n[podflare] output truncated: {ex.output_dropped} more characters were dropped '
                       f'after the first {EXEC_OUTPUT_CAP} (PODFLARE_MAX_EXEC_OUTPUT_BYTES)\n'})
        if error is not None:
            if echo:
                self.send({'id': ex.id, 'ev': 'stderr', 'data': error['traceback']})
            self.send({'id': ex.id, 'ev': 'error', 'data': error})
        self.exec = None
        self.send({'id': ex.id, 'ev': 'exit', 'code': code,
                   'execution_count': ex.count, 'state_lost': ex.state_lost})

    # ---- bash -----------------------------------------------------------------------------

    def _start_bash(self, ex: Exec) -> None:
        self._prune_bash_groups()
        cwd = ex.cwd or self._worker_cwd()
        env = dict(os.environ)
        env.update(ex.env or {})
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            ex.proc = subprocess.Popen(
                ['bash', '-c', ex.code], stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                cwd=cwd, env=env, process_group=0, close_fds=True)
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            what = f'cd: {cwd}' if exc.filename == cwd else 'bash'
            self.send({'id': ex.id, 'ev': 'stderr', 'data': f'bash: {what}: {exc.strerror}\n'})
            self._finish(ex, 1)
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        self.children[ex.proc.pid] = self._on_bash_exit
        self.bash_groups.add(ex.proc.pid)
        ex.pipes = [OutputPipe(out_r, 'stdout'), OutputPipe(err_r, 'stderr')]
        for pipe in ex.pipes:
            self.sel.register(pipe.fd, selectors.EVENT_READ, self._pipe_reader(pipe))
        if ex.timeout_ms is not None:
            ex.deadline = time.monotonic() + ex.timeout_ms / 1000

    def _prune_bash_groups(self) -> None:
        """Forgets process groups of past bash execs that have no process left (a group id
        cannot be reused while the group exists, so the ones kept are still ours)."""
        for pgid in list(self.bash_groups):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                self.bash_groups.discard(pgid)
            except OSError:
                pass

    def _worker_cwd(self) -> str:
        """bash runs where the python code last chdir'ed to, else in HOME."""
        if self.worker is not None:
            try:
                cwd = os.readlink(f'/proc/{self.worker.pid}/cwd')
                if os.path.isdir(cwd):
                    return cwd
            except OSError:
                pass
        return HOME if os.path.isdir(HOME) else '/'

    def _on_bash_exit(self, pid: int, status: int) -> None:
        ex = self.exec
        if ex is None or ex.proc is None or ex.proc.pid != pid:
            return
        code = exit_code_of(status)
        ex.proc.returncode = code  # we reaped it; keep Popen from trying again
        # Everything bash wrote before exiting is in the pipes. Background jobs may keep them
        # open: they stay registered and their later output goes to whatever exec runs next.
        self._drain(ex.pipes)
        if ex.reason == 'timeout':
            self._finish(ex, *self._stop_error(ex, restarted=False))
        elif ex.killed:
            self._finish(ex, 130)
        else:
            self._finish(ex, code)

    # ---- worker: supervisor side ----------------------------------------------------------

    def _start_worker(self) -> None:
        cmd_r, cmd_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (cmd_r, cmd_w, ctl_r, ctl_w):
                os.close(fd)
            log(f'cannot fork the worker: {exc}')
            self._worker_start_failed()
            return
        if pid == 0:  # the worker; never returns into the supervisor's code
            try:
                self._become_worker(cmd_r, ctl_w, [cmd_w, ctl_r])
            finally:
                os._exit(70)
        os.close(cmd_r)
        os.close(ctl_w)
        try:
            os.setpgid(pid, pid)  # also done by the child; whoever runs first wins the race
        except OSError:
            pass
        os.set_blocking(ctl_r, False)
        os.set_blocking(cmd_w, False)
        self.worker = WorkerHandle(pid, ctl_r, cmd_w)
        self.children[pid] = self._on_worker_exit
        self.sel.register(ctl_r, selectors.EVENT_READ, self._on_worker_readable)

    def _become_worker(self, cmd_r: int, ctl_w: int, parent_ends: list[int]) -> None:
        """In the forked child: drop every supervisor resource, wire up fds 0-2, run user code."""
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        # Everything the supervisor watches (channel, pipes, leftover bash pipes), plus the rest.
        fds = [key.fd for key in self.sel.get_map().values() if key.fileobj is not self.sock]
        fds += [self.wake_w, *parent_ends, *self.files.open_fds()]
        self.sel.close()
        self.sock.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(self.out_w, 1)
        os.dup2(self.err_w, 2)
        for fd in (null, self.out_w, self.err_w):
            os.close(fd)
        if self.inherited is not None:
            inherited, self.inherited = self.inherited, None
            inherited.resume(cmd_r, ctl_w)
        elif FORK_CHILD:
            # This process holds a forked parent's memory: a restarted interpreter must not.
            os.set_inheritable(cmd_r, True)
            os.set_inheritable(ctl_w, True)
            os.execv(sys.executable, [sys.executable, AGENT_FILE, '--worker', str(cmd_r), str(ctl_w)])
        Worker(cmd_r, ctl_w, preload=self.preload).main()

    def _worker_send(self, msg: dict) -> None:
        """Queues a command for the worker; the pipe is non-blocking so a stuck worker cannot
        stall the supervisor."""
        worker = self.worker
        if worker is None:
            return
        pending = bool(worker.outbox)
        worker.outbox += encode_line(msg)
        if not pending:
            self._flush_worker_outbox(worker)

    def _flush_worker_outbox(self, worker: WorkerHandle) -> None:
        try:
            while worker.outbox:
                del worker.outbox[:os.write(worker.cmd_w, worker.outbox)]
        except BlockingIOError:
            pass
        except OSError:
            worker.outbox.clear()  # the worker is gone; its exit is reported via SIGCHLD
        registered = worker.cmd_w in self.sel.get_map()
        if worker.outbox and not registered:
            self.sel.register(worker.cmd_w, selectors.EVENT_WRITE,
                              lambda _mask: self._flush_worker_outbox(worker))
        elif not worker.outbox and registered:
            self.sel.unregister(worker.cmd_w)

    def _on_worker_readable(self, _mask: int) -> None:
        if self.worker is not None:
            self._read_worker(self.worker, until_empty=False)

    def _read_worker(self, worker: WorkerHandle, until_empty: bool) -> None:
        """Handles the worker's messages: one read's worth, or all that is buffered."""
        while True:
            try:
                data = os.read(worker.ctl_r, CHANNEL_READ)
            except BlockingIOError:
                return
            if not data:
                # EOF: the worker is dying (its exit comes via SIGCHLD); stop watching the pipe.
                if worker.ctl_r in self.sel.get_map():
                    self.sel.unregister(worker.ctl_r)
                return
            for line in worker.lines.feed(data):
                if line is None:
                    log('over-long message from the worker dropped')
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    log(f'malformed message from the worker: {line[:200]!r}')
                    continue
                self._on_worker_message(worker, msg)
            if not until_empty:
                return

    def _on_worker_message(self, worker: WorkerHandle, msg: dict) -> None:
        # Output written before this message must reach the server before it.
        self._drain(self.worker_pipes)
        kind = msg.get('t')
        ex = self.exec
        current = ex is not None and ex.language == 'python' and ex.dispatched and msg.get('id') == ex.id
        if kind == 'ready':
            worker.ready = True
            self.early_deaths = 0
            self._send_hello()
            if ex is not None and ex.language == 'python' and not ex.dispatched:
                self._dispatch(ex)
            for deferred in self.deferred_worker_msgs:
                self._worker_send(deferred)
            self.deferred_worker_msgs.clear()
        elif kind == 'result':
            if current and ex is not None:
                self.send({'id': ex.id, 'ev': 'result', 'data': msg.get('data') or {},
                           'is_main_result': bool(msg.get('main'))})
            if msg.get('ack'):
                self._worker_send({'t': 'ack'})
        elif kind in ('forked', 'vars', 'reseeded') and self.pending_worker_ops.pop(msg.get('id'), None) == kind:
            if kind == 'reseeded':
                self.send({'id': msg['id'], 'ok': True})
            elif kind == 'forked' and msg.get('error') and not msg.get('pids'):
                self.send({'id': msg['id'], 'ok': False, 'error': {'code': 'internal', 'message': msg['error']}})
            elif kind == 'forked':
                self.send({'id': msg['id'], 'ok': True, 'pids': msg.get('pids') or [], 'error': msg.get('error')})
            else:
                self.send({'id': msg['id'], 'ok': True, 'vars': msg.get('vars') or {}})
        elif kind == 'done' and current and ex is not None:
            self._finish(ex, int(msg.get('code', 1)), msg.get('error'), echo=False)

    def _on_worker_exit(self, pid: int, status: int) -> None:
        worker = self.worker
        if worker is None or worker.pid != pid:
            return
        # What it said before dying comes first (a `done` racing a timeout's SIGKILL wins).
        self._read_worker(worker, until_empty=True)
        self.worker = None
        self.deferred_worker_msgs.clear()
        for op_id in list(self.pending_worker_ops):
            self.pending_worker_ops.pop(op_id)
            self.send({'id': op_id, 'ok': False, 'error': {'code': 'conflict', 'message': 'the interpreter died'}})
        for fd in (worker.ctl_r, worker.cmd_w):
            if fd in self.sel.get_map():
                self.sel.unregister(fd)
            os.close(fd)
        try:  # a fresh interpreter should not inherit the old one's leftover processes
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if not worker.ready:
            self.early_deaths += 1
            if self.early_deaths >= 2 and self.preload:
                log('the worker keeps dying while starting; starting it without PODFLARE_PRELOAD')
                self.preload = False
        ex = self.exec
        if ex is not None and ex.language == 'python' and ex.dispatched:
            self._drain(self.worker_pipes)
            ex.state_lost = True
            if ex.killed:
                self._finish(ex, *self._stop_error(ex, restarted=True))
            elif os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                value = f'the Python interpreter was killed by signal {sig} ({_signal_name(sig)}); its state is lost'
                self._finish(ex, 128 + sig, {'name': 'InterpreterDied', 'value': value,
                                             'traceback': f'InterpreterDied: {value}\n'})
            else:  # a clean os._exit(n): the code says it all
                self._finish(ex, exit_code_of(status))
        elif worker.ready:
            self.state_lost_pending = True
        if self.early_deaths >= 4:
            self._worker_start_failed()
            return
        self._start_worker()

    def _send_hello(self) -> None:
        if not self.hello_sent:
            self.hello_sent = True
            self.send(hello_message())

    def _worker_start_failed(self) -> None:
        """The worker cannot start: fail a waiting python exec; the next one tries again."""
        self.early_deaths = 0
        self._send_hello()  # files and bash still work
        ex = self.exec
        if ex is not None and ex.language == 'python':
            ex.state_lost = True
            value = 'the Python interpreter could not be started'
            self._finish(ex, 1, {'name': 'InterpreterDied', 'value': value,
                                 'traceback': f'InterpreterDied: {value}\n'})


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f'signal {sig}'


# --------------------------------------------------------------------------------------------
# Worker: runs user Python code
# --------------------------------------------------------------------------------------------

#: The running worker, for publish_figure() (called by podflare_mpl_backend).
_WORKER: Worker | None = None


def publish_figure(figure: Any) -> bool:
    """Sends a matplotlib figure as a display result. False outside the agent's worker (e.g. in a
    process the worker forked), where the figure is left alone."""
    worker = _WORKER
    if worker is None or os.getpid() != worker.pid or worker.exec_id is None:
        return False
    worker.publish(figure_bundle(figure), main=False)
    return True


def figure_bundle(figure: Any) -> dict:
    bundle = {'text/plain': repr(figure)}
    if figure.axes or figure.lines:  # an empty figure would be a blank image
        buf = io.BytesIO()
        figure.savefig(buf, format='png', bbox_inches='tight')
        bundle['image/png'] = base64.b64encode(buf.getvalue()).decode('ascii')
    return bundle


def _is_figure(obj: Any) -> bool:
    module = sys.modules.get('matplotlib.figure')
    return module is not None and isinstance(obj, module.Figure)


#: Rich display methods (IPython's protocol) and the MIME type each produces.
REPR_METHODS = (
    ('_repr_html_', 'text/html'),
    ('_repr_markdown_', 'text/markdown'),
    ('_repr_svg_', 'image/svg+xml'),
    ('_repr_png_', 'image/png'),
    ('_repr_jpeg_', 'image/jpeg'),
    ('_repr_json_', 'application/json'),
    ('_repr_latex_', 'text/latex'),
)


def mime_value(mime: str, value: Any) -> Any:
    """A repr method's result as a JSON-able bundle value, or None to leave it out."""
    if isinstance(value, tuple) and len(value) == 2:  # (data, metadata)
        value = value[0]
    if value is None:
        return None
    textual = mime.startswith('text/') or mime == 'image/svg+xml' or mime.endswith('json')
    if isinstance(value, (bytes, bytearray)):  # binary formats travel base64-encoded
        return bytes(value).decode('utf-8', 'replace') if textual else base64.b64encode(value).decode('ascii')
    if isinstance(value, str):
        return value
    if mime.endswith('json'):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
        return value
    return None


def mime_bundle(obj: Any) -> dict:
    """text/plain always (a failing __repr__ is the user's error and propagates), plus whatever
    rich representations the object offers without raising."""
    bundle: dict[str, Any] = {'text/plain': repr(obj)}
    if type(obj) in SIMPLE_TYPES or isinstance(obj, type):
        return bundle
    if _is_figure(obj):
        bundle.update(figure_bundle(obj))
        return bundle
    for attr, mime in REPR_METHODS:
        try:
            method = getattr(obj, attr, None)
            value = mime_value(mime, method()) if callable(method) else None
        except Exception:
            continue
        if value is not None:
            bundle[mime] = value
    try:  # _repr_mimebundle_ wins over the individual methods, as in IPython
        method = getattr(obj, '_repr_mimebundle_', None)
        extra = method(include=None, exclude=None) if callable(method) else None
        if isinstance(extra, tuple) and len(extra) == 2:
            extra = extra[0]
        if isinstance(extra, dict):
            for mime, value in extra.items():
                value = mime_value(mime, value) if isinstance(mime, str) else None
                if value is not None:
                    bundle[mime] = value
    except Exception:
        pass
    return bundle


class _MatplotlibHook:
    """One-shot import hook: right after `import matplotlib`, select podflare_mpl_backend.

    Setting rcParams here instead of MPLBACKEND in the environment keeps the variable out of
    every process the user starts (a child Python could not import the backend and would fail).
    An explicit MPLBACKEND still wins."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != 'matplotlib':
            return None
        try:
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = getattr(spec, 'loader', None)
            real_exec = getattr(loader, 'exec_module', None)
        except Exception:
            return None
        if real_exec is None:
            return spec

        def exec_module(module: types.ModuleType) -> None:
            real_exec(module)
            if not os.environ.get('MPLBACKEND'):
                try:
                    module.rcParams['backend'] = MPL_BACKEND
                except Exception:
                    pass
        loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec


def _make_text_stream(fd: int) -> io.TextIOWrapper:
    """Line-buffered (flushed at every newline or carriage return, like a terminal), so each
    print() becomes one write and output streams while the code runs."""
    raw = io.FileIO(fd, 'w', closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding='utf-8', errors='backslashreplace',
                            line_buffering=True)


class Worker:
    def __init__(self, cmd_fd: int, ctl_fd: int, preload: bool = True):
        self.cmd_fd = cmd_fd
        self.ctl_fd = ctl_fd
        self.preload_enabled = preload
        self.pid = os.getpid()
        self.lines = LineBuffer()
        self.inbox: deque[dict] = deque()
        self.notes: dict[int, dict] = {}     # exec id -> why it was interrupted
        self.acks = 0
        self.exec_id: int | None = None
        self.done_sent = True
        self.user_active = False             # SIGINT raises KeyboardInterrupt only in user code
        self.critical = False                # ... and is deferred while a control message is in flight
        self.interrupt_pending = False
        self.loop: Any = None                # asyncio loop for top-level await, made on first use
        self.ns: dict[str, Any] = {}
        self.stdout = self.stderr = None     # type: ignore[assignment]
        self.fflush: Callable[[Any], Any] | None = None
        # Fork children (pid -> a pidfd to watch it by, or None): ours to reap.
        self.fork_pids: dict[int, int | None] = {}

    # ---- setup ----------------------------------------------------------------------------

    def main(self, fresh: bool = True) -> None:
        global _WORKER
        _WORKER = self
        if fresh:
            self._setup_process()
            self._setup_namespace()
            if self.preload_enabled:
                self._preload()
        self._flush_stdio()
        self.send({'t': 'ready', 'pid': self.pid})
        while True:
            try:
                msg = self._next_message()
                self._reap_fork_children()  # ended fork children are ours to reap: no zombies
                op = msg.get('op')
                if op == 'exec':
                    self.run_exec(msg)
                elif op == 'fork':
                    self.fork_children(msg)
                elif op == 'vars':
                    self.send({'t': 'vars', 'id': msg.get('id'), 'vars': podflare_fork.snapshot_vars(self.ns)})
                elif op == 'reseed':
                    os.environ.update(msg.get('env') or {})
                    podflare_fork.reseed()
                    self.send({'t': 'reseeded', 'id': msg.get('id')})
            except KeyboardInterrupt:
                self._abandon_exec(130, 'KeyboardInterrupt', '')
            except Exception as exc:  # a bug of ours: report it, keep the interpreter
                text = ''.join(traceback.format_exception(exc))
                self._write_stderr(f'podflare agent error:\n{text}')
                self._abandon_exec(1, 'AgentError', str(exc))

    def resume(self, cmd_fd: int, ctl_fd: int) -> None:
        """In a fork child: the same interpreter (globals, modules, open files) under a new
        supervisor; only the control pipes are new."""
        self.cmd_fd, self.ctl_fd = cmd_fd, ctl_fd
        self.pid = os.getpid()
        self.lines = LineBuffer()
        self.inbox.clear()
        self.notes.clear()
        self.acks = 0
        self.exec_id = None
        for pidfd in self.fork_pids.values():  # the parent's watches of our siblings
            if pidfd is not None:
                os.close(pidfd)
        self.fork_pids = {}
        signal.signal(signal.SIGINT, self._on_sigint)
        self.main(fresh=False)

    def fork_children(self, msg: dict) -> None:
        """Forks one child per entry of msg['children'] (see podflare_fork); answers with their
        pids as seen from this sandbox. Only runs between execs: the interpreter is idle."""
        self._flush_stdio()
        pids = []
        error = None
        signals = []
        # What every child reopens (or closes) is the same: read once, here.
        inherited = podflare_fork.capture_files(keep={self.cmd_fd, self.ctl_fd})
        cwd = os.getcwd()
        for child in msg.get('children') or []:
            ready_r, ready_w = os.pipe()
            try:
                pids.append(podflare_fork.spawn(lambda child=child, w=ready_w: self._become_fork_child(child, msg, w, inherited, cwd)))
                signals.append(ready_r)
            except OSError as exc:
                os.close(ready_r)
                error = f'fork failed: {exc}'
                break
            finally:
                os.close(ready_w)
        # Answer once every child has its own network namespace: the server attaches the
        # network right away, while the children finish switching their roots.
        for fd in signals:
            try:
                os.read(fd, 1)
            finally:
                os.close(fd)
        for pid in pids:
            self.fork_pids[pid] = _pidfd(pid)
        self.send({'t': 'forked', 'id': msg.get('id'), 'pids': pids, 'error': error})

    def _become_fork_child(self, child: dict, msg: dict, ready_w: int, inherited: tuple[list, list[int]], cwd: str) -> None:
        # Leave the parent's worker process group and session: signals meant for the parent's
        # interpreter (interrupts, a restart's killpg) must not reach this sandbox.
        podflare_fork.block_root_ready_signal()
        os.setsid()
        files, sockets = inherited
        podflare_fork.close_fds(sockets)
        podflare_fork.enter_namespaces(child['hostname'])
        os.write(ready_w, b'1')
        os.close(ready_w)
        # The server mounts the root into our mount namespace now that it exists.
        podflare_fork.wait_for_root(child['root'])
        podflare_fork.switch_root(child['root'])
        # Files first: they go back to their own fd numbers, which the socket must not be on.
        podflare_fork.restore_files(files)
        sock = podflare_fork.connect_server()
        # Then hello: the server answers the fork on it. Requests it sends meanwhile wait in the
        # socket until the supervisor below reads them, by when everything after this is done.
        sock.sendall(encode_line(hello_message()))
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir(HOME if os.path.isdir(HOME) else '/')
        podflare_fork.reseed()
        os.environ['PODFLARE_SANDBOX_ID'] = child['id']
        for fd in (self.cmd_fd, self.ctl_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        supervisor = Supervisor(sock.detach(), inherited=self, exec_count=int(msg.get('exec_count') or 0))
        supervisor.hello_sent = True
        os._exit(supervisor.run())

    def _reap_fork_children(self) -> None:
        """Fork children start as our children: reap the ones that have ended."""
        for pid, pidfd in list(self.fork_pids.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self.fork_pids[pid]
                if pidfd is not None:
                    os.close(pidfd)

    def _setup_process(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.stdout = _make_text_stream(1)
        self.stderr = _make_text_stream(2)
        sys.stdout = sys.__stdout__ = self.stdout
        sys.stderr = sys.__stderr__ = self.stderr
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, 'r', closefd=False), encoding='utf-8')
        sys.argv = ['']
        # Like a REPL: modules in the working directory are importable; the backend is found too.
        if sys.path and sys.path[0] == AGENT_DIR:
            sys.path[0] = ''
        else:
            sys.path.insert(0, '')
        if AGENT_DIR not in sys.path:
            sys.path.append(AGENT_DIR)
        sys.modules.setdefault('podflare_agent', sys.modules[__name__])
        sys.meta_path.insert(0, _MatplotlibHook())
        try:  # to flush C stdio buffers (printf from extensions) when a cell ends
            import ctypes
            self.fflush = ctypes.CDLL(None).fflush
        except Exception:
            self.fflush = None

    def _setup_namespace(self) -> None:
        """A real module named __main__, so classes defined in cells pickle by reference."""
        main = types.ModuleType('__main__')
        main.__dict__['__builtins__'] = builtins
        sys.modules['__main__'] = main
        self.ns = main.__dict__
        builtins.display = self.display  # type: ignore[attr-defined]

    def _preload(self) -> None:
        for name in os.environ.get('PODFLARE_PRELOAD', '').split(','):
            if name.strip():
                try:
                    importlib.import_module(name.strip())
                except BaseException:  # noqa: BLE001 - a broken preload must not stop the worker
                    pass

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        # A SIGINT that arrives after the user code finished (timeout racing completion) is moot.
        if not self.user_active:
            return
        if self.critical:
            self.interrupt_pending = True
            return
        raise KeyboardInterrupt

    def _leave_critical(self) -> None:
        """Ends a section that must not be cut short (a half-written or half-parsed control
        message would corrupt the pipe); an interrupt that arrived meanwhile is raised now."""
        self.critical = False
        if self.interrupt_pending:
            self.interrupt_pending = False
            if self.user_active:
                raise KeyboardInterrupt

    # ---- control pipes --------------------------------------------------------------------

    def send(self, msg: dict) -> None:
        data = memoryview(encode_line(msg))
        self.critical = True
        try:
            while data:
                data = data[os.write(self.ctl_fd, data):]
        except OSError:
            os._exit(71)  # the supervisor is gone (or user code closed our pipe)
        finally:
            self._leave_critical()

    def _read_commands(self, block: bool) -> bool:
        """Reads what the supervisor sent into the inbox. Interrupt notes and acks are filed at
        once. Returns False when nothing could be read without blocking."""
        # Waiting may be interrupted; once bytes are read they must all be filed.
        if not select.select([self.cmd_fd], [], [], None if block else 0)[0]:
            return False
        self.critical = True
        try:
            self._file_commands()
        finally:
            self._leave_critical()
        return True

    def _file_commands(self) -> None:
        try:
            data = os.read(self.cmd_fd, CHANNEL_READ)
        except OSError:
            data = b''
        if not data:
            os._exit(0)  # the supervisor is gone
        for line in self.lines.feed(data):
            try:
                msg = json.loads(line) if line is not None else None
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                continue
            if msg.get('t') == 'interrupt':
                self.notes[msg.get('id')] = msg
            elif msg.get('t') == 'ack':
                self.acks += 1
            else:
                self.inbox.append(msg)

    def _next_message(self) -> dict:
        while not self.inbox:
            watched = [fd for fd in self.fork_pids.values() if fd is not None]
            if watched:
                # Idle: a fork child that ends (closed by the server) is reaped at once, so that
                # its teardown (cgroups, which keep a zombie) is not left for our next exec.
                ready = select.select([self.cmd_fd, *watched], [], [])[0]
                if any(fd != self.cmd_fd for fd in ready):
                    self._reap_fork_children()
                if self.cmd_fd not in ready:
                    continue
            self._read_commands(block=True)
        return self.inbox.popleft()

    def _wait_ack(self) -> None:
        while self.acks == 0:
            self._read_commands(block=True)
        self.acks -= 1

    def publish(self, bundle: dict, main: bool) -> None:
        """Sends a result. Display results wait for the supervisor's ack so that output printed
        after display() cannot overtake it."""
        self._flush_stdio()
        self.send({'t': 'result', 'id': self.exec_id, 'data': bundle, 'main': main, 'ack': not main})
        if not main:
            self._wait_ack()

    def display(self, *objs: Any, raw: bool = False, **_ignored: Any) -> None:
        """The display() builtin: each object becomes a non-main result (raw: already a bundle)."""
        if self.exec_id is None or os.getpid() != self.pid:
            for obj in objs:
                print(repr(obj))
            return
        for obj in objs:
            if raw and isinstance(obj, dict):
                bundle = {k: v for k, v in ((k, mime_value(k, v)) for k, v in obj.items()) if v is not None}
                bundle.setdefault('text/plain', '')
            else:
                bundle = mime_bundle(obj)
                if _is_figure(obj):
                    self._close_figure(obj)
            self.publish(bundle, main=False)

    # ---- exec -----------------------------------------------------------------------------

    def run_exec(self, msg: dict) -> None:
        self.exec_id = msg.get('id')
        self.done_sent = False
        self.acks = 0
        self.interrupt_pending = False
        self.notes.clear()
        env = msg.get('env') or {}
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            code, error = self._run_in_cwd(msg.get('cwd'), msg.get('code', ''), int(msg.get('count') or 0))
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self._flush_stdio()
        self._send_done(code, error)

    def _run_in_cwd(self, cwd: str | None, source: str, count: int) -> tuple[int, dict | None]:
        if cwd is None:
            return self._run_cell(source, count)
        try:
            previous = os.getcwd()
        except OSError:
            previous = HOME
        try:
            os.chdir(cwd)
        except OSError as exc:
            return 1, self._report(exc, with_traceback=False)
        try:
            return self._run_cell(source, count)
        finally:
            try:
                os.chdir(previous)
            except OSError:
                pass

    def _send_done(self, code: int, error: dict | None) -> None:
        if not self.done_sent:
            self.done_sent = True
            self.send({'t': 'done', 'id': self.exec_id, 'code': code, 'error': error})
        self.exec_id = None

    def _abandon_exec(self, code: int, name: str, value: str) -> None:
        """Ends the current exec after an exception escaped run_exec (a second SIGINT landing in
        the agent's own code, or an agent bug)."""
        if self.exec_id is not None and not self.done_sent:
            self._flush_stdio()
            self._send_done(code, {'name': name, 'value': value, 'traceback': f'{name}: {value}\n'})
        self.exec_id = None
        self.user_active = False

    def _run_cell(self, source: str, count: int) -> tuple[int, dict | None]:
        filename = f'<cell-{count}>'
        # Registered so tracebacks show the cell's lines (mtime None: never evicted).
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        code, error = self._execute(source, filename)
        return self._after_cell(code, error)

    def _execute(self, source: str, filename: str) -> tuple[int, dict | None]:
        """Runs the cell; if its last statement is an expression, that value is the main result."""
        self.user_active = True
        try:
            tree = compile(source, filename, 'exec', ast.PyCF_ONLY_AST | TOP_LEVEL_AWAIT)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if tree.body:
                self._run_code(compile(tree, filename, 'exec', TOP_LEVEL_AWAIT))
            if last is not None:
                value = self._run_code(compile(ast.Expression(last.value), filename, 'eval', TOP_LEVEL_AWAIT))
                if value is not None and not _ends_with_semicolon(source, last):
                    builtins._ = value  # type: ignore[attr-defined]
                    bundle = mime_bundle(value)
                    if _is_figure(value):
                        self._close_figure(value)  # shown; the end-of-cell sweep must skip it
                    self.publish(bundle, main=True)
            self.user_active = False
            return 0, None
        except SystemExit as exc:
            self.user_active = False
            return self._system_exit(exc.code), None
        except KeyboardInterrupt as exc:
            self.user_active = False
            return self._interrupted(exc)
        except BaseException as exc:  # noqa: BLE001 - the user's exception, reported
            self.user_active = False
            return 1, self._report(exc)

    def _run_code(self, code: types.CodeType) -> Any:
        result = eval(code, self.ns)  # noqa: S307 - running the user's code is the point
        if code.co_flags & CO_COROUTINE:
            result = self._event_loop().run_until_complete(result)
        return result

    def _event_loop(self) -> Any:
        import asyncio
        if self.loop is None or self.loop.is_closed() or self.loop.is_running():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop

    def _after_cell(self, code: int, error: dict | None) -> tuple[int, dict | None]:
        """Figures still open become display results (if our backend is active), then close."""
        plt = sys.modules.get('matplotlib.pyplot')
        backend = sys.modules.get('podflare_mpl_backend')
        if plt is None:
            return code, error
        self.user_active = True
        try:
            if backend is not None and code != 130 and code != 124 and self._backend_active():
                backend.show()
            self.user_active = False
        except KeyboardInterrupt as exc:
            self.user_active = False
            if error is None:
                code, error = self._interrupted(exc)
        except BaseException as exc:  # noqa: BLE001 - a figure that fails to render
            self.user_active = False
            if error is None:
                code, error = 1, self._report(exc)
        try:
            if self._backend_active():
                plt.close('all')
        except Exception:
            pass
        return code, error

    @staticmethod
    def _backend_active() -> bool:
        mpl = sys.modules.get('matplotlib')
        try:
            return mpl is not None and dict.__getitem__(mpl.rcParams, 'backend') == MPL_BACKEND
        except Exception:
            return False

    @staticmethod
    def _close_figure(figure: Any) -> None:
        plt = sys.modules.get('matplotlib.pyplot')
        if plt is not None:
            try:
                plt.close(figure)
            except Exception:
                pass

    # ---- outcomes -------------------------------------------------------------------------

    def _system_exit(self, code: Any) -> int:
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        self._write_stderr(f'{code}\n')
        return 1

    def _interrupted(self, exc: KeyboardInterrupt) -> tuple[int, dict]:
        """KeyboardInterrupt: the supervisor's note says whether it was a timeout."""
        self._read_commands(block=False)
        note = self.notes.get(self.exec_id)  # type: ignore[arg-type]
        if note is None or note.get('reason') != 'timeout':
            return 130, self._report(exc)
        value = f'execution exceeded timeout_ms={note.get("timeout_ms")}'
        tb = self._user_traceback(exc.__traceback__, interrupt=True)
        lines = list(traceback.TracebackException(type(exc), exc, tb).format())
        lines[-1] = f'TimeoutError: {value}\n'
        text = ''.join(lines)
        self._write_stderr(text)
        return 124, {'name': 'TimeoutError', 'value': value, 'traceback': text}

    def _report(self, exc: BaseException, with_traceback: bool = True) -> dict:
        """The error event's data; the same traceback goes to stderr, which is all the hosted API
        shows."""
        tb = self._user_traceback(exc.__traceback__, isinstance(exc, KeyboardInterrupt)) if with_traceback else None
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        text = ''.join(traceback.format_exception(type(exc), exc, tb))
        self._write_stderr(text)
        try:
            value = str(exc)
        except Exception:
            value = f'<unprintable {type(exc).__name__} object>'
        return {'name': type(exc).__name__, 'value': value, 'traceback': text}

    @staticmethod
    def _user_traceback(tb: types.TracebackType | None, interrupt: bool = False) -> types.TracebackType | None:
        """Drops the agent's frames (and asyncio's, for top-level await) above the cell. For an
        interrupt, also the agent's frames below the user's code (the SIGINT handler, display())."""
        t = tb
        while t is not None and not t.tb_frame.f_code.co_filename.startswith('<cell-'):
            t = t.tb_next
        if t is None:  # no cell frame (a SyntaxError): only drop the agent's leading frames
            t = tb
            while t is not None and t.tb_frame.f_code.co_filename == AGENT_FILE:
                t = t.tb_next
        if interrupt:
            last_user = None
            entry = t
            while entry is not None:
                if entry.tb_frame.f_code.co_filename != AGENT_FILE:
                    last_user = entry
                entry = entry.tb_next
            if last_user is not None:
                last_user.tb_next = None
        return t

    def _write_stderr(self, text: str) -> None:
        try:
            self.stderr.write(text)
            self.stderr.flush()
        except Exception:
            pass

    def _flush_stdio(self) -> None:
        """Python streams (also ones the user installed) and C stdio, before every message to the
        supervisor, so output precedes the result or exit that followed it."""
        for stream in {id(s): s for s in (sys.stdout, sys.stderr, self.stdout, self.stderr)}.values():
            try:
                stream.flush()
            except Exception:
                pass
        if self.fflush is not None:
            try:
                self.fflush(None)
            except Exception:
                pass


def _ends_with_semicolon(source: str, node: ast.AST) -> bool:
    """`expr;` at the end of a cell suppresses its display, as in IPython."""
    lines = re.split(r'\r\n|\r|\n', source)
    try:
        rest = lines[node.end_lineno - 1].encode('utf-8')[node.end_col_offset:]  # type: ignore[operator]
    except (IndexError, TypeError):
        return False
    return rest.lstrip().startswith(b';')


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _ensure_std_fds() -> None:
    """fds 0-2 must exist, or pipes created later would land on them and be clobbered."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main() -> int:
    _ensure_std_fds()
    if os.getpid() == 1:
        podflare_fork.protect_proc()  # PID 1 of a sandbox: cover the kernel's global knobs
    if len(sys.argv) == 4 and sys.argv[1] == '--worker':
        # A fresh interpreter for a fork child's supervisor (see Supervisor._become_worker).
        Worker(int(sys.argv[2]), int(sys.argv[3])).main()
        return 0
    channel_fd = int(os.environ.get('PODFLARE_AGENT_FD', '3'))
    if os.path.isdir(HOME):
        os.chdir(HOME)  # inherited by every worker: the default cwd
    return Supervisor(channel_fd).run()


if __name__ == '__main__':
    sys.exit(main())
