"""The agent's worker: the process that runs user Python code in one persistent namespace.

Forked from the supervisor (podflare_agent.py), it reads JSON-line commands from one pipe and
answers on another; its fd 1 and 2 are pipes the supervisor reads. It runs cells like a notebook
(the last expression is displayed, top-level await works, rich display via `display()` and
matplotlib), and for a sandbox fork it forks itself once per child (podflare_fork.py); each
child then runs a supervisor of its own, which `become_supervisor` starts. Single-threaded, so
that it can be forked. Standard library only.
"""
from __future__ import annotations

import builtins
import gc
import importlib
import io
import json
import os
import select
import signal
import sys
import traceback
import types
from collections import deque
from typing import Any, Callable

import podflare_checkpoint
import podflare_fork
from podflare_cells import CellsMixin
from podflare_common import AGENT_DIR, CHANNEL_READ, HOME, LineBuffer, encode_line, hello_message
from podflare_display import MatplotlibHook, figure_bundle, is_figure, mime_bundle, mime_value

#: Runs the supervisor of a fork child, over the worker it inherits (given by podflare_agent):
#: (channel fd, worker, exec count, whether to start its worker at once) -> exit status.
BecomeSupervisor = Callable[[int, 'Worker', int, bool], int]


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (readable once it ends), where the kernel and Python have them."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


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


def _make_text_stream(fd: int) -> io.TextIOWrapper:
    """Line-buffered (flushed at every newline or carriage return, like a terminal), so each
    print() becomes one write and output streams while the code runs."""
    raw = io.FileIO(fd, 'w', closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding='utf-8', errors='backslashreplace',
                            line_buffering=True)


class Worker(CellsMixin):
    def __init__(self, cmd_fd: int, ctl_fd: int, become_supervisor: BecomeSupervisor, preload: bool = True):
        self.cmd_fd = cmd_fd
        self.become_supervisor = become_supervisor
        # The interpreter of a zygote (server zygote.ts): every sandbox it forks is a new one.
        self.is_zygote = False
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
        self.send({'type': 'ready', 'pid': self.pid})
        while True:
            try:
                msg = self._next_message()
                self._reap_fork_children()  # ended fork children are ours to reap: no zombies
                op = msg.get('op')
                if op == 'exec':
                    self.run_exec(msg)
                elif op == 'fork':
                    self.fork_children(msg)
                elif op == 'checkpoint':
                    podflare_checkpoint.take(self, msg)
                elif op == 'vars':
                    self.send({'type': 'vars', 'id': msg.get('id'), 'vars': podflare_fork.snapshot_vars(self.ns)})
                elif op == 'reseed':
                    os.environ.update(msg.get('env') or {})
                    podflare_fork.reseed()
                    self.send({'type': 'reseeded', 'id': msg.get('id')})
            except KeyboardInterrupt:
                self._abandon_exec(130, 'KeyboardInterrupt', '')
            except Exception as exc:  # a bug of ours: report it, keep the interpreter
                text = ''.join(traceback.format_exception(exc))
                self._write_stderr(f'podflare agent error:\n{text}')
                self._abandon_exec(1, 'AgentError', str(exc))

    def resume(self, cmd_fd: int, ctl_fd: int, children: dict[int, int | None] | None = None) -> None:
        """In a fork child: the same interpreter (globals, modules, open files) under a new
        supervisor; only the control pipes are new. `children`: processes of ours to reap
        (pid -> pidfd), e.g. a restored checkpoint's copy."""
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
        self.fork_pids = dict(children or {})
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
        self.send({'type': 'forked', 'id': msg.get('id'), 'pids': pids, 'error': error})

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
        # A zygote's only child is a create that missed the pool: its first request follows at
        # once, so its worker starts at once too. Other fork children start theirs lazily (a
        # checkpoint never needs one; siblings are still being set up).
        worker_now = self.is_zygote and len(msg.get('children') or []) == 1
        self.is_zygote = False  # this copy is a sandbox's interpreter now
        os._exit(self.become_supervisor(sock.detach(), self, int(msg.get('exec_count') or 0), worker_now))

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
        sys.meta_path.insert(0, MatplotlibHook())
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
        # A zygote's list (the server's, per template) is taken out of the environment once done:
        # the sandboxes forked from this interpreter must look like fresh ones, and a worker they
        # restart later starts as a fresh sandbox's does.
        zygote = os.environ.pop('PODFLARE_ZYGOTE_PRELOAD', None)
        self.is_zygote = zygote is not None
        for name in (os.environ.get('PODFLARE_PRELOAD', '') + ',' + (zygote or '')).split(','):
            if name.strip():
                try:
                    importlib.import_module(name.strip())
                except BaseException:  # noqa: BLE001 - a broken preload must not stop the worker
                    pass
        if zygote is not None:
            # What is loaded now is shared with every fork: out of the collector's reach, its
            # pages are not copied into each child by a collection touching them.
            gc.collect()
            gc.freeze()

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
            if msg.get('type') == 'interrupt':
                self.notes[msg.get('id')] = msg
            elif msg.get('type') == 'ack':
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
        self.send({'type': 'result', 'id': self.exec_id, 'data': bundle, 'main': main, 'ack': not main})
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
                if is_figure(obj):
                    self._close_figure(obj)
            self.publish(bundle, main=False)
