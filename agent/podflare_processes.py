"""Background processes: commands that outlive the request that started them.

The supervisor owns a `ProcessTable`. Each process is `bash -c CMD` in its own process group, with
stdin, stdout and stderr on pipes the supervisor's selector loop watches. Output is always read
(so a process that writes without pause never blocks on a full pipe, and never blocks the sandbox)
into a bounded log per process: the oldest characters are dropped past `log_chars`. Every character
has an offset (counted since the process started, stdout and stderr together), so a client that
reconnects asks for "from offset N" and gets everything still kept; what was dropped is reported.

`proc_read` may wait (`wait_ms`) for output past the offset: the answer is sent when output
arrives, when the process ends, or when the wait is over — a long poll, so the server can stream a
process's output without the agent pushing anything unasked.

Lifetime: the processes are the sandbox's. The supervisor kills their groups when the channel
closes; as PID 1 of a namespace sandbox its death takes the whole pid namespace with it, and a VM's
processes die with the VM. A fork child's supervisor starts with an empty table: the parent's
processes are not copied (only the interpreter is forked).
"""
from __future__ import annotations

import codecs
import fcntl
import os
import struct
import termios
import selectors
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from podflare_requests import AgentError

READ_CHUNK = 64 * 1024
DEFAULT_LOG_CHARS = 1024 * 1024
MAX_LOG_CHARS = 16 * 1024 * 1024
MAX_READ_CHARS = 256 * 1024      # one proc_read answer (well under the channel's line cap)
MAX_WAIT_MS = 60_000
MAX_STDIN_BACKLOG = 1024 * 1024  # bytes queued for a process that does not read its stdin
MAX_RUNNING = 256
MAX_EXITED_KEPT = 64             # finished processes stay listed (with their exit code) up to this
SIGNALS = {name: getattr(signal, name) for name in (
    'SIGTERM', 'SIGKILL', 'SIGINT', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2', 'SIGSTOP', 'SIGCONT')}


class ProcError(AgentError):
    """An error answer; `code` is one of packages/protocol/src/errors.ts."""


@dataclass
class Chunk:
    offset: int
    stream: str
    text: str


@dataclass
class Waiter:
    req_id: int
    offset: int
    max_chars: int
    deadline: float


@dataclass
class Proc:
    pid: int
    cmd: str
    cwd: str
    log_chars: int
    popen: subprocess.Popen
    started_at: float
    stdin_fd: int | None
    out_fds: dict[int, str]                     # fd -> 'stdout' | 'stderr'
    decoders: dict[int, Any]
    log: deque = field(default_factory=deque)   # Chunks, oldest first
    kept: int = 0                               # characters in `log`
    end: int = 0                                # offset just past the last character
    exit_code: int | None = None
    ended_at: float | None = None
    stdin_backlog: bytearray = field(default_factory=bytearray)
    stdin_eof: bool = False
    waiters: list[Waiter] = field(default_factory=list)
    tty: bool = False

    @property
    def start(self) -> int:
        """Offset of the oldest character still kept."""
        return self.log[0].offset if self.log else self.end

    @property
    def finished(self) -> bool:
        """Exited and every byte of its output read."""
        return self.exit_code is not None and not self.out_fds

    def info(self) -> dict:
        return {'pid': self.pid, 'cmd': self.cmd, 'cwd': self.cwd, 'running': self.exit_code is None,
                'exit_code': self.exit_code, 'started_at': self.started_at, 'ended_at': self.ended_at,
                'log_start': self.start, 'log_end': self.end, 'tty': self.tty}


def _check_env(env: Any) -> dict[str, str] | None:
    if env is None:
        return None
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and '=' not in k and '\0' not in k + v
            for k, v in env.items()):
        raise ProcError('bad_request', 'env must map names to strings')
    return env


def _check_size(value: Any) -> tuple[int, int]:
    """A terminal size `{cols, rows}`."""
    if not isinstance(value, dict):
        raise ProcError('bad_request', 'pty must be {cols, rows}')
    return _int_field(value, 'cols', 80, 1, 1000), _int_field(value, 'rows', 24, 1, 1000)


def _int_field(req: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = req.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProcError('bad_request', f'{name} must be an integer in [{lo}, {hi}]')
    return value


class ProcessTable:
    """The sandbox's background processes, driven by the supervisor's selector loop.

    `send(msg)` writes one channel message; `on_child(pid, handler)` asks the supervisor to call
    `handler(pid, status)` when it reaps `pid`; `default_cwd()` is where bash execs run."""

    def __init__(self, sel: selectors.BaseSelector, send: Callable[[dict], None],
                 on_child: Callable[[int, Callable[[int, int], None]], None],
                 default_cwd: Callable[[], str], resolve_path: Callable[[Any], str]):
        self.sel = sel
        self.send = send
        self.on_child = on_child
        self.default_cwd = default_cwd
        self.resolve_path = resolve_path
        self.procs: dict[int, Proc] = {}

    # ---- ops ------------------------------------------------------------------------------

    def ops(self) -> dict[str, Callable[[dict], dict | None]]:
        return {'proc_start': self.start, 'proc_list': self.list, 'proc_read': self.read,
                'proc_write': self.write, 'proc_signal': self.signal, 'proc_resize': self.resize}

    def start(self, req: dict) -> dict:
        cmd = req.get('cmd')
        if not isinstance(cmd, str) or not cmd or '\0' in cmd:
            raise ProcError('bad_request', 'cmd must be a non-empty string without NUL')
        env = _check_env(req.get('env'))
        cwd = req.get('cwd')
        cwd = self.resolve_path(cwd) if cwd is not None else self.default_cwd()
        log_chars = _int_field(req, 'log_chars', DEFAULT_LOG_CHARS, 1024, MAX_LOG_CHARS)
        if sum(1 for p in self.procs.values() if p.exit_code is None) >= MAX_RUNNING:
            raise ProcError('conflict', f'{MAX_RUNNING} background processes are running already')
        full_env = dict(os.environ)
        full_env.update(env or {})
        pty_size = req.get('pty')
        if pty_size is not None:
            return self._start_pty(cmd, cwd, full_env, log_chars, _check_size(pty_size))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe()
        try:
            popen = subprocess.Popen(['bash', '-c', cmd], stdin=in_r, stdout=out_w, stderr=err_w,
                                     cwd=cwd, env=full_env, process_group=0, close_fds=True)
        except OSError as exc:
            for fd in (out_r, err_r, in_w):
                os.close(fd)
            what = f'cwd {cwd}' if exc.filename == cwd else 'bash'
            raise ProcError('bad_request', f'cannot start the process ({what}): {exc.strerror}') from None
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
        for fd in (out_r, err_r, in_w):
            os.set_blocking(fd, False)
        proc = Proc(popen.pid, cmd, cwd, log_chars, popen, time.time(), in_w,
                    {out_r: 'stdout', err_r: 'stderr'},
                    {fd: codecs.getincrementaldecoder('utf-8')('replace') for fd in (out_r, err_r)})
        self.procs[proc.pid] = proc
        for fd in (out_r, err_r):
            self.sel.register(fd, selectors.EVENT_READ, self._reader(proc, fd))
        self.on_child(proc.pid, self._on_exit)
        self._forget_old()
        return {'process': proc.info()}

    def list(self, _req: dict) -> dict:
        return {'processes': [p.info() for p in self.procs.values()]}

    def read(self, req: dict) -> dict | None:
        proc = self._proc(req)
        offset = _int_field(req, 'offset', 0, 0, 2 ** 53 - 1)
        max_chars = _int_field(req, 'max_chars', MAX_READ_CHARS, 1, MAX_READ_CHARS)
        wait_ms = _int_field(req, 'wait_ms', 0, 0, MAX_WAIT_MS)
        if wait_ms and offset >= proc.end and not proc.finished:
            proc.waiters.append(Waiter(req['id'], offset, max_chars, time.monotonic() + wait_ms / 1000))
            return None
        return self._answer(proc, offset, max_chars)

    def write(self, req: dict) -> dict:
        proc = self._proc(req)
        data = req.get('data', '')
        if not isinstance(data, str):
            raise ProcError('bad_request', 'data must be a string')
        eof = req.get('eof', False) is True
        if proc.stdin_fd is None or proc.stdin_eof:
            raise ProcError('conflict', f'the stdin of process {proc.pid} is closed')
        raw = data.encode('utf-8', 'surrogateescape')
        if len(proc.stdin_backlog) + len(raw) > MAX_STDIN_BACKLOG:
            raise ProcError('conflict', f'process {proc.pid} is not reading its stdin '
                                        f'({len(proc.stdin_backlog)} bytes are waiting)')
        proc.stdin_backlog += raw
        proc.stdin_eof = eof
        self._flush_stdin(proc)
        return {}

    def resize(self, req: dict) -> dict:
        """A terminal's new size: the kernel tells its foreground process group (SIGWINCH)."""
        proc = self._proc(req)
        cols, rows = _check_size(req)
        if not proc.tty or proc.stdin_fd is None:
            raise ProcError('conflict', f'process {proc.pid} has no terminal')
        fcntl.ioctl(proc.stdin_fd, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
        return {}

    def _start_pty(self, cmd: str, cwd: str, env: dict, log_chars: int, size: tuple[int, int]) -> dict:
        """`cmd` on a new pseudo-terminal (its own session, the terminal as its controlling tty):
        one fd, the master, carries input and output."""
        master, slave = os.openpty()
        cols, rows = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
        env = {**env, 'TERM': env.get('TERM', 'xterm-256color')}
        try:
            popen = subprocess.Popen(['bash', '-c', cmd], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     start_new_session=True, close_fds=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        except OSError as exc:
            os.close(master)
            what = f'cwd {cwd}' if exc.filename == cwd else 'bash'
            raise ProcError('bad_request', f'cannot start the process ({what}): {exc.strerror}') from None
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        # The master is both the output (read) and the input (stdin_fd, written): one fd, two roles.
        out = os.dup(master)
        os.set_blocking(out, False)
        proc = Proc(popen.pid, cmd, cwd, log_chars, popen, time.time(), master, {out: 'stdout'},
                    {out: codecs.getincrementaldecoder('utf-8')('replace')}, tty=True)
        self.procs[proc.pid] = proc
        self.sel.register(out, selectors.EVENT_READ, self._reader(proc, out))
        self.on_child(proc.pid, self._on_exit)
        self._forget_old()
        return {'process': proc.info()}

    def signal(self, req: dict) -> dict:
        proc = self._proc(req)
        name = req.get('signal', 'SIGKILL')
        sig = SIGNALS.get(name) if isinstance(name, str) else None
        if sig is None:
            raise ProcError('bad_request', f'signal must be one of {", ".join(SIGNALS)}')
        if proc.exit_code is not None:
            return {'delivered': False}
        try:  # the whole group: what the command started goes too
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return {'delivered': False}
        return {'delivered': True}

    # ---- supervisor hooks -----------------------------------------------------------------

    def open_fds(self) -> list[int]:
        """Every pipe end the table holds (a forked worker closes them)."""
        fds = []
        for p in self.procs.values():
            fds += list(p.out_fds)
            if p.stdin_fd is not None:
                fds.append(p.stdin_fd)
        return fds

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for p in self.procs.values() for w in p.waiters]
        return min(deadlines) if deadlines else None

    def check_timers(self, now: float) -> None:
        for proc in self.procs.values():
            due = [w for w in proc.waiters if w.deadline <= now]
            if due:
                proc.waiters = [w for w in proc.waiters if w.deadline > now]
                for w in due:
                    self._reply(w, self._answer(proc, w.offset, w.max_chars))

    def kill_all(self) -> None:
        """The channel closed (the sandbox ends): no process outlives it."""
        for proc in self.procs.values():
            # Exited with its pipes still open: what it left behind still runs in its group.
            if proc.exit_code is None or proc.out_fds:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass

    # ---- internals ------------------------------------------------------------------------

    def _proc(self, req: dict) -> Proc:
        pid = req.get('pid')
        proc = self.procs.get(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None
        if proc is None:
            raise ProcError('not_found', f'no background process with pid {pid!r}')
        return proc

    def _answer(self, proc: Proc, offset: int, max_chars: int) -> dict:
        """The kept output from `offset` on, at most `max_chars` characters."""
        chunks: list[dict] = []
        start = proc.start
        lost = max(0, min(start, proc.end) - offset)
        pos = max(offset, start)
        budget = max_chars
        for chunk in proc.log:
            chunk_end = chunk.offset + len(chunk.text)
            if chunk_end <= pos:
                continue
            if budget <= 0:
                break
            text = chunk.text[pos - chunk.offset:][:budget]
            chunks.append({'stream': chunk.stream, 'offset': pos, 'data': text})
            pos += len(text)
            budget -= len(text)
        pos = max(pos, min(offset, proc.end))
        return {'chunks': chunks, 'next': pos, 'lost': lost, 'process': proc.info(),
                'eof': proc.finished and pos >= proc.end}

    def _reply(self, waiter: Waiter, answer: dict) -> None:
        self.send({'id': waiter.req_id, 'ok': True, **answer})

    def _wake(self, proc: Proc) -> None:
        """Answers the waits that output (or the end) has satisfied."""
        if not proc.waiters:
            return
        ready = [w for w in proc.waiters if w.offset < proc.end or proc.finished]
        if not ready:
            return
        proc.waiters = [w for w in proc.waiters if w not in ready]
        for w in ready:
            self._reply(w, self._answer(proc, w.offset, w.max_chars))

    def _append(self, proc: Proc, stream: str, text: str) -> None:
        if not text:
            return
        last = proc.log[-1] if proc.log else None
        if last is not None and last.stream == stream and len(last.text) < READ_CHUNK:
            last.text += text
        else:
            proc.log.append(Chunk(proc.end, stream, text))
        proc.end += len(text)
        proc.kept += len(text)
        # Past the bound the oldest characters go (a whole chunk, or the front of one).
        while proc.kept > proc.log_chars and proc.log:
            first = proc.log[0]
            excess = proc.kept - proc.log_chars
            if len(first.text) <= excess:
                proc.log.popleft()
                proc.kept -= len(first.text)
            else:
                first.text = first.text[excess:]
                first.offset += excess
                proc.kept -= excess

    def _reader(self, proc: Proc, fd: int) -> Callable[[int], None]:
        def on_readable(_mask: int) -> None:
            self._read_fd(proc, fd)
            self._wake(proc)
        return on_readable

    def _read_fd(self, proc: Proc, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        decoder = proc.decoders[fd]
        if data:
            self._append(proc, proc.out_fds[fd], decoder.decode(data))
            return
        self._append(proc, proc.out_fds[fd], decoder.decode(b'', True))
        self.sel.unregister(fd)
        os.close(fd)
        del proc.out_fds[fd]

    def _on_exit(self, pid: int, status: int) -> None:
        proc = self.procs.get(pid)
        if proc is None:
            return
        code = os.waitstatus_to_exitcode(status)
        proc.exit_code = 128 - code if code < 0 else code
        proc.popen.returncode = proc.exit_code  # reaped by the supervisor
        proc.ended_at = time.time()
        self._close_stdin(proc)
        # Its own output is in the pipes now; a child it left behind may keep them open, and
        # then they stay watched until that child closes them too.
        for fd in list(proc.out_fds):
            for _ in range(64):
                if fd not in proc.out_fds:
                    break
                before = proc.end
                self._read_fd(proc, fd)
                if proc.end == before and fd in proc.out_fds:
                    break
        self._wake(proc)

    def _flush_stdin(self, proc: Proc) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            while proc.stdin_backlog:
                del proc.stdin_backlog[:os.write(fd, proc.stdin_backlog)]
        except BlockingIOError:
            pass
        except OSError:  # the process closed its stdin (EPIPE): what is left cannot be delivered
            proc.stdin_backlog.clear()
            self._close_stdin(proc)
            return
        registered = fd in self.sel.get_map()
        if proc.stdin_backlog and not registered:
            self.sel.register(fd, selectors.EVENT_WRITE, lambda _mask: self._flush_stdin(proc))
        elif not proc.stdin_backlog:
            if registered:
                self.sel.unregister(fd)
            if proc.stdin_eof:
                self._close_stdin(proc)

    def _close_stdin(self, proc: Proc) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        if fd in self.sel.get_map():
            self.sel.unregister(fd)
        os.close(fd)
        proc.stdin_fd = None
        proc.stdin_backlog.clear()

    def _forget_old(self) -> None:
        """Keeps at most MAX_EXITED_KEPT finished processes (the oldest are forgotten)."""
        finished = [p for p in self.procs.values() if p.finished and not p.waiters]
        for proc in finished[:max(0, len(finished) - MAX_EXITED_KEPT)]:
            del self.procs[proc.pid]
