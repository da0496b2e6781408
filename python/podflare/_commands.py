"""``sandbox.commands``: shell commands beside the interpreter, in the foreground or the background
(shaped like E2B's). A background process keeps its output in a bounded log in the sandbox (1 MiB of
characters by default), every character at an offset, so :meth:`Commands.connect` — from another
process, or after a restart — reads from offset 0 and gets everything still kept. A fork's children
do not get their parent's processes."""

from __future__ import annotations

import json as _json
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

from ._client import Client
from ._errors import PodflareError

__all__ = ["Commands", "CommandHandle", "CommandResult", "ProcessInfo"]

OutputCallback = Callable[[str], None]


@dataclass
class ProcessInfo:
    """A background process as the server describes it (times in epoch seconds)."""
    pid: int
    cmd: str
    cwd: str
    running: bool
    exit_code: Optional[int]
    started_at: float
    ended_at: Optional[float]
    log_start: int
    log_end: int

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> "ProcessInfo":
        return cls(pid=int(w["pid"]), cmd=str(w["cmd"]), cwd=str(w["cwd"]), running=bool(w["running"]),
                   exit_code=w.get("exit_code"), started_at=float(w["started_at"]),
                   ended_at=w.get("ended_at"), log_start=int(w["log_start"]), log_end=int(w["log_end"]))


@dataclass
class CommandResult:
    """What a finished command produced. ``lost``: characters the sandbox's log dropped before they
    were read (0 unless the reader fell far behind)."""
    stdout: str
    stderr: str
    exit_code: int
    lost: int = 0


class CommandHandle:
    """A background process. ``wait()`` reads its output (from offset 0: nothing kept is missed)
    until it ends; ``kill()``, ``send_stdin()`` act on it; ``pid`` reattaches later."""

    def __init__(self, commands: "Commands", pid: int, on_stdout: Optional[OutputCallback] = None,
                 on_stderr: Optional[OutputCallback] = None, offset: int = 0) -> None:
        self._commands = commands
        self.pid = pid
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._offset = offset

    def wait(self, on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None) -> CommandResult:
        """Blocks until the process has ended and all its output was read; the callbacks (these or
        the ones given to ``run``) see the output as it arrives."""
        on_stdout = on_stdout or self._on_stdout
        on_stderr = on_stderr or self._on_stderr
        out: List[str] = []
        err: List[str] = []
        lost = 0
        exit_code = -1
        for ev in self._commands.output(self.pid, offset=self._offset, follow=True):
            kind = ev.get("type")
            if kind == "stdout":
                out.append(ev["data"])
                if on_stdout:
                    on_stdout(ev["data"])
            elif kind == "stderr":
                err.append(ev["data"])
                if on_stderr:
                    on_stderr(ev["data"])
            elif kind == "lost":
                lost += int(ev["data"])
            elif kind == "exit":
                exit_code = int(ev["data"])
        return CommandResult("".join(out), "".join(err), exit_code, lost)

    def kill(self) -> bool:
        """SIGKILL to the process and everything it started; False if it had already ended."""
        return self._commands.kill(self.pid)

    def send_stdin(self, data: str, eof: bool = False) -> None:
        self._commands.send_stdin(self.pid, data, eof=eof)

    def __repr__(self) -> str:
        return f"CommandHandle(pid={self.pid})"


class Commands:
    """``sandbox.commands``.

    Example::

        sbx.commands.run("ls /").stdout
        dev = sbx.commands.run("python3 -m http.server 8000", background=True)
        [p.pid for p in sbx.commands.list() if p.running]
        dev.kill()
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{urllib.parse.quote(sandbox_id, safe='')}/processes"

    def run(self, cmd: str, background: bool = False, cwd: Optional[str] = None,
            envs: Optional[Mapping[str, str]] = None, on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None, log_chars: Optional[int] = None) -> Any:
        """Starts ``cmd`` (run by ``bash -c``). ``background=True`` returns a :class:`CommandHandle`
        at once; otherwise waits and returns a :class:`CommandResult`."""
        body: Dict[str, Any] = {"cmd": cmd}
        if cwd is not None:
            body["cwd"] = cwd
        if envs is not None:
            body["env"] = dict(envs)
        if log_chars is not None:
            body["log_chars"] = log_chars
        info = self._client.json("POST", self._base, json=body)
        handle = CommandHandle(self, int(info["pid"]), on_stdout, on_stderr)
        return handle if background else handle.wait()

    def list(self) -> List[ProcessInfo]:
        """The sandbox's background processes, running and recently ended."""
        return [ProcessInfo.from_wire(p) for p in self._client.json("GET", self._base)["processes"]]

    def get(self, pid: int) -> ProcessInfo:
        """One process; :class:`NotFoundError` for an unknown pid."""
        return ProcessInfo.from_wire(self._client.json("GET", f"{self._base}/{int(pid)}"))

    def connect(self, pid: int, on_stdout: Optional[OutputCallback] = None,
                on_stderr: Optional[OutputCallback] = None, offset: int = 0) -> CommandHandle:
        """Reattaches to a background process (its output from ``offset``)."""
        self.get(pid)
        return CommandHandle(self, int(pid), on_stdout, on_stderr, offset)

    def kill(self, pid: int) -> bool:
        return self.signal(pid, "SIGKILL")

    def signal(self, pid: int, signal: str = "SIGTERM") -> bool:
        """Sends a signal to the process's group; False if it had already ended."""
        return bool(self._client.json("POST", f"{self._base}/{int(pid)}/signal", json={"signal": signal})["delivered"])

    def send_stdin(self, pid: int, data: str, eof: bool = False) -> None:
        self._client.empty("POST", f"{self._base}/{int(pid)}/stdin", json={"data": data, "eof": eof})

    def output(self, pid: int, offset: int = 0, follow: bool = False) -> Iterator[Dict[str, Any]]:
        """The output events (``{"type": "stdout"|"stderr"|"lost"|"exit", "data", "offset"}``) from
        ``offset``; with ``follow`` until the process ends, else what is kept now."""
        resp = self._client.request("GET", f"{self._base}/{int(pid)}/output",
                                    query={"offset": offset, "follow": "1" if follow else "0"}, timeout=None)
        try:
            while True:
                line = resp.next_line()
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    yield _json.loads(line)
                except ValueError as err:
                    raise PodflareError(f"invalid process output event: {line[:200]!r}",
                                        code="invalid_response", status=0) from err
        finally:
            resp.close()
