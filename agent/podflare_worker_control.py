"""The supervisor's side of the worker (the process running user Python code): starting it,
the command pipe to it, its messages, and its death."""
from __future__ import annotations

import json
import os
import selectors
import signal
import sys
from dataclasses import dataclass, field

from podflare_common import AGENT_DIR, CHANNEL_READ, LineBuffer, encode_line, hello_message
from podflare_requests import exit_code_of, log, signal_name
from podflare_worker import Worker

#: Run again (with --worker) to start a fresh interpreter in a fork child.
AGENT_FILE = os.path.join(AGENT_DIR, 'podflare_agent.py')


@dataclass
class WorkerHandle:
    """The supervisor's view of the worker process."""
    pid: int
    ctl_r: int                      # worker -> supervisor messages
    cmd_w: int                      # supervisor -> worker commands
    lines: LineBuffer = field(default_factory=LineBuffer)
    outbox: bytearray = field(default_factory=bytearray)
    ready: bool = False


class WorkerMixin:
    """Starts and watches the worker for the supervisor."""


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
        fds += [self.wake_w, *parent_ends, *self.files.open_fds(), *self.procs.open_fds(), *self._checkpoint_fds()]
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
        elif self.fork_child:
            # This process holds a forked parent's memory: a restarted interpreter must not.
            os.set_inheritable(cmd_r, True)
            os.set_inheritable(ctl_w, True)
            os.execv(sys.executable, [sys.executable, AGENT_FILE, '--worker', str(cmd_r), str(ctl_w)])
        Worker(cmd_r, ctl_w, self.become_fork_child_supervisor, preload=self.preload).main()

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
        kind = msg.get('type')
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
                self.send({'id': ex.id, 'type': 'result', 'data': msg.get('data') or {},
                           'is_main_result': bool(msg.get('main'))})
            if msg.get('ack'):
                self._worker_send({'type': 'ack'})
        elif kind in ('forked', 'vars', 'reseeded') and self.pending_worker_ops.pop(msg.get('id'), None) == kind:
            if kind == 'reseeded':
                self.send({'id': msg['id'], 'ok': True})
            elif kind == 'forked' and msg.get('error') and not msg.get('pids'):
                self.send({'id': msg['id'], 'ok': False, 'error': {'code': 'internal', 'message': msg['error']}})
            elif kind == 'forked':
                self.send({'id': msg['id'], 'ok': True, 'pids': msg.get('pids') or [], 'error': msg.get('error')})
            else:
                self.send({'id': msg['id'], 'ok': True, 'vars': msg.get('vars') or {}})
        elif kind in ('checkpointed', 'restored'):
            self._on_checkpoint_message(msg)
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
        self._checkpoint_worker_gone()
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
                value = f'the Python interpreter was killed by signal {sig} ({signal_name(sig)}); its state is lost'
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
