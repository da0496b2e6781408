"""A sandbox on a Podflare server: a persistent Python interpreter (plus bash) in its own filesystem,
that can be forked into copies, diffed against them and merged back. Every method is one REST call
(docs/api.md) through the sandbox's :class:`Client`."""

from __future__ import annotations

import json as _json
import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union, cast

from ._client import Client, Response, _Pending
from ._errors import NotFoundError, PodflareConnectionError, PodflareError, SandboxGoneError
from ._commands import Commands
from ._pty import Pty
from ._files import DEFAULT_CHUNK_SIZE, DownloadStream, Files
from ._models import Event, ExecError, ExecResult, ExecResultBuilder, Result, SandboxInfo

_log = logging.getLogger("podflare")

__all__ = ["Sandbox", "ExecStream"]

_UNSET: Any = object()


def _sandbox_path(sandbox_id: str) -> str:
    return "/v1/sandboxes/" + urllib.parse.quote(sandbox_id, safe="")


def _exec_body(code: str, language: str, timeout_ms: Optional[int], env: Optional[Mapping[str, str]],
               cwd: Optional[str], atomic: bool = False) -> Dict[str, Any]:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    body: Dict[str, Any] = {"code": code, "language": language}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    if env is not None:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if atomic:
        body["atomic"] = True
    return body


def _checkpoint_id(checkpoint: Union[str, Mapping[str, Any]]) -> str:
    cid = checkpoint["id"] if isinstance(checkpoint, Mapping) else checkpoint
    return urllib.parse.quote(str(cid), safe="")


