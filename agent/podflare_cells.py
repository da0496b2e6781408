"""Running a cell in the worker like a notebook does: the last expression is the main result,
top-level await works, tracebacks show the cell's lines without the agent's frames, and
SystemExit, KeyboardInterrupt and timeouts become exit codes and errors."""
from __future__ import annotations

import ast
import builtins
import linecache
import os
import re
import sys
import traceback
import types
from typing import Any

from podflare_common import AGENT_DIR, HOME, TIMEOUT_EXIT_CODE
from podflare_display import MPL_BACKEND, is_figure, mime_bundle

CO_COROUTINE = 0x0080             # code flag of a cell compiled with top-level await
TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
#: Frames of the agent's own modules: tracebacks of user code leave them out.
AGENT_FILES = frozenset(os.path.join(AGENT_DIR, name) for name in os.listdir(AGENT_DIR)
                        if name.startswith('podflare_') and name.endswith('.py'))


class CellsMixin:
    """The worker's execs (see Worker for the state they use)."""


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
            self.send({'type': 'done', 'id': self.exec_id, 'code': code, 'error': error})
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
                    if is_figure(value):
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
