"""``sandbox.pty``: interactive terminals — ``bash -l`` on a pseudo-terminal in the sandbox, over a
WebSocket (``GET /v1/sandboxes/:id/pty``). Shaped like E2B's ``sandbox.pty``. A background thread
reads the terminal's output and hands it to ``on_data``; standard library only (a small WebSocket
client: Python has none built in)."""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from typing import Any, Callable, Dict, List, Optional

from ._client import Client
from ._errors import PodflareConnectionError, error_from_response

__all__ = ["Pty", "PtyHandle"]


class _WebSocket:
    """Masked text frames out, text frames in, ping answered, close."""

    def __init__(self, sock: Any, buffered: bytes) -> None:
        self.sock = sock
        self.buf = buffered
        self.lock = threading.Lock()
        self.closed = False

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode("utf-8"))

    def _frame(self, opcode: int, data: bytes) -> None:
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x80 | opcode])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        with self.lock:
            if not self.closed:
                self.sock.sendall(head + mask + masked)

    def _need(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def receive(self) -> Optional[str]:
        """The next text message; None when the connection ended."""
        parts: List[bytes] = []
        while True:
            if not self._need(2):
                return None
            fin, opcode, n, off = self.buf[0] & 0x80, self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if n == 126:
                if not self._need(4):
                    return None
                n, off = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                if not self._need(10):
                    return None
                n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
            if not self._need(off + n):
                return None
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            if opcode == 0x8:
                return None
            if opcode == 0x9:
                self._frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8", "replace")

    def close(self) -> None:
        try:
            self._frame(0x8, b"\x03\xe8")
        except OSError:
            pass
        with self.lock:
            self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class PtyHandle:
    """A terminal session. ``pid`` is the shell's (a background process with a terminal)."""

    def __init__(self, ws: _WebSocket, pid: int, on_data: Optional[Callable[[str], None]]) -> None:
        self._ws = ws
        self.pid = pid
        self._on_data = on_data
        self._output: List[str] = []
        self._cond = threading.Condition()
        self.exit_code: Optional[int] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"podflare-pty-{pid}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                text = self._ws.receive()
                if text is None:
                    break
                msg: Dict[str, Any] = json.loads(text)
                if msg.get("type") == "output" and isinstance(msg.get("data"), str):
                    with self._cond:
                        self._output.append(msg["data"])
                        self._cond.notify_all()
                    if self._on_data:
                        self._on_data(msg["data"])
                elif msg.get("type") == "exit":
                    self.exit_code = msg.get("code")
        except (OSError, ValueError):
            pass
        finally:
            self._ws.close()
            self._done.set()
            with self._cond:
                self._cond.notify_all()

    @property
    def output(self) -> str:
        """Everything the terminal wrote so far."""
        with self._cond:
            return "".join(self._output)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        """Blocks until ``predicate(output so far)`` holds (or raises TimeoutError); returns the output."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate("".join(self._output)) or self._done.is_set(), timeout):
                raise TimeoutError("the terminal did not show what was waited for")
            return "".join(self._output)

    def send_input(self, data: str) -> None:
        """Types into the terminal (``"ls\\r"`` runs ls)."""
        self._ws.send(json.dumps({"type": "input", "data": data}))

    def resize(self, cols: int, rows: int) -> None:
        self._ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The shell's exit code once it ends (None if the connection closed first)."""
        self._done.wait(timeout)
        return self.exit_code

    def kill(self) -> None:
        """Closes the connection, which ends the shell."""
        self._ws.close()
        self._done.wait(10)


class Pty:
    """``sandbox.pty``.

    Example::

        term = sbx.pty.create(cols=120, rows=30, on_data=print)
        term.send_input("echo hi\\r")
        term.resize(100, 40)
        term.kill()
    """

    def __init__(self, client: Client, path: str) -> None:
        self._client = client
        self._path = path + "/pty"

    def create(self, cols: int = 80, rows: int = 24, on_data: Optional[Callable[[str], None]] = None) -> PtyHandle:
        client = self._client
        conn = client._new_conn()
        conn.connect()
        sock = conn.sock
        url = client._url(self._path, {"cols": cols, "rows": rows})
        headers = dict(client._base_headers)
        headers.update({"Host": f"{client._hostname}:{client._port}", "Upgrade": "websocket", "Connection": "Upgrade",
                        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})
        sock.sendall((f"GET {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise PodflareConnectionError(f"the terminal connection to {client.host} closed during the handshake",
                                              code="connection_error", status=0)
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        if status != 101:
            fields = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            length = int(fields.get("content-length", "0") or 0)
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            sock.close()
            raise error_from_response(status, rest, fields, f"GET {client.host}{self._path}")
        sock.settimeout(None)  # a terminal may be quiet for as long as it likes
        ws = _WebSocket(sock, rest)
        first = ws.receive()
        msg = json.loads(first) if first else {}
        if msg.get("type") != "started":
            ws.close()
            raise PodflareConnectionError("the terminal closed before the shell started", code="connection_error", status=0)
        return PtyHandle(ws, int(msg["pid"]), on_data)
