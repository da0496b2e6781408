#!/usr/bin/python3
"""Podflare in-sandbox agent.

The agent is two processes:

* the **supervisor** (the process the server launches) speaks the channel protocol over fd 3
  (JSON lines; defined in packages/protocol/src/agent.ts, explained in docs/protocol.md). It does
  file operations, runs bash commands, watches the worker and enforces timeouts. It never runs
  user code, so user code cannot take the channel down.
* the **worker** (podflare_worker.py), forked from the supervisor, runs user Python code in one
  persistent namespace. Its fd 1 and 2 are pipes read by the supervisor (fd-level capture: C extensions and child
  processes are caught too), and a private pair of pipes carries JSON-line commands and results.

The supervisor is a single-threaded `selectors` loop; the worker is single-threaded too, so that it
can itself be fork()ed later for copy-on-write sandbox forks. Standard library only (Python 3.11).
"""
from __future__ import annotations

import base64
import binascii
import codecs
import errno
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import podflare_fork
from podflare_processes import ProcError, ProcessTable
from podflare_common import CHANNEL_READ, HOME, TIMEOUT_EXIT_CODE, LineBuffer, encode_line, hello_message
from podflare_worker import Worker

AGENT_FILE = os.path.abspath(__file__)
#: How long an interrupted exec may take to stop before its process (group) is killed.
INTERRUPT_GRACE_S = int(os.environ.get('PODFLARE_INTERRUPT_GRACE_MS', '2000')) / 1000
#: A fork child starts its worker on the first request that needs it, or after this idle time.
FORK_CHILD_WORKER_DELAY_S = 0.05
FORK_CHILD = False  # set in a sandbox made by fork: its supervisor holds the parent's memory

READ_CHUNK = 64 * 1024            # one stdout/stderr message carries at most one read of this size
MAX_FILE_READ = 16 * 1024 * 1024  # file_read answers at most this many bytes
IDLE_OUTPUT_CAP = 1024 * 1024     # output produced between execs kept for the next exec
# What one exec may send (characters of stdout and stderr together): past it the output is read
# and dropped, so the code still runs to its end, and a notice closes the exec's stderr.
EXEC_OUTPUT_CAP = int(os.environ.get('PODFLARE_MAX_EXEC_OUTPUT_BYTES') or 64 * 1024 * 1024)


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


def resolve_path(value: Any) -> str:
    """A request path: non-empty text without NUL; relative paths are joined to HOME."""
    if not isinstance(value, str) or not value:
        raise bad_request('path must be a non-empty string')
    if '\0' in value:
        raise bad_request('path must not contain NUL')
    return value if os.path.isabs(value) else os.path.join(HOME, value)


def check_code(code: str, language: str) -> None:
    """Code the agent can run: bash takes its code as an argv string (no NUL possible; Python
    answers NUL in source with its own SyntaxError), and both need it encodable as UTF-8 (JSON
    can carry lone surrogates, which cannot be)."""
    if language == 'bash' and '\0' in code:
        raise bad_request('bash code must not contain NUL bytes')
    try:
        code.encode('utf-8')
    except UnicodeEncodeError as exc:
        raise bad_request(f'code is not valid Unicode text (a lone surrogate at character {exc.start})') from None


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
    if isinstance(exc, (AgentError, ProcError)):
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
    # The sandbox's disk limit (EDQUOT) or the server's disk volume (ENOSPC) is full: 507.
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return 'insufficient_storage', str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
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
        # Background processes (podflare_processes.py): their own pipes, log and ops.
        self.procs = ProcessTable(self.sel, self.send, self.children.__setitem__, self._worker_cwd, resolve_path)

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
            **self.procs.ops(),
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
        self.procs.kill_all()
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
        if (proc_deadline := self.procs.next_deadline()) is not None:
            times.append(proc_deadline)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _check_timers(self) -> None:
        now = time.monotonic()
        self.procs.check_timers(now)
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
        check_code(code, language)
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
            try:
                self._start_bash(ex)
            except BaseException:
                # Whatever failed, this exec is over: the next one must not find it "running".
                if self.exec is ex:
                    self.exec = None
                raise
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
            return TIMEOUT_EXIT_CODE, {'name': 'TimeoutError', 'value': value, 'traceback': f'TimeoutError: {value}\n'}
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
        except (OSError, ValueError) as exc:
            os.close(out_r)
            os.close(err_r)
            if not isinstance(exc, OSError):  # an argument exec cannot take (checked above; belt and braces)
                raise bad_request(f'bash cannot run this: {exc}') from None
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
        fds += [self.wake_w, *parent_ends, *self.files.open_fds(), *self.procs.open_fds()]
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
        Worker(cmd_r, ctl_w, supervise_fork_child, preload=self.preload).main()

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


def supervise_fork_child(channel_fd: int, worker: Worker, exec_count: int) -> int:
    """In a fork child (the worker forked it and said hello on `channel_fd`): supervises the
    inherited interpreter for the child's sandbox; returns the exit status."""
    supervisor = Supervisor(channel_fd, inherited=worker, exec_count=exec_count)
    supervisor.hello_sent = True
    return supervisor.run()


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f'signal {sig}'


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
        Worker(int(sys.argv[2]), int(sys.argv[3]), supervise_fork_child).main()
        return 0
    channel_fd = int(os.environ.get('PODFLARE_AGENT_FD', '3'))
    if os.path.isdir(HOME):
        os.chdir(HOME)  # inherited by every worker: the default cwd
    return Supervisor(channel_fd).run()


if __name__ == '__main__':
    sys.exit(main())
