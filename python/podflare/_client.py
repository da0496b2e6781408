"""The HTTP layer: one small pool of keep-alive ``http.client`` connections per :class:`Client`,
shared by every sandbox made through it, so a hot exec reuses a warm TCP connection.

Responses are handed over unread so exec events (NDJSON) and downloads stream: events are read from
the socket as they arrive (``read1``, never "read everything then split"), downloads in chunks.
Non-2xx answers become the exception classes of ``_errors.py``.
"""

from __future__ import annotations

import io
import json as _json
import os
import platform
import select
import socket
import stat
import threading
import urllib.parse
from http import client as http_client
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Type, Union, cast

from ._errors import (
    BadRequestError,
    PodflareConnectionError,
    PodflareError,
    PodflareTimeoutError,
    error_from_response,
)

__all__ = ["Client", "DEFAULT_HOST", "SDK_VERSION"]

#: The SDK's version, sent in the User-Agent header.
SDK_VERSION = "0.1.0"

#: Where the server listens when neither ``host=`` nor the environment says otherwise.
DEFAULT_HOST = "http://127.0.0.1:7070"

#: Default client-side bound, in seconds, on each socket wait of a call (not on execs: see run_code).
DEFAULT_TIMEOUT = 60.0

#: Default bound, in seconds, on opening a TCP connection.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Bytes read from a file object per send when uploading.
UPLOAD_BLOCK_SIZE = 256 * 1024

#: Biggest error body read; the message only needs its start.
_MAX_ERROR_BODY = 1024 * 1024

# Errors of a socket that the server closed while it sat idle in the pool (keep-alive timeout).
_STALE_ERRORS = (
    http_client.RemoteDisconnected,
    http_client.BadStatusLine,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)

_UNSET: Any = object()


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def _host_setting(host: Optional[str]) -> "tuple[str, str]":
    """The server's address and where it came from: ``host=``, else ``PODFLARE_HOST``, else
    ``PODFLARE_HOSTD_URL`` (what the hosted product's SDKs read, so their users' settings work
    unchanged), else the default."""
    if host:
        return host, "host="
    for name in ("PODFLARE_HOST", "PODFLARE_HOSTD_URL"):
        value = _env(name)
        if value:
            return value, name
    return DEFAULT_HOST, "the default host"


