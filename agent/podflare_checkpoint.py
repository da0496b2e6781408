"""Checkpoints held inside the sandbox (issue 23), the in-sandbox half (stdlib only).

A checkpoint is one plain fork of the worker (the interpreter holding the user's state): its
memory is the worker's, shared copy-on-write by the kernel. It stays in the sandbox's own
namespaces and cgroup (so it counts against the sandbox's memory limit), in a process group of its own
(an interrupt or a restart of the live interpreter never reaches it), and blocks on a pipe until
the supervisor tells it what to do. Nothing a runnable sandbox needs is made for it — no
namespaces, no root, no channel, no second process — which is why a checkpoint costs one fork.
Its files are the server's business (a frozen copy of the sandbox's upper layer).

Restore is in place: the supervisor (PID 1) ends every process of the live state, switches the
sandbox's root to the checkpoint's files (an overlay the server mounted at `root` in this mount
namespace), and the checkpoint's interpreter becomes the worker. The sandbox keeps its
namespaces, network, cgroups and channel: a restore nests no pid namespace, so a sandbox can be
restored any number of times. A checkpoint that must stay forks a copy of itself first, and the
copy holds on.

The supervisor reaches a checkpoint through the write end of the checkpoint's wake pipe, which it
opens through /proc/<pid>/fd (the checkpoint keeps both ends). The supervisor hands pipes the other
way by number: the checkpoint opens /proc/<supervisor>/fd/<n>. Both are processes of this sandbox,
as the same user: nothing is exposed that code in the sandbox could not already reach.

What a restore cannot bring back (documented): sockets (closed in a checkpoint, as in a fork
child), background processes and terminals (ended with the live state), and processes that user
code moved into pid namespaces of its own (they are not in this namespace's process list).
"""
from __future__ import annotations

import json
import os
import selectors
import signal
from typing import Any

import podflare_fork
from podflare_common import HOME, encode_line
from podflare_requests import AgentError, bad_request

#: How long a restore waits for leftover processes of the live state to go.
KILL_ROUNDS = 50


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


# ---- the worker's side: taking a checkpoint ---------------------------------------------------

def take(worker: Any, msg: dict) -> None:
    """In the worker, idle between execs: forks the frozen copy and names it to the supervisor
    (its pid, and the fd number of its wake pipe's write end)."""
    worker._flush_stdio()
    files, sockets = podflare_fork.capture_files(keep={worker.cmd_fd, worker.ctl_fd})
    cwd = os.getcwd()
    wake_r, wake_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(wake_r)
        os.close(wake_w)
        worker.send({'type': 'checkpointed', 'id': msg.get('id'), 'error': f'fork failed: {exc}'})
        return
    if pid == 0:
        code = 70
        try:
            # As little as possible runs here before the copy blocks: every page it writes (even a
            # reference count) becomes a private copy for as long as the checkpoint lives.
            _own_group()
            podflare_fork.close_fds(sockets + [worker.cmd_fd, worker.ctl_fd])
            first = os.read(wake_r, 4096)  # blocked until the supervisor has a command for us
            _hold(worker, files, cwd, wake_r, wake_w, first)
        except BaseException as exc:  # noqa: BLE001 - report and die, never return into the worker's loop
            try:
                os.write(2, f'podflare checkpoint failed: {type(exc).__name__}: {exc}\n'.encode())
            except OSError:
                pass
        os._exit(code)
    _own_group(pid)  # before anyone hears of it: a signal to our group must never reach it
    os.close(wake_r)
    os.close(wake_w)
    worker.fork_pids[pid] = _pidfd(pid)  # ours to reap until we end (then the supervisor's)
    worker.send({'type': 'checkpointed', 'id': msg.get('id'), 'pid': pid, 'wake_fd': wake_w})


def _own_group(pid: int = 0) -> None:
    """Puts a checkpoint's process (`pid`, or this one) in a process group of its own, out of the
    worker's: the worker's interrupts and restarts (signals to its group) never reach it. Both the
    parent and the child do it (whichever runs first); a later call may fail harmlessly."""
    try:
        os.setpgid(pid, 0)
    except OSError:
        pass


def _hold(worker: Any, files: list, cwd: str, wake_r: int, wake_w: int, first: bytes) -> None:
    """The frozen copy, woken by its first command: does what it is told on its wake pipe (a
    copy made for a restore that keeps the checkpoint waits on, as the first one did)."""
    if not first:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    podflare_fork.close_fds([fd for fd in worker.fork_pids.values() if fd is not None])
    worker.fork_pids = {}
    pending = first
    while True:
        while b'\n' not in pending:
            data = os.read(wake_r, 4096)
            if not data:
                os._exit(0)
            pending += data
        line, pending = pending.split(b'\n', 1)
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        if not isinstance(cmd, dict):
            continue
        if cmd.get('op') == 'vars':
            _answer_vars(worker, cmd)
        elif cmd.get('op') == 'resume':
            copy = _fork_copy() if cmd.get('keep') else None
            if copy == 0:
                continue  # the copy: holds on as the checkpoint
            _resume(worker, cmd, files, cwd, copy, (wake_r, wake_w))


