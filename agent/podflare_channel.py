"""The channel to the server: a socket (namespace runtime) or a virtio-serial port (VM runtime)
carrying JSON lines; the supervisor's side of request parsing, dispatch and error answers."""
from __future__ import annotations

import json
import os
import select
import socket
import stat
import time
import traceback
from typing import Any, Callable

from podflare_common import CHANNEL_READ, LineBuffer, encode_line
from podflare_requests import bad_request, error_info, log


HOST_GONE_POLL_S = 0.05  # how often a VM's agent looks for the next server while none is connected


class ChannelClosed(Exception):
    pass


class PortChannel:
    """The channel over a character device: a microVM's virtio-serial port (the host end is a
    socket). Offers the few socket methods the supervisor uses.

    The host end may close and open again: the VM outlives its server, and the next server
    reconnects to QEMU (server/src/runtime/vm/vm-held.ts). While nobody is connected, a read
    returns end-of-file (and poll says HUP) and writes block. End-of-file is therefore not the end
    here (the agent is PID 1: its end would end the VM): reads wait for the next server instead."""

    def __init__(self, fd: int):
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self.fd, flag)

    def recv(self, size: int) -> bytes:
        while True:
            try:
                data = os.read(self.fd, size)
            except BlockingIOError:
                data = None
            if data:
                return data
            if data == b'':
                # No server connected: the port stays HUP until one is; look again shortly.
                time.sleep(HOST_GONE_POLL_S)
            else:
                self.poller.poll()

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


class ChannelMixin:
    """The supervisor's channel: sends, and reads requests and answers them (`self.ops` maps an op
    name to its handler; a handler returns the answer, or None when it answers later)."""
    sock: 'socket.socket | PortChannel'
    requests: LineBuffer
    ops: dict[str, Callable[[dict], dict | None]]


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
