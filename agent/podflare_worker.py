"""The agent's worker: the process that runs user Python code in one persistent namespace.

Forked from the supervisor (podflare_agent.py), it reads JSON-line commands from one pipe and
answers on another; its fd 1 and 2 are pipes the supervisor reads. It runs cells like a notebook
(the last expression is displayed, top-level await works, rich display via `display()` and
matplotlib), and for a sandbox fork it forks itself once per child (podflare_fork.py); each
child then runs a supervisor of its own, which `become_supervisor` starts. Single-threaded, so
that it can be forked. Standard library only.
"""
from __future__ import annotations

import ast
import base64
import builtins
import gc
import importlib
import importlib.util
import io
import json
import linecache
import os
import re
import select
import signal
import sys
import traceback
import types
from collections import deque
from typing import Any, Callable

import podflare_fork
from podflare_common import AGENT_DIR, CHANNEL_READ, HOME, TIMEOUT_EXIT_CODE, LineBuffer, encode_line, hello_message

MPL_BACKEND = 'module://podflare_mpl_backend'
CO_COROUTINE = 0x0080             # code flag of a cell compiled with top-level await
TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
SIMPLE_TYPES = (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)
#: Frames of these files are the agent's own: tracebacks of user code leave them out.
AGENT_FILES = frozenset(os.path.join(AGENT_DIR, name) for name in ('podflare_agent.py', 'podflare_worker.py'))
#: Runs the supervisor of a fork child, over the worker it inherits (given by podflare_agent):
#: (channel fd, worker, exec count) -> exit status.
BecomeSupervisor = Callable[[int, 'Worker', int], int]


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
    def __init__(self, cmd_fd: int, ctl_fd: int, become_supervisor: BecomeSupervisor, preload: bool = True):
        self.cmd_fd = cmd_fd
        self.become_supervisor = become_supervisor
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
        os._exit(self.become_supervisor(sock.detach(), self, int(msg.get('exec_count') or 0)))

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
        # A zygote's list (the server's, per template) is taken out of the environment once done:
        # the sandboxes forked from this interpreter must look like fresh ones, and a worker they
        # restart later starts as a fresh sandbox's does.
        zygote = os.environ.pop('PODFLARE_ZYGOTE_PRELOAD', None)
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
            if backend is not None and code != 130 and code != TIMEOUT_EXIT_CODE and self._backend_active():
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
        return TIMEOUT_EXIT_CODE, {'name': 'TimeoutError', 'value': value, 'traceback': text}

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
            while t is not None and t.tb_frame.f_code.co_filename in AGENT_FILES:
                t = t.tb_next
        if interrupt:
            last_user = None
            entry = t
            while entry is not None:
                if entry.tb_frame.f_code.co_filename not in AGENT_FILES:
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