def _fork_copy() -> int:
    """A copy of this frozen state, in a process group of its own. Returns its pid (0 in the
    copy); the worker this process becomes reaps it (the supervisor, once that worker is gone)."""
    copy = os.fork()
    if copy == 0:
        _own_group()
        return 0
    _own_group(copy)
    return copy


def _resume(worker: Any, cmd: dict, files: list, cwd: str, copy: int | None, wake: tuple[int, int]) -> None:
    """Becomes the sandbox's worker: its files reopened in the restored root, its pipes to the
    supervisor taken from the supervisor's fd table. Never returns."""
    supervisor = int(cmd['supervisor'])
    podflare_fork.restore_files(files)
    cmd_fd = os.open(f'/proc/{supervisor}/fd/{int(cmd["cmd"])}', os.O_RDONLY | os.O_CLOEXEC)
    ctl_fd = os.open(f'/proc/{supervisor}/fd/{int(cmd["ctl"])}', os.O_WRONLY | os.O_CLOEXEC)
    podflare_fork.close_fds(list(wake))
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir(HOME if os.path.isdir(HOME) else '/')
    os.write(ctl_fd, encode_line({'type': 'restored', 'id': cmd.get('id'), 'copy': copy}))
    worker.resume(cmd_fd, ctl_fd, {copy: _pidfd(copy)} if copy else None)


