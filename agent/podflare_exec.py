"""Running code: python execs handed to the worker, bash execs run by the supervisor, their output
routing, timeouts and interrupts."""
from __future__ import annotations

import codecs
import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import podflare_js
from podflare_common import HOME, TIMEOUT_EXIT_CODE
from podflare_requests import AgentError, bad_request, check_code, exit_code_of, opt_field, resolve_path

#: How long an interrupted exec may take to stop before its process (group) is killed.
INTERRUPT_GRACE_S = int(os.environ.get('PODFLARE_INTERRUPT_GRACE_MS', '2000')) / 1000
READ_CHUNK = 64 * 1024            # one stdout/stderr message carries at most one read of this size
IDLE_OUTPUT_CAP = 1024 * 1024     # output produced between execs kept for the next exec
# What one exec may send (characters of stdout and stderr together): past it the output is read
# and dropped, so the code still runs to its end, and a notice closes the exec's stderr.
EXEC_OUTPUT_CAP = int(os.environ.get('PODFLARE_MAX_EXEC_OUTPUT_BYTES') or 64 * 1024 * 1024)


class OutputPipe:
    """The read end of a pipe carrying stdout or stderr, decoded incrementally (UTF-8, errors
    replaced) so a character split across two reads is not mangled."""

    def __init__(self, fd: int, stream: str):
        os.set_blocking(fd, False)
        self.fd = fd
        self.stream = stream  # 'stdout' or 'stderr': the event type its output travels as
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
    rich: bool = False              # javascript: rich results come as JSON lines on a pipe of their own
    result_buf: str = ''            # a partial line of that pipe


class ExecMixin:
    """The supervisor's execs. Uses the supervisor's selector, channel and worker (see
    WorkerMixin)."""


    def _pipe_reader(self, pipe: OutputPipe) -> Callable[[int], None]:
        def on_readable(_mask: int) -> None:
            text = pipe.read()
            if text:
                self._output(pipe.stream, text)
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
                self._output(pipe.stream, text)

    def _rich_results(self, text: str) -> None:
        """JSON lines from a JavaScript exec's results pipe (`display(...)` in podflare_js.py): each
        `{"data": {mime: value}}` becomes a result event of the running exec. What is not such a
        line is dropped; results count against the exec's output cap like its text."""
        ex = self.exec
        if ex is None or not ex.rich:
            return
        ex.result_buf += text
        if len(ex.result_buf) > EXEC_OUTPUT_CAP - ex.output_size:
            ex.output_dropped += len(ex.result_buf)
            ex.result_buf = ''
            return
        *lines, ex.result_buf = ex.result_buf.split('\n')
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            data = msg.get('data') if isinstance(msg, dict) else None
            if not isinstance(data, dict) or not data or not all(isinstance(k, str) and '/' in k for k in data):
                continue
            ex.output_size += len(line)
            self.send({'id': ex.id, 'type': 'result', 'data': data, 'is_main_result': False})

    def _output(self, stream: str, text: str) -> None:
        """Output belongs to the running exec; between execs it waits for the next one
        (background threads and processes), up to IDLE_OUTPUT_CAP, beyond which it is dropped."""
        if stream == 'result':
            return self._rich_results(text)
        ex = self.exec
        if ex is not None:
            room = EXEC_OUTPUT_CAP - ex.output_size
            if len(text) > room:
                ex.output_dropped += len(text) - max(room, 0)
                text = text[:max(room, 0)]
                if not text:
                    return
            ex.output_size += len(text)
            self.send({'id': ex.id, 'type': stream, 'data': text})
            return
        if self.idle_output_size + len(text) > IDLE_OUTPUT_CAP:
            return
        self.idle_output_size += len(text)
        if self.idle_output and self.idle_output[-1][0] == stream:
            self.idle_output[-1][1] += text
        else:
            self.idle_output.append([stream, text])

    def _flush_idle_output(self, ex: Exec) -> None:
        for stream, text in self.idle_output:
            self.send({'id': ex.id, 'type': stream, 'data': text})
        self.idle_output.clear()
        self.idle_output_size = 0


    def _op_exec(self, req: dict) -> None:
        language = req.get('language')
        if language not in ('python', 'bash', 'javascript'):
            raise bad_request('language must be "python", "bash" or "javascript"')
        code = req.get('code')
        if not isinstance(code, str):
            raise bad_request('code must be a string')
        rich = language == 'javascript'
        if language == 'javascript':  # a bash exec of the persistent REPL's client (podflare_js.py)
            check_code(code, 'python')
            code, language = podflare_js.bash_for(code), 'bash'
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

        ex = Exec(req['id'], language, code, timeout_ms, env, cwd, rich=rich)
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
                self._worker_send({'type': 'interrupt', 'id': ex.id, 'reason': reason,
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
            self.send({'id': ex.id, 'type': 'stderr', 'data':
                       f'\n[podflare] output truncated: {ex.output_dropped} more characters were dropped '
                       f'after the first {EXEC_OUTPUT_CAP} (PODFLARE_MAX_EXEC_OUTPUT_BYTES)\n'})
        if error is not None:
            if echo:
                self.send({'id': ex.id, 'type': 'stderr', 'data': error['traceback']})
            self.send({'id': ex.id, 'type': 'error', 'data': error})
        self.exec = None
        self.send({'id': ex.id, 'type': 'exit', 'code': code,
                   'execution_count': ex.count, 'state_lost': ex.state_lost})

    # ---- bash -----------------------------------------------------------------------------

    def _start_bash(self, ex: Exec) -> None:
        self._prune_bash_groups()
        cwd = ex.cwd or self._worker_cwd()
        env = dict(os.environ)
        env.update(ex.env or {})
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        res_r, res_w = os.pipe() if ex.rich else (-1, -1)
        if ex.rich:
            env['PODFLARE_RESULTS_FD'] = str(res_w)
        try:
            ex.proc = subprocess.Popen(
                ['bash', '-c', ex.code], stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                cwd=cwd, env=env, process_group=0, close_fds=True, pass_fds=(res_w,) if ex.rich else ())
        except (OSError, ValueError) as exc:
            os.close(out_r)
            os.close(err_r)
            if ex.rich:
                os.close(res_r)
            if not isinstance(exc, OSError):  # an argument exec cannot take (checked above; belt and braces)
                raise bad_request(f'bash cannot run this: {exc}') from None
            what = f'cd: {cwd}' if exc.filename == cwd else 'bash'
            self.send({'id': ex.id, 'type': 'stderr', 'data': f'bash: {what}: {exc.strerror}\n'})
            self._finish(ex, 1)
            return
        finally:
            os.close(out_w)
            os.close(err_w)
            if ex.rich:
                os.close(res_w)
        self.children[ex.proc.pid] = self._on_bash_exit
        self.bash_groups.add(ex.proc.pid)
        ex.pipes = [OutputPipe(out_r, 'stdout'), OutputPipe(err_r, 'stderr')] + ([OutputPipe(res_r, 'result')] if ex.rich else [])
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