class ExecStream(Iterator[Event]):
    """The events of one exec, yielded as the server produces them: ``stdout``/``stderr`` chunks,
    ``result`` MIME bundles, an ``error`` (an uncaught exception: an event, not a raise) and always,
    last, ``exit`` with the exit code.

    The request is sent when the stream is made; events are read from the socket as you iterate.
    Stopping early (``break``, ``close()``, leaving a ``with`` block) hangs up, which makes the
    server interrupt the code. After the last event, :attr:`result` holds the aggregate
    :class:`ExecResult`.
    """

    def __init__(self, client: Client, sandbox_id: str, body: Dict[str, Any],
                 request_timeout: Optional[float]) -> None:
        self._client = client
        self._pending: Optional[_Pending] = client.start(
            "POST", _sandbox_path(sandbox_id) + "/exec", json=body, timeout=request_timeout)
        self._resp: Optional[Response] = None
        self._builder = ExecResultBuilder()
        self._pushback: List[bytes] = []
        self._done = False

    def __iter__(self) -> "ExecStream":
        return self

    def __next__(self) -> Event:
        if self._pushback:
            line: Optional[bytes] = self._pushback.pop(0)
            if not self._pushback and self._resp is None:
                self._done = True
            return self._event(line)  # type: ignore[arg-type]
        if self._done:
            raise StopIteration
        try:
            if self._resp is None:
                pending, self._pending = self._pending, None
                assert pending is not None
                self._resp = self._client.finish(pending)
            line = self._resp.next_line()
            while line is not None and not line.strip():
                line = self._resp.next_line()
        except BaseException:
            self.close()
            raise
        if line is None:
            self._done = True
            self._resp = None
            if not self._builder.saw_exit:
                raise PodflareConnectionError(
                    f"the exec stream from {self._client.host} ended before its exit event: the server "
                    "stopped or the connection dropped", code="connection_error", status=0)
            raise StopIteration
        return self._event(line)

    def _event(self, line: bytes) -> Event:
        try:
            event = Event.from_json(_json.loads(line))
        except (ValueError, TypeError) as err:
            self.close()
            raise PodflareError(f"invalid exec event from {self._client.host}: {line[:200]!r}",
                                code="invalid_response", status=self._resp.status if self._resp else 0) from err
        self._builder.add(event)
        if event.type == "exit":
            # The exit is last: read the end of the answer now so the connection goes back to the
            # pool even if the caller stops iterating here.
            self._drain_after_exit()
        return event

    def _drain_after_exit(self) -> None:
        resp = self._resp
        if resp is None:
            return
        try:
            while True:
                extra = resp.next_line()
                if extra is None:
                    break
                if extra.strip():  # a newer server's trailing events: keep them for iteration
                    self._pushback.append(extra)
        except PodflareError:
            pass
        if not self._pushback:
            self._done = True
        self._resp = None

    @property
    def result(self) -> ExecResult:
        """The aggregate of the events read so far (complete once the stream is exhausted)."""
        return self._builder.finish()

    def wait(self) -> ExecResult:
        """Reads the remaining events and returns the aggregate :class:`ExecResult`."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stops reading; if the exec is still running the connection is dropped (the server then
        interrupts it)."""
        self._done = True
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()
        pending, self._pending = self._pending, None
        if pending is not None and pending.conn is not None:
            pending.conn.close()

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Sandbox:
    """A sandbox: created (from the server's warm pool when one is ready) when constructed, destroyed
    by :meth:`close` or by leaving its ``with`` block (also on an exception).

    Example::

        from podflare import Sandbox

        with Sandbox() as sbx:
            sbx.run_code("x = 6 * 7")
            print(sbx.run_code("print(x)").stdout)   # 42

    Args:
        host: the server's URL. Default: ``PODFLARE_HOST``, else ``http://127.0.0.1:7070``.
        api_key: Default: ``PODFLARE_API_KEY``.
        client: a :class:`Client` to share connections with other sandboxes (then leave ``host`` and
            ``api_key`` out).
        egress: whether code in the sandbox may reach the network: ``True`` (anything but the
            host itself), ``False`` (nothing, not even DNS), or ``{"allow": [rules]}``: only the
            hosts the rules name (``"example.com"``, ``"*.example.com"``, ``"*"``,
            ``"10.0.0.0/8"``), through the server's policy proxy (found by programs in the sandbox
            through ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``). Denied attempts show in
            :meth:`events`.
        persistent: keep the sandbox across server restarts.
        idle_timeout_seconds: destroy it after this long without calls (server default: 300).
        template: the image template (server default: ``default``).
        max_lifetime_seconds: (ours) hard cap on its whole life.
        metadata: (ours) string labels kept with the sandbox.
        runtime: (ours) ``ns``, ``vm`` or ``auto``.
        limits: (ours) resource limits, each optional: ``{"cpus": 2, "memory_mb": 1024,
            "disk_mb": 4096, "processes": 512}`` (the server's defaults). Past memory the kernel
            kills the offending process (the exec's error is ``MemoryLimitExceeded``); past
            processes new ones are refused (``ProcessLimitExceeded``); past disk, writes fail.
        history: (ours) checkpoint before each call and keep the last ``history`` (0–32), so
            :meth:`rewind` can undo calls (namespace runtime).
    """

    id: str
    client: Client
    files: Files

    def __init__(
        self,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        client: Optional[Client] = None,
        egress: Union[bool, Mapping[str, Sequence[str]]] = True,
        persistent: bool = False,
        idle_timeout_seconds: Optional[int] = None,
        template: Optional[str] = None,
        *,
        max_lifetime_seconds: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        runtime: Optional[str] = None,
        limits: Optional[Mapping[str, Union[int, float]]] = None,
        history: Optional[int] = None,
    ) -> None:
        c = _resolve_client(host, api_key, client)
        body: Dict[str, Any] = {"egress": _egress_body(egress), "persistent": bool(persistent)}
        if template is not None:
            body["template"] = template
        if idle_timeout_seconds is not None:
            body["idle_timeout_seconds"] = idle_timeout_seconds
        if max_lifetime_seconds is not None:
            body["max_lifetime_seconds"] = max_lifetime_seconds
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if runtime is not None:
            body["runtime"] = runtime
        if limits is not None:
            body["limits"] = dict(limits)
        if history is not None:
            body["history"] = history
        started = time.monotonic()
        try:
            answer = c.json("POST", "/v1/sandboxes", json=body)
        except BaseException:
            if c._owned:
                c.close()
            raise
        self._init(str(answer["id"]), c)
        pool = answer.get("pool") if isinstance(answer, dict) else None
        if isinstance(pool, dict) and isinstance(pool.get("hit"), bool):
            self.pool = {"hit": pool["hit"]}
            if isinstance(pool.get("miss_reason"), str):
                self.pool["miss_reason"] = pool["miss_reason"]
            if not pool["hit"]:
                _log.info("%s missed the warm pool (%s): created cold in %.0f ms", self.id,
                          pool.get("miss_reason", "unknown"), (time.monotonic() - started) * 1000)

    def _init(self, sandbox_id: str, client: Client) -> None:
        #: How the constructor got it: ``{"hit": True}`` from the server's warm pool, or
        #: ``{"hit": False, "miss_reason": …}`` when it started cold (``pool_off``, ``cold_key``,
        #: ``refilling`` — creates came faster than the pool refills —, ``starts_failing``,
        #: ``empty``, ``egress_policy``); None for connected or forked sandboxes. A cold create is
        #: also logged (INFO) on the ``podflare`` logger.
        self.pool: Optional[Dict[str, Any]] = None
        self.id = sandbox_id
        self.client = client
        self.files = Files(client, sandbox_id)
        #: Shell commands beside the interpreter (foreground, or background processes). A fork's
        #: children do not get this sandbox's processes.
        self.commands = Commands(client, sandbox_id)
        self._path = _sandbox_path(sandbox_id)
        #: Interactive terminals (bash on a PTY over a WebSocket).
        self.pty = Pty(client, self._path)
        self._closed = False
        self._retired = False
        self._close_lock = threading.Lock()
        client._retain()

    @classmethod
    def _attach(cls, sandbox_id: str, client: Client) -> "Sandbox":
        sbx = cls.__new__(cls)
        sbx._init(sandbox_id, client)
        return sbx

    # ---- factories -----------------------------------------------------------------------------

    @classmethod
    def create(cls, **kwargs: Any) -> "Sandbox":
        """Same as ``Sandbox(**kwargs)``."""
        return cls(**kwargs)

    @classmethod
    def connect(cls, sandbox_id: str, host: Optional[str] = None, api_key: Optional[str] = None,
                client: Optional[Client] = None) -> "Sandbox":
        """Attaches to an existing sandbox (e.g. one made by another process). Closing the returned
        object destroys the sandbox.

        Raises:
            NotFoundError: unknown (or merged-away) id.
            SandboxGoneError: the server remembers it but it was destroyed.
        """
        c = _resolve_client(host, api_key, client)
        try:
            info = SandboxInfo.from_json(c.json("GET", _sandbox_path(sandbox_id)))
            if info.state in ("stopped", "error"):
                raise SandboxGoneError(f"sandbox {sandbox_id} was destroyed (state: {info.state})",
                                       status=410)
            if info.state == "merged":
                raise NotFoundError(f"sandbox {sandbox_id} was retired by a merge", status=404)
        except BaseException:
            if c._owned:
                c.close()
            raise
        return cls._attach(sandbox_id, c)

    @classmethod
    def list(cls, host: Optional[str] = None, api_key: Optional[str] = None, client: Optional[Client] = None,
             *, ancestor: Union["Sandbox", str, None] = None, state: Optional[str] = None,
             all: bool = False) -> List[SandboxInfo]:
        """The sandboxes the server knows (with this key), optionally only the descendants of
        ``ancestor`` or those in ``state``; ``all=True`` includes destroyed ones."""
        c = _resolve_client(host, api_key, client)
        try:
            anc = ancestor.id if isinstance(ancestor, Sandbox) else ancestor
            answer = c.json("GET", "/v1/sandboxes", query={"ancestor": anc, "state": state, "all": all})
        finally:
            if c._owned:
                c.close()
        return [SandboxInfo.from_json(s) for s in (answer or {}).get("sandboxes", [])]

    @classmethod
    def list_templates(cls, host: Optional[str] = None, api_key: Optional[str] = None,
                       client: Optional[Client] = None) -> List[Dict[str, Any]]:
        """The templates a create may name (``{"name", "kind", "built", "size_bytes", "runtimes",
        "pool", ...}``); of those made from sandboxes, only this key's."""
        c = _resolve_client(host, api_key, client)
        try:
            return list((c.json("GET", "/v1/templates") or {}).get("templates", []))
        finally:
            if c._owned:
                c.close()

    @classmethod
    def delete_template(cls, name: str, host: Optional[str] = None, api_key: Optional[str] = None,
                        client: Optional[Client] = None) -> None:
        """Deletes a template made from a sandbox (:meth:`save_template`).

        Raises:
            ForbiddenError: a template built from a recipe (the operator's).
            ConflictError: sandboxes started from it are still live.
            NotFoundError: no such template (for this key).
        """
        c = _resolve_client(host, api_key, client)
        try:
            c.empty("DELETE", "/v1/templates/" + urllib.parse.quote(name, safe=""))
        finally:
            if c._owned:
                c.close()

    # ---- state -------------------------------------------------------------------------------

    def info(self) -> SandboxInfo:
        """What the server knows about this sandbox: state, lineage, timestamps, metadata."""
        return SandboxInfo.from_json(self.client.json("GET", self._path))

    def events(self, after: Optional[int] = None) -> List[Event]:
        """The sandbox's events (the server keeps the latest 1000): today what its egress allowlist
        let through (``egress_allowed``) or stopped (``egress_denied``), with ``data`` such as
        ``{"host": "example.org", "port": 443, "via": "connect", "reason": "…"}``. ``after``: the
        last ``seq`` seen, to get only newer ones."""
        answer = self.client.json("GET", self._path + "/events", query={"after": after})
        return [Event.from_json(e) for e in (answer or {}).get("events", [])]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the sandbox was retired by a merge."""
        return self._closed or self._retired

    def __repr__(self) -> str:
        flag = " retired" if self._retired else (" closed" if self._closed else "")
        return f"<Sandbox {self.id}{flag}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # ---- exec --------------------------------------------------------------------------------

    def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        timeout_ms: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        request_timeout: Optional[float] = None,
        atomic: bool = False,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        on_result: Optional[Callable[[Result], Any]] = None,
        on_error: Optional[Callable[[ExecError], Any]] = None,
    ) -> ExecResult:
        """Runs code and returns once it has finished. Python state (variables, imports, cwd…)
        persists between calls; ``language="bash"`` runs a fresh ``bash -c``.

        A non-zero exit code or an uncaught exception is NOT raised: check ``exit_code`` and
        ``error``. HTTP-level failures are raised (e.g. :class:`SandboxGoneError`).

        Args:
            timeout_ms: (ours) interrupt the code after this long; the exit code is then 124.
            env, cwd: (ours) environment additions and working directory for this call only.
            request_timeout: client-side bound in seconds on waiting for each event (None: wait).
            atomic: (ours) if the code fails (an exception, a non-zero exit), everything it did is
                undone and the result's ``rolled_back`` is True; its output is kept.
            on_stdout, on_stderr, on_result, on_error: called as each event arrives.

        Example::

            r = sbx.run_code("1/0")
            r.exit_code, r.error.name          # (1, 'ZeroDivisionError')
            sbx.run_code("6*7").text           # '42'
            sbx.run_code("ls /root", "bash").stdout
        """
        stream = self.run_code_stream(code, language, timeout_ms=timeout_ms, env=env, cwd=cwd,
                                      request_timeout=request_timeout, atomic=atomic)
        with stream:
            for event in stream:
                t = event.type
                if t == "stdout" and on_stdout is not None:
                    on_stdout(event.data)
                elif t == "stderr" and on_stderr is not None:
                    on_stderr(event.data)
                elif t == "result" and on_result is not None:
                    on_result(Result(data=dict(event.data or {}), is_main_result=event.is_main_result))
                elif t == "error" and on_error is not None:
                    on_error(ExecError.from_json(event.data))
            return stream.result

    def run_code_stream(
        self,
        code: str,
        language: str = "python",
        *,
        timeout_ms: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        request_timeout: Optional[float] = None,
        atomic: bool = False,
    ) -> ExecStream:
        """Runs code and yields its :class:`Event` s (``.type .data .seq .ts``) as they arrive.
        Errors before the stream starts (unknown sandbox, bad language) are raised on the first
        iteration. Stopping early interrupts the code.

        Example::

            for ev in sbx.run_code_stream("import time\\nfor i in range(3): print(i); time.sleep(1)"):
                if ev.type == "stdout":
                    print(ev.data, end="")
                elif ev.type == "exit":
                    print("exit code", ev.data)
        """
        body = _exec_body(code, language, timeout_ms, env, cwd, atomic)
        return ExecStream(self.client, self.id, body, request_timeout)

    def interrupt(self) -> bool:
        """Interrupts the running exec (KeyboardInterrupt; the interpreter is restarted if it does
        not yield). False when nothing was running."""
        answer = self.client.json("POST", self._path + "/interrupt")
        return bool((answer or {}).get("interrupted", False))

    # ---- files -------------------------------------------------------------------------------

    def upload(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Writes data to a path in the sandbox; returns ``{"path", "size"}``. Either order:
        ``upload(path, data)`` or ``upload(data, path)``, told apart by type (two strings: path
        first). See :meth:`Files.upload`.

        Example::

            sbx.upload("/root/data.csv", b"a,b\n1,2\n")
            with open("data.csv", "rb") as f:
                sbx.upload(f, "/root/data.csv")
        """
        return self.files.upload(*args, **kwargs)

    def download(self, path: str) -> bytes:
        """The file at ``path`` as bytes."""
        return self.files.download(path)

    def download_stream(self, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DownloadStream:
        """The file at ``path`` as an iterator of bytes chunks (streamed)."""
        return self.files.download_stream(path, chunk_size)

    def download_to(self, path: str, dest: Any, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
        """Streams the file at ``path`` into ``dest`` (a binary file object or a local path);
        returns the bytes written."""
        return self.files.download_to(path, dest, chunk_size)

    # ---- fork / diff / merge -----------------------------------------------------------------

    def freeze(self) -> None:
        """Freezes this sandbox to the server's disk (memory and files; VM runtime). The next call
        on it, or :meth:`resume`, brings it back as it was, even after a server restart.
        Sandboxes created with ``persistent=True`` are frozen when idle instead of destroyed."""
        self.client.json("POST", self._path + "/freeze")

    def resume(self) -> None:
        """Resumes a frozen sandbox now (any other call would too)."""
        self.client.json("POST", self._path + "/resume")

    def get_host(self, port: int, expires_in_seconds: Optional[int] = None) -> str:
        """The address of a port the sandbox listens on, reachable through the Podflare server
        without the API key: ``<server>/v1/ports/<signed token>`` (E2B's ``get_host`` shape: no
        scheme). It reaches that port only (HTTP and WebSocket) until it expires (default 1 hour)
        or the server restarts.

        Example::

            sbx.commands.run("python3 -m http.server 8000", background=True)
            urllib.request.urlopen(f"http://{sbx.get_host(8000)}/")
        """
        return str(self.get_port_url(port, expires_in_seconds)["host"])

    def get_port_url(self, port: int, expires_in_seconds: Optional[int] = None) -> Dict[str, Any]:
        """Like :meth:`get_host`: ``{"url", "host", "token", "port", "expires_at"}``."""
        body: Dict[str, Any] = {}
        if expires_in_seconds is not None:
            body["expires_in_seconds"] = expires_in_seconds
        return dict(self.client.json("POST", f"{self._path}/ports/{int(port)}/url", json=body))

    def fork(self, n: int = 1) -> List["Sandbox"]:
        """``n`` (1–32) copies of this sandbox's interpreter memory and filesystem as of now. Writes
        after the fork are isolated. The children share this sandbox's Client; close (or merge)
        each one.

        Example::

            children = sbx.fork(n=3)
            try:
                results = [c.run_code(f"x = try_plan({i})") for i, c in enumerate(children)]
            finally:
                for c in children:
                    c.close()
        """
        answer = self.client.json("POST", self._path + "/fork", json={"n": n})
        return [Sandbox._attach(str(cid), self.client) for cid in (answer or {}).get("children", [])]

    def diff(self, other: Union["Sandbox", str], paths: Union[str, Sequence[str], None] = None,
             content: bool = False, vars: bool = False) -> Dict[str, Any]:
        """Compares this sandbox's files (and optionally its variables) with ``other``'s.

        Returns ``{"added": [...], "removed": [...], "modified": [...]}``, plus ``"content"``
        (path → unified diff) with ``content=True`` and ``"vars"`` with ``vars=True``. ``paths``
        limits the comparison to those directories (default: all).
        """
        other_id = other.id if isinstance(other, Sandbox) else str(other)
        if isinstance(paths, str):
            paths_q: Optional[str] = paths
        elif paths:
            paths_q = ",".join(paths)
        else:
            paths_q = None
        return self.client.json(
            "GET", self._path + "/diff/" + urllib.parse.quote(other_id, safe=""),
            query={"paths": paths_q, "content": content, "vars": vars}) or {}

    def merge_into(self, winner: Union["Sandbox", str], paths: Optional[Iterable[str]] = None) -> None:
        """Makes this sandbox take over ``winner``'s state (typically a fork child that found the
        answer): this id now drives the winner's interpreter and files, and the winner's id is
        retired, so ``winner.close()`` afterwards does nothing. With ``paths`` (ours), only those
        paths are copied, this sandbox keeps its interpreter and the winner stays alive.
        """
        winner_id = winner.id if isinstance(winner, Sandbox) else str(winner)
        path = self._path + "/merge_into/" + urllib.parse.quote(winner_id, safe="")
        if paths is None:
            self.client.empty("POST", path)
            if isinstance(winner, Sandbox):
                winner._retire()
        else:
            self.client.empty("POST", path, json={"paths": list(paths)})

    # ---- templates from this sandbox ---------------------------------------------------------

    def save_template(self, name: str, description: Optional[str] = None) -> Dict[str, Any]:
        """Makes a named template of this sandbox's current files (what it changed over its image)
        and interpreter state: ``Sandbox(template=name)`` then starts with them, from a warm pool of
        its own (``carries["interpreter"]`` says whether the variables came along: they do until the
        server restarts; then the files only). Background processes and terminals are not carried. Only this API key sees the template. Namespace runtime
        only (the VM runtime raises NotSupportedError). Waits for a running call first.

        Example::

            sbx.run_code("git clone /srv/repo /root/repo", language="bash")
            sbx.save_template("repo-ready")
            with Sandbox(template="repo-ready") as nxt:   # /root/repo is there
                ...

        Raises:
            BadRequestError: not a template name (``[a-z][a-z0-9-]*``, at most 40 characters).
            ConflictError: the name is taken (or a built-in's).
            InsufficientStorageError: the sandbox's files are larger than its disk limit allows
                (sparse files count at their full size).
        """
        body: Dict[str, Any] = {"name": name}
        if description is not None:
            body["description"] = description
        return cast(Dict[str, Any], self.client.json("POST", self._path + "/template", json=body))

    # ---- checkpoints (ours) ----------------------------------------------------------------

    def checkpoint(self, name: Optional[str] = None) -> Dict[str, Any]:
        """Freezes this sandbox's whole state (interpreter memory, files, cwd, env) copy-on-write
        and returns the checkpoint (``{"id", "name", "kind", "created_at", ...}``);
        :meth:`restore` brings it back, as often as wanted. Checkpoints end with the sandbox.

        Example::

            cp = sbx.checkpoint("before cleanup")
            sbx.run_code("import shutil; shutil.rmtree('/root/work')")
            sbx.restore(cp)   # /root/work and every variable are back
        """
        return self.client.json("POST", self._path + "/checkpoints", json={} if name is None else {"name": name})

    def checkpoints(self) -> List[Dict[str, Any]]:
        """This sandbox's checkpoints (named ones and its history), oldest first."""
        return list((self.client.json("GET", self._path + "/checkpoints") or {}).get("checkpoints", []))

    def delete_checkpoint(self, checkpoint: Union[str, Mapping[str, Any]]) -> None:
        """Deletes a checkpoint (its memory and files are freed)."""
        self.client.empty("DELETE", self._path + "/checkpoints/" + _checkpoint_id(checkpoint))

    def restore(self, checkpoint: Union[str, Mapping[str, Any]]) -> None:
        """Puts this sandbox (same id) back to the checkpoint's state; the checkpoint stays. Waits
        for a running call first. Sockets opened since are closed."""
        self.client.json("POST", self._path + "/checkpoints/" + _checkpoint_id(checkpoint) + "/restore")

    def rewind(self, steps: int = 1) -> None:
        """Undoes the last ``steps`` calls of a sandbox created with ``history=n``; a second
        ``rewind()`` goes one step further back."""
        self.client.json("POST", self._path + "/rewind", json={"steps": steps})

    def diff_checkpoint(self, checkpoint: Union[str, Mapping[str, Any]], paths: Union[str, Sequence[str], None] = None,
                        content: bool = False, vars: bool = False) -> Dict[str, Any]:
        """Files (and with ``vars=True`` variables) changed since a checkpoint, shaped like :meth:`diff`."""
        paths_q = paths if isinstance(paths, str) else (",".join(paths) if paths else None)
        return self.client.json("GET", self._path + "/checkpoints/" + _checkpoint_id(checkpoint) + "/diff",
                                query={"paths": paths_q, "content": content, "vars": vars}) or {}

    def _retire(self) -> None:
        with self._close_lock:
            if self._closed or self._retired:
                return
            self._retired = True
        self.client._release_user()

    # ---- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Destroys the sandbox. Idempotent; does nothing for a winner retired by ``merge_into``."""
        with self._close_lock:
            if self._closed or self._retired:
                return
            self._closed = True
        try:
            self.client.empty("DELETE", self._path)
        finally:
            self.client._release_user()

    def kill(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: destroy the sandbox, but never hide the original error behind one from
        # the cleanup (it is chained as context if it happens).
        try:
            self.close()
        except PodflareError:
            pass


def _resolve_client(host: Optional[str], api_key: Optional[str], client: Optional[Client]) -> Client:
    if client is not None:
        if host is not None or api_key is not None:
            raise ValueError("pass either client= or host=/api_key=, not both (the Client carries them)")
        return client
    c = Client(host=host, api_key=api_key)
    c._owned = True
    return c


def _egress_body(egress: Any) -> Any:
    """The API form of ``egress``: a bool, or ``{"allow": [rules]}`` (rules are checked by the server)."""
    if isinstance(egress, bool):
        return egress
    if isinstance(egress, Mapping) and set(egress) == {"allow"} and not isinstance(egress["allow"], (str, bytes)):
        return {"allow": [str(rule) for rule in egress["allow"]]}
    raise TypeError('egress must be True, False or {"allow": [rules]}')