def _answer_vars(worker: Any, cmd: dict) -> None:
    """The frozen interpreter's variables, computed in a throwaway fork (so that this copy's
    pages stay shared) and written to the supervisor's pipe as one line."""
    out = os.open(f'/proc/{int(cmd["supervisor"])}/fd/{int(cmd["fd"])}', os.O_WRONLY | os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                data = memoryview(encode_line({'vars': podflare_fork.snapshot_vars(worker.ns)}))
                while data:
                    data = data[os.write(out, data):]
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            os.write(out, encode_line({'error': 'the checkpoint\'s variables could not be listed'}))
    finally:
        os.close(out)


# ---- the supervisor's side ----------------------------------------------------------------------

class Held:
    """A checkpoint as the supervisor holds it."""

    def __init__(self, pid: int, wake: int):
        self.pid = pid
        self.pidfd = _pidfd(pid)
        self.wake = wake

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:
            with open(f'/proc/{self.pid}/stat') as f:
                return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError:
            pass

    def tell(self, msg: dict) -> None:
        """A command on its wake pipe (it is blocked reading it)."""
        data = encode_line(msg)
        if os.write(self.wake, data) != len(data):
            raise OSError('short write to a checkpoint')

    def close(self) -> None:
        for fd in (self.wake, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _ref(req: dict) -> str:
    ref = req.get('ref')
    if not isinstance(ref, str) or not ref or len(ref) > 64:
        raise bad_request('ref must be a short non-empty string')
    return ref


class CheckpointOpsMixin:
    """checkpoint, checkpoint_drop, checkpoint_restore, checkpoint_vars (the supervisor's ops)."""

    def _checkpoint_ops(self) -> dict:
        self.held: dict[str, Held] = {}
        self.checkpoint_refs: dict[int, str] = {}      # request id -> ref, while the worker forks
        self.taking: dict[int, str] = {}               # the same, for checkpoints answered already
        self.failed: dict[str, str] = {}               # ref -> why the worker could not fork it
        self.deferred_ckpt_ops: list[dict] = []        # requests about a checkpoint still being forked
        self.restore_pipes: dict[int, tuple[int, int]] = {}  # request id -> our copies of the new worker's ends
        return {
            'checkpoint': self._op_checkpoint,
            'checkpoint_drop': self._op_checkpoint_drop,
            'checkpoint_restore': self._op_checkpoint_restore,
            'checkpoint_vars': self._op_checkpoint_vars,
        }

    def _checkpoint_fds(self) -> list[int]:
        """What a forked worker must not keep: the checkpoints' wake pipes and pidfds."""
        return [fd for h in getattr(self, 'held', {}).values() for fd in (h.wake, h.pidfd) if fd is not None]

    def _op_checkpoint(self, req: dict) -> dict | None:
        """Answered as soon as the fork is asked of a ready, idle worker: the worker reads its pipe
        in order, so it forks before it runs anything sent after this answer (requests about this
        checkpoint wait here until it has). Otherwise answered once the worker has forked."""
        ref = _ref(req)
        if ref in self.held or ref in self.taking.values():
            raise AgentError('conflict', f'checkpoint {ref} exists')
        worker = self.worker
        if worker is None or not worker.ready or self.exec is not None:
            self.checkpoint_refs[req['id']] = ref
            self._worker_op(req, 'checkpointed', {'op': 'checkpoint'})
            return None
        self.failed.pop(ref, None)
        self.taking[req['id']] = ref
        self._worker_send({'op': 'checkpoint', 'id': req['id']})
        return {}

    def _wait_for_fork(self, req: dict, any_fork: bool = False) -> bool:
        """Whether `req` (about a checkpoint being forked; with `any_fork`, while any is) was put
        aside until the fork is done."""
        if self.taking and (any_fork or req.get('ref') is None or req.get('ref') in self.taking.values()):
            self.deferred_ckpt_ops.append(req)
            return True
        return False

    def _forks_done(self) -> None:
        """Requests put aside for a fork are handled now."""
        if self.taking:
            return
        deferred, self.deferred_ckpt_ops = self.deferred_ckpt_ops, []
        for req in deferred:
            self._handle_line(json.dumps(req).encode())

    def _checkpoint_worker_gone(self) -> None:
        """The worker died: checkpoints it had not forked yet never will be."""
        for ref in self.taking.values():
            self.failed[ref] = 'the interpreter died before it could be checkpointed'
        self.taking.clear()
        self._forks_done()

    def _op_checkpoint_drop(self, req: dict) -> dict | None:
        if self._wait_for_fork(req):
            return None
        if req.get('ref') is None:
            self.failed.clear()
        else:
            self.failed.pop(_ref(req), None)
        refs = list(self.held) if req.get('ref') is None else [_ref(req)]
        for ref in refs:
            held = self.held.pop(ref, None)
            if held is not None:
                held.signal(signal.SIGKILL)
                held.close()
        return {}

    def _op_checkpoint_vars(self, req: dict) -> None:
        if self._wait_for_fork(req):
            return
        held = self._held(req)
        r, w = os.pipe()
        os.set_blocking(r, False)
        buf = bytearray()

        def finish(reply: dict) -> None:
            self.sel.unregister(r)
            os.close(r)
            os.close(w)
            self.send({'id': req['id'], **reply})

        def readable(_mask: int) -> None:
            try:
                data = os.read(r, 1 << 20)
            except BlockingIOError:
                return
            buf.extend(data)
            if b'\n' in buf or not data:
                try:
                    msg = json.loads(bytes(buf).split(b'\n', 1)[0])
                except ValueError:
                    msg = {}
                if isinstance(msg, dict) and isinstance(msg.get('vars'), dict):
                    finish({'ok': True, 'vars': msg['vars']})
                else:
                    finish({'ok': False, 'error': {'code': 'conflict', 'message': str(msg.get('error') if isinstance(msg, dict) else '')
                                                   or 'the checkpoint could not list its variables'}})

        self.sel.register(r, selectors.EVENT_READ, readable)
        try:
            held.tell({'op': 'vars', 'fd': w, 'supervisor': os.getpid()})
        except OSError:
            finish({'ok': False, 'error': {'code': 'conflict', 'message': 'the checkpoint is gone'}})

    def _held(self, req: dict) -> Held:
        ref = _ref(req)
        held = self.held.get(ref)
        if held is None and ref in self.failed:
            raise AgentError('conflict', f'checkpoint {ref} could not be taken: {self.failed[ref]}')
        if held is None:
            raise AgentError('not_found', f'no checkpoint {ref}')
        if not held.alive():
            self.held.pop(ref).close()
            raise AgentError('conflict', f'checkpoint {ref} is gone: its process ended')
        return held

    def _op_checkpoint_restore(self, req: dict) -> None:
        """Ends the live state, switches the root to `root` and makes the checkpoint the worker;
        answered once it is (see _on_checkpoint_message)."""
        if self._wait_for_fork(req, any_fork=True):  # the worker it ends may be forking
            return
        if self.exec is not None:
            raise AgentError('conflict', f'exec {self.exec.id} is running')
        held = self._held(req)
        root = req.get('root')
        if not isinstance(root, str) or not root.startswith('/'):
            raise bad_request('root must be an absolute path')
        keep = bool(req.get('keep'))
        self._end_live_state(keep={h.pid for h in self.held.values()})
        podflare_fork.switch_root(root)
        os.chdir(HOME if os.path.isdir(HOME) else '/')
        cmd_r, cmd_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        try:
            held.tell({'op': 'resume', 'id': req['id'], 'keep': keep, 'supervisor': os.getpid(), 'cmd': cmd_r, 'ctl': ctl_w})
        except OSError:
            for fd in (cmd_r, cmd_w, ctl_r, ctl_w):
                os.close(fd)
            self.held.pop(_ref(req)).close()
            self._start_worker()
            raise AgentError('conflict', 'the checkpoint ended before it could be restored')
        ref = _ref(req)
        if keep:
            self.checkpoint_refs[req['id']] = ref  # its copy takes the ref over
        else:
            self.held.pop(ref).close()
        self.restore_pipes[req['id']] = (cmd_r, ctl_w)
        self.pending_worker_ops[req['id']] = 'restored'
        self._adopt_worker(held.pid, ctl_r, cmd_w)

    def _end_live_state(self, keep: set[int]) -> None:
        """Every process of the live state ends: the worker, bash execs, background processes,
        and whatever else runs in this pid namespace (fork children of this sandbox live in
        namespaces of their own, nested in ours, and are left alone)."""
        worker = self.worker
        if worker is not None:
            self.worker = None
            self.children.pop(worker.pid, None)
            for fd in (worker.ctl_r, worker.cmd_w):
                if fd in self.sel.get_map():
                    self.sel.unregister(fd)
                os.close(fd)
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except OSError:
                pass
        self.worker_start_at = None
        self.deferred_worker_msgs.clear()
        self.state_lost_pending = False
        self.files.abort_all()
        self.procs.kill_all()
        for pgid in list(self.bash_groups):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        # Each once (a SIGKILLed process never runs again: no need to wait for its exit), and
        # again over the list until a pass finds none new (one may have forked meanwhile).
        own = os.readlink('/proc/self/ns/pid')
        killed = {os.getpid(), *keep}
        for _ in range(KILL_ROUNDS):
            found = False
            for name in os.listdir('/proc'):
                if not name.isdigit() or int(name) in killed:
                    continue
                pid = int(name)
                try:
                    if os.readlink(f'/proc/{pid}/ns/pid') != own:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                    found = True
                except OSError:
                    continue
            if not found:
                return

    def _adopt_worker(self, pid: int, ctl_r: int, cmd_w: int) -> None:
        from podflare_worker_control import WorkerHandle
        os.set_blocking(ctl_r, False)
        os.set_blocking(cmd_w, False)
        self.worker = WorkerHandle(pid, ctl_r, cmd_w)
        self.children[pid] = self._on_worker_exit
        self.sel.register(ctl_r, selectors.EVENT_READ, self._on_worker_readable)

    def _on_checkpoint_message(self, msg: dict) -> None:
        """The worker's `checkpointed`, or a restored checkpoint's `restored`."""
        kind = msg.get('type')
        req_id = msg.get('id')
        if kind == 'checkpointed' and req_id in self.taking:
            self._forked(self.taking.pop(req_id), msg)
            self._forks_done()
            return
        if self.pending_worker_ops.get(req_id) != kind:
            return
        self.pending_worker_ops.pop(req_id)
        ref = self.checkpoint_refs.pop(req_id, None)
        if kind == 'restored':
            for fd in self.restore_pipes.pop(req_id, ()):
                os.close(fd)
            copy = msg.get('copy')
            if ref is not None:
                old = self.held.pop(ref, None)
                if isinstance(copy, int) and copy > 0 and old is not None:
                    # The copy holds the same wake pipe (inherited): our end stays valid.
                    self.held[ref] = Held(copy, old.wake)
                    if old.pidfd is not None:
                        os.close(old.pidfd)
                elif old is not None:
                    old.close()
            self.send({'id': req_id, 'ok': True, 'kept': ref is not None and ref in self.held})
            return
        if ref is None:
            return
        error = self._forked(ref, msg)
        self.send({'id': req_id, 'ok': True} if error is None else {'id': req_id, 'ok': False, 'error': {'code': 'internal', 'message': error}})

    def _forked(self, ref: str, msg: dict) -> str | None:
        """The worker's `checkpointed`: the copy is held under `ref` (or why not, also kept in `failed`)."""
        pid, wake_fd = msg.get('pid'), msg.get('wake_fd')
        if msg.get('error') or not isinstance(pid, int) or not isinstance(wake_fd, int):
            self.failed[ref] = str(msg.get('error') or 'no checkpoint')
            return self.failed[ref]
        try:
            wake = os.open(f'/proc/{pid}/fd/{wake_fd}', os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            self.failed[ref] = f'checkpoint unreachable: {exc}'
            return self.failed[ref]
        self.held[ref] = Held(pid, wake)
        return None


__all__ = ['take', 'CheckpointOpsMixin', 'Held']