class _Conn(http_client.HTTPConnection):
    """An HTTPConnection with Nagle off: requests and NDJSON lines are small and latency-bound."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _SConn(http_client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Conn = Union[_Conn, _SConn]

#: What ``upload`` accepts: bytes-like, str (UTF-8), a binary (or text) file object, or an iterable of bytes.
UploadData = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", io.IOBase, Iterable[bytes]]


def _socket_alive(sock: Optional[socket.socket]) -> bool:
    """False when an idle keep-alive socket was closed by the server (it is readable: EOF or junk)."""
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not p.poll(0)
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable
    except (OSError, ValueError):
        return False


class _Body:
    """A request body prepared for sending, and whether it can be sent again after a stale socket."""

    def __init__(self, data: Any, length: Optional[int], replayable: bool, rewind: Optional[int] = None,
                 source: Any = None) -> None:
        self.data = data
        self.length = length
        self.replayable = replayable
        self._rewind = rewind
        self._source = source

    def rewind(self) -> None:
        if self._rewind is not None and self._source is not None:
            self._source.seek(self._rewind)


def _text_chunks(f: Any) -> Iterator[bytes]:
    while True:
        block = f.read(UPLOAD_BLOCK_SIZE)
        if not block:
            return
        yield block.encode("utf-8")


def _iter_bytes(it: Iterable[Any]) -> Iterator[bytes]:
    for chunk in it:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        elif not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"upload iterables must yield bytes, got {type(chunk).__name__}")
        yield bytes(chunk) if isinstance(chunk, memoryview) else chunk


def prepare_body(data: Any) -> _Body:
    """Turns what a user passes to ``upload`` into something ``http.client`` streams. Bytes go in one
    piece with a Content-Length; files are read in blocks (with a Content-Length when their size is
    known, else chunked); iterables are sent chunked as they are produced. Nothing is buffered."""
    if isinstance(data, (bytes, bytearray)):
        return _Body(bytes(data) if isinstance(data, bytearray) else data, len(data), True)
    if isinstance(data, memoryview):
        return _Body(data, data.nbytes, True)
    if isinstance(data, str):
        raw = data.encode("utf-8")
        return _Body(raw, len(raw), True)
    if isinstance(data, os.PathLike):
        raise TypeError("pass an open file (open(path, 'rb')) rather than a path; upload() does not open local files")
    if hasattr(data, "read"):
        if isinstance(data, io.TextIOBase):
            return _Body(_text_chunks(data), None, False)
        length: Optional[int] = None
        start: Optional[int] = None
        try:
            if data.seekable():
                pos: int = data.tell()
                start = pos
                try:
                    st = os.fstat(data.fileno())
                    if stat.S_ISREG(st.st_mode):
                        length = max(0, st.st_size - pos)
                except (AttributeError, OSError, io.UnsupportedOperation):
                    pass
                if length is None:
                    end = data.seek(0, io.SEEK_END)
                    data.seek(pos)
                    length = max(0, end - pos)
        except (AttributeError, OSError, io.UnsupportedOperation):
            start = None
            length = None
        return _Body(data, length, start is not None, rewind=start, source=data)
    if isinstance(data, Iterable):
        return _Body(_iter_bytes(data), None, False)
    raise TypeError(f"cannot upload a {type(data).__name__}: pass bytes, str, a file object opened in binary mode, or an iterable of bytes")


class Response:
    """A 2xx answer whose body has not been read yet. Read it all (``read``/``json``), line by line
    (``next_line``) or in chunks (``read_chunk``), then ``close()``: a fully read answer gives its
    connection back to the pool; a partly read one closes it (the server notices the hang-up)."""

    def __init__(self, client: "Client", conn: Conn, resp: http_client.HTTPResponse, what: str) -> None:
        self._client = client
        self._conn: Optional[Conn] = conn
        self._resp = resp
        self._what = what
        self._buf = b""
        self._pos = 0
        self.status = resp.status
        self.headers = resp.headers

    @property
    def content_length(self) -> Optional[int]:
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def _wrap(self, err: BaseException) -> PodflareError:
        self._abandon()
        return self._client._wrap_io_error(err, self._what, during_body=True)

    def read(self) -> bytes:
        try:
            data = self._resp.read()
        except (OSError, http_client.HTTPException) as err:
            raise self._wrap(err) from err
        self.close()
        return data

    def json(self) -> Any:
        data = self.read()
        if not data:
            return None
        try:
            return _json.loads(data)
        except ValueError as err:
            snippet = data[:200].decode("utf-8", "replace")
            raise PodflareError(f"invalid JSON from {self._what}: {snippet}", code="invalid_response",
                                status=self.status) from err

    def next_line(self) -> Optional[bytes]:
        """The next newline-terminated line, as soon as it has arrived; None at the end."""
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                line = self._buf[self._pos:i]
                self._pos = i + 1
                return line
            try:
                chunk = self._resp.read1(65536)
            except (OSError, http_client.HTTPException) as err:
                raise self._wrap(err) from err
            if not chunk:
                rest = self._buf[self._pos:]
                self._buf, self._pos = b"", 0
                self.close()
                return rest if rest else None
            self._buf = self._buf[self._pos:] + chunk if self._pos < len(self._buf) else chunk
            self._pos = 0

    def read_chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end); b"" at the end."""
        try:
            data = self._resp.read(size)
        except (OSError, http_client.HTTPException) as err:
            raise self._wrap(err) from err
        if not data:
            self.close()
        return data

    def readinto(self, buf: Any) -> int:
        try:
            n = self._resp.readinto(buf)
        except (OSError, http_client.HTTPException) as err:
            raise self._wrap(err) from err
        if not n:
            self.close()
        return n

    @property
    def complete(self) -> bool:
        return self._resp.isclosed() and self._pos >= len(self._buf)

    def close(self) -> None:
        """Gives the connection back to the pool if the answer was read to its end, else closes it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._resp.isclosed():
            self._client._release(conn)
        else:
            self._resp.close()
            conn.close()

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                self._resp.close()
            finally:
                conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._abandon()
        except Exception:
            pass


class _Pending:
    """A request that was sent and whose answer has not been read yet."""

    def __init__(self, method: str, url: str, headers: Dict[str, str], body: Optional[_Body],
                 timeout: Optional[float], what: str) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.timeout = timeout
        self.what = what
        self.conn: Optional[Conn] = None
        self.reused = False
        self.send_error: Optional[BaseException] = None


class Client:
    """A connection to one Podflare server: its address, API key and one pool of keep-alive
    connections. Sandboxes made with the same Client (and the children they fork) share it, and it
    is safe to use from several threads.

    Most code never makes one: ``Sandbox()`` builds a private Client from ``PODFLARE_HOST`` and
    ``PODFLARE_API_KEY``. Make one to share connections among many sandboxes::

        client = Client(host="http://10.0.0.5:7070", api_key=os.environ["MY_KEY"])
        a = Sandbox(client=client)
        b = Sandbox(client=client)   # same connection pool

    Args:
        host: base URL, ``http://host:port`` or ``https://…`` (a bare ``host:port`` means http; a path
            prefix is kept). Default: ``PODFLARE_HOST``, else ``PODFLARE_HOSTD_URL``, else
            ``http://127.0.0.1:7070``.
        api_key: sent as ``Authorization: Bearer <key>``. Default: ``PODFLARE_API_KEY`` (none is fine
            for a loopback server without keys).
        timeout: seconds to wait on any one socket operation of a call (connect, each read) before
            raising :class:`PodflareTimeoutError`. Execs are not bound by it (a long cell is
            legitimate): pass ``request_timeout=`` to ``run_code`` for that. None: wait forever.
        connect_timeout: seconds to wait for a TCP connection.
        max_idle_connections: idle keep-alive connections kept for reuse.
    """

    def __init__(
        self,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_idle_connections: int = 16,
    ) -> None:
        raw, self._host_source = _host_setting(host)
        if "://" not in raw:
            raw = "http://" + raw
        url = urllib.parse.urlsplit(raw)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BadRequestError(f"host must look like http://host:port or https://host, got {raw!r} "
                                  f"(from {self._host_source})", field="host")
        self._secure = url.scheme == "https"
        self._hostname = url.hostname
        try:
            port = url.port
        except ValueError:
            raise BadRequestError(f"host has an invalid port: {raw!r} (from {self._host_source})", field="host") from None
        self._port = port if port is not None else (443 if self._secure else 80)
        self._base_path = url.path.rstrip("/")
        netloc = f"[{self._hostname}]" if ":" in self._hostname else self._hostname
        if port is not None:
            netloc += f":{port}"
        #: The server's base URL as used (normalized, no trailing slash).
        self.host = f"{url.scheme}://{netloc}{self._base_path}"
        self._api_key = api_key if api_key is not None else _env("PODFLARE_API_KEY")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._max_idle = max(0, max_idle_connections)
        self._idle: List[Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self._users = 0
        self._owned = False
        #: Connections opened so far (for tests and diagnostics: reuse keeps it low).
        self.connections_opened = 0
        self._base_headers = {
            "User-Agent": f"podflare-python/{SDK_VERSION} python/{platform.python_version()}",
        }
        if self._api_key:
            self._base_headers["Authorization"] = f"Bearer {self._api_key}"

    def __repr__(self) -> str:
        return f"Client(host={self.host!r})"

    # ---- public helpers -------------------------------------------------------------------------

    def health(self) -> bool:
        """True when the server answers ``GET /v1/healthz``; raises PodflareConnectionError if unreachable."""
        self.request("GET", "/v1/healthz").read()
        return True

    def capacity(self) -> Dict[str, Any]:
        """The server's warm-pool and sandbox counters (``GET /v1/capacity``)."""
        return cast(Dict[str, Any], self.json("GET", "/v1/capacity"))

    def close(self) -> None:
        """Closes the pool's idle connections; connections in use close when their call ends. The
        Client stays usable (new calls open new connections). Sandboxes are NOT destroyed."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
        for conn in idle:
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- ownership by sandboxes (a Sandbox() without client= owns a private Client) -----------

    def _retain(self) -> None:
        with self._lock:
            self._users += 1

    def _release_user(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0 and self._owned
        if last:
            self.close()

    # ---- pool ---------------------------------------------------------------------------------

    def _new_conn(self) -> Conn:
        cls: Type[Conn] = _SConn if self._secure else _Conn
        conn: Conn = cls(self._hostname, self._port, timeout=self.connect_timeout, blocksize=UPLOAD_BLOCK_SIZE)
        with self._lock:
            self.connections_opened += 1
        return conn

    def _acquire(self, fresh: bool) -> Tuple[Conn, bool]:
        if not fresh:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    break
                if _socket_alive(conn.sock):
                    return conn, True
                conn.close()
        return self._new_conn(), False

    def _release(self, conn: Conn) -> None:
        if conn.sock is None:
            return
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    @property
    def idle_connections(self) -> int:
        with self._lock:
            return len(self._idle)

    # ---- requests -----------------------------------------------------------------------------

    def _url(self, path: str, query: Optional[Mapping[str, Any]]) -> str:
        url = self._base_path + path
        if query:
            items = []
            for k, v in query.items():
                if v is None or v is False:
                    continue
                items.append((k, "1" if v is True else str(v)))
            if items:
                url += "?" + urllib.parse.urlencode(items, quote_via=urllib.parse.quote, safe="/,")
        return url

    def _wrap_io_error(self, err: BaseException, what: str, during_body: bool = False,
                       connecting: bool = False) -> PodflareError:
        if isinstance(err, PodflareError):
            return err
        if isinstance(err, (socket.timeout, TimeoutError)) and not connecting:
            return PodflareTimeoutError(
                f"no answer from the Podflare server at {self.host} within the client timeout during {what}: "
                f"raise Client(timeout=…) (or run_code(request_timeout=…))",
                code="timeout", status=0)
        if connecting:
            return PodflareConnectionError(
                f"cannot reach the Podflare server at {self.host} ({err.__class__.__name__}: {err}; "
                f"from {self._host_source}): check that it points at the server (PODFLARE_HOST or host=) "
                "and that `podflare serve` is running there",
                code="connection_error", status=0)
        return PodflareConnectionError(
            f"lost the connection to the Podflare server at {self.host} during {what} "
            f"({err.__class__.__name__}: {err}): check that `podflare serve` is still running there",
            code="connection_error", status=0)

    def _send(self, p: _Pending, fresh: bool) -> None:
        conn, reused = self._acquire(fresh)
        p.conn, p.reused, p.send_error = conn, reused, None
        try:
            if conn.sock is None:
                conn.timeout = self.connect_timeout
                conn.connect()
        except OSError as err:
            conn.close()
            raise self._wrap_io_error(err, p.what, connecting=True) from err
        assert conn.sock is not None
        conn.sock.settimeout(p.timeout)
        conn.timeout = p.timeout
        body = p.body
        try:
            if body is None:
                conn.request(p.method, p.url, headers=p.headers)
            else:
                conn.request(p.method, p.url, body=body.data, headers=p.headers)
        except socket.timeout as err:
            conn.close()
            raise self._wrap_io_error(err, p.what) from err
        except (OSError, http_client.HTTPException) as err:
            # The server may have answered (an auth or size error) and hung up while we were still
            # sending: keep the error and try to read that answer before giving up.
            p.send_error = err

    def start(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        json: Any = _UNSET,
        body: Any = _UNSET,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Any = _UNSET,
    ) -> _Pending:
        """Sends a request; the answer is read by :meth:`finish`. (Split so an exec is sent as soon as
        it is asked for, while its events are read as the caller iterates.)"""
        h = dict(self._base_headers)
        prepared: Optional[_Body] = None
        if json is not _UNSET:
            payload = _json.dumps(json, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            prepared = _Body(payload, len(payload), True)
            h["Content-Type"] = "application/json"
        elif body is not _UNSET and body is not None:
            prepared = prepare_body(body)
            h["Content-Type"] = "application/octet-stream"
        if prepared is not None and prepared.length is not None:
            h["Content-Length"] = str(prepared.length)
        if headers:
            h.update(headers)
        t = self.timeout if timeout is _UNSET else timeout
        url = self._url(path, query)
        p = _Pending(method, url, h, prepared, t, f"{method} {self.host}{self._base_path}{path}")
        # A body that cannot be sent twice goes on a fresh connection: it never meets a stale one.
        self._send(p, fresh=prepared is not None and not prepared.replayable)
        return p

    def finish(self, p: _Pending) -> Response:
        """Reads the answer's status and headers; raises the matching PodflareError for a non-2xx."""
        for attempt in (0, 1):
            conn = p.conn
            assert conn is not None
            try:
                resp = conn.getresponse()
            except socket.timeout as err:
                conn.close()
                raise self._wrap_io_error(err, p.what) from err
            except (OSError, http_client.HTTPException) as err:
                conn.close()
                stale = isinstance(err, _STALE_ERRORS) or isinstance(p.send_error, _STALE_ERRORS)
                if attempt == 0 and p.reused and stale and (p.body is None or p.body.replayable):
                    # A kept-alive socket the server had closed: the request never reached it.
                    if p.body is not None:
                        p.body.rewind()
                    self._send(p, fresh=True)
                    continue
                cause = p.send_error if p.send_error is not None else err
                raise self._wrap_io_error(cause, p.what) from err
            if 200 <= resp.status < 300:
                if p.send_error is not None:
                    conn.close()
                    raise self._wrap_io_error(p.send_error, p.what)
                return Response(self, conn, resp, p.what)
            try:
                data = resp.read(_MAX_ERROR_BODY)
            except (OSError, http_client.HTTPException):
                data = b""
            if resp.isclosed() and p.send_error is None:
                self._release(conn)
            else:
                resp.close()
                conn.close()
            raise error_from_response(resp.status, data, resp.headers, p.what)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        """Sends a request and returns the 2xx answer unread (read or close it)."""
        return self.finish(self.start(method, path, **kwargs))

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Sends a request and returns its parsed JSON answer (None for an empty one)."""
        return self.request(method, path, **kwargs).json()

    def empty(self, method: str, path: str, **kwargs: Any) -> None:
        """Sends a request whose answer has no body we need (204s), reading it so the socket is reused."""
        self.request(method, path, **kwargs).read()
