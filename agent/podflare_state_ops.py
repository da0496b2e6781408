"""Requests the idle worker answers: fork, the variables listing, and a VM clone's restore (new
clock, entropy, hostname)."""
from __future__ import annotations

import base64
import os
import socket
import time

import podflare_fork
from podflare_requests import AgentError, bad_request, opt_field, req_int


class StateOpsMixin:
    """Fork, vars, restore and set_time: ops on the interpreter's state, answered by the worker
    through WorkerMixin._on_worker_message."""

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
