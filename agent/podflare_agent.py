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

import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable

import podflare_fork
from podflare_channel import ChannelClosed, ChannelMixin, open_channel
from podflare_common import HOME, LineBuffer
from podflare_checkpoint import CheckpointOpsMixin
from podflare_exec import Exec, ExecMixin, OutputPipe
from podflare_files import FileOps
from podflare_processes import ProcessTable
from podflare_requests import resolve_path
from podflare_state_ops import StateOpsMixin
from podflare_worker import Worker
from podflare_worker_control import WorkerHandle, WorkerMixin

#: A fork child starts its worker on the first request that needs it, or after this idle time.
FORK_CHILD_WORKER_DELAY_S = 0.05


class Supervisor(ChannelMixin, ExecMixin, WorkerMixin, StateOpsMixin, CheckpointOpsMixin):
    """The agent's first process: one `selectors` loop over the channel, the worker's pipes and
    timers. Each concern lives in its mixin's module; this class holds the state they share."""

    def __init__(self, channel_fd: int, inherited: 'Worker | None' = None, exec_count: int = 0, worker_now: bool = False):
        # In a fork child: the interpreter to adopt as the first worker (later restarts exec a
        # fresh one, since this process's memory holds the parent's state).
        self.inherited = inherited
        # A sandbox made by fork: this process holds the parent's memory, so a restarted
        # interpreter must be a fresh exec, not a fork of it.
        self.fork_child = inherited is not None
        # A fork child whose first request follows at once (a pool miss): its worker starts now.
        self.fork_worker_now = worker_now
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
            **self._checkpoint_ops(),
            **self.procs.ops(),
        }

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        try:
            if self.fork_child and not self.fork_worker_now:
                # A fork child's interpreter already holds its state (and it said hello as soon
                # as it connected). Its worker (a fork of this process) is started by the first
                # request that needs it, or once the child has been idle a moment: not while its
                # siblings are still being set up, nor at all in a child closed at once. A pool
                # miss starts it at once: its first request then finds it ready.
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

    @staticmethod
    def become_fork_child_supervisor(channel_fd: int, worker: Worker, exec_count: int, worker_now: bool) -> int:
        """Handed to each worker: what a fork child made by it runs (see supervise_fork_child)."""
        return supervise_fork_child(channel_fd, worker, exec_count, worker_now)


def supervise_fork_child(channel_fd: int, worker: Worker, exec_count: int, worker_now: bool = False) -> int:
    """In a fork child (the worker forked it and said hello on `channel_fd`): supervises the
    inherited interpreter for the child's sandbox; returns the exit status."""
    supervisor = Supervisor(channel_fd, inherited=worker, exec_count=exec_count, worker_now=worker_now)
    supervisor.hello_sent = True
    return supervisor.run()


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
