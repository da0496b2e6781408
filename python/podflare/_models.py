"""The SDK's data types: exec events and their aggregate, rich results, sandbox and file records.
Plain dataclasses built from the server's JSON (docs/api.md); nothing here talks to the network."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from ._protocol import ENDED_SANDBOX_STATES, TIMEOUT_EXIT_CODE  # noqa: F401 (TIMEOUT_EXIT_CODE: importable from here as before)

__all__ = [
    "Event",
    "ExecError",
    "ExecResult",
    "Result",
    "SandboxInfo",
    "FileInfo",
    "ExecResultBuilder",
]

@dataclass
class Event:
    """One event of an exec's stream, as the server sent it.

    Attributes:
        type: ``stdout``, ``stderr``, ``result``, ``error`` or ``exit`` (always last).
        data: text for stdout/stderr; a MIME bundle dict for result; ``{name, value, traceback}`` for
            error; the exit code (int) for exit.
        seq: position in the stream, from 0.
        ts: milliseconds since the epoch when the server emitted it.
        extras: any other fields (``is_main_result``, ``execution_count``, ``state_lost``…).
    """

    type: str
    data: Any
    seq: int = 0
    ts: int = 0
    extras: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Event":
        extras = {k: v for k, v in obj.items() if k not in ("type", "data", "seq", "ts")}
        return cls(
            type=str(obj.get("type", "")),
            data=obj.get("data"),
            seq=int(obj.get("seq", 0) or 0),
            ts=int(obj.get("ts", 0) or 0),
            extras=extras,
        )

    @property
    def is_main_result(self) -> bool:
        """For ``result`` events: True for the value of the cell's last expression."""
        return bool(self.extras.get("is_main_result", False))

    @property
    def execution_count(self) -> Optional[int]:
        """For ``exit`` events: the interpreter's execution counter after this call (python only)."""
        return self.extras.get("execution_count")

    @property
    def state_lost(self) -> bool:
        """For ``exit`` events: True when the interpreter had to be restarted (its variables are gone)."""
        return bool(self.extras.get("state_lost", False))

    @property
    def rolled_back(self) -> bool:
        """For ``exit`` events: True when an atomic call failed and everything it did was undone."""
        return bool(self.extras.get("rolled_back", False))

    def __getitem__(self, key: str) -> Any:  # dict-style access, as the hosted SDK's events allow
        if key in ("type", "data", "seq", "ts"):
            return getattr(self, key)
        return self.extras[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass
class ExecError:
    """An uncaught exception in the executed code (not raised: found on ``ExecResult.error``)."""

    name: str
    value: str
    traceback: str = ""

    @classmethod
    def from_json(cls, obj: Any) -> "ExecError":
        if not isinstance(obj, Mapping):
            return cls(name="Error", value=str(obj), traceback="")
        return cls(
            name=str(obj.get("name", "Error")),
            value=str(obj.get("value", "")),
            traceback=str(obj.get("traceback", "") or ""),
        )

    def __str__(self) -> str:
        return f"{self.name}: {self.value}" if self.value else self.name


@dataclass
class Result:
    """A rich result: a MIME bundle (``text/plain`` always; html, png, svg, json… when available).

    ``is_main_result`` marks the value of the cell's last expression; figures and ``display(x)`` give
    the others.
    """

    data: Dict[str, Any]
    is_main_result: bool = False

    def _get(self, mime: str) -> Optional[str]:
        value = self.data.get(mime)
        return value if isinstance(value, str) else None

    @property
    def text(self) -> Optional[str]:
        return self._get("text/plain")

    @property
    def html(self) -> Optional[str]:
        return self._get("text/html")

    @property
    def markdown(self) -> Optional[str]:
        return self._get("text/markdown")

    @property
    def latex(self) -> Optional[str]:
        return self._get("text/latex")

    @property
    def svg(self) -> Optional[str]:
        return self._get("image/svg+xml")

    @property
    def png(self) -> Optional[str]:
        """The PNG image, base64 encoded (as in Jupyter); see :meth:`png_bytes`."""
        return self._get("image/png")

    @property
    def jpeg(self) -> Optional[str]:
        return self._get("image/jpeg")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    def png_bytes(self) -> Optional[bytes]:
        """The PNG image decoded, or None."""
        png = self.png
        return base64.b64decode(png) if isinstance(png, str) else None

    def formats(self) -> List[str]:
        """The MIME types this result carries."""
        return list(self.data)

    def __getitem__(self, mime: str) -> Any:
        return self.data[mime]

    def __contains__(self, mime: object) -> bool:
        return mime in self.data

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class ExecResult:
    """What ``run_code`` returns: output, rich results, the uncaught exception if any, the exit code.

    A non-zero ``exit_code`` is a result, not an exception: an uncaught exception gives 1 (and
    ``error``), ``SystemExit(n)`` gives n, an exec over its ``timeout_ms`` gives 124.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    results: List[Result] = field(default_factory=list)
    error: Optional[ExecError] = None
    execution_count: Optional[int] = None
    #: True when the interpreter had to be restarted during the call (timeout, crash): state is gone.
    state_lost: bool = False
    #: (ours) True when an atomic call (``run_code(..., atomic=True)``) failed and was undone.
    rolled_back: bool = False

    @property
    def ok(self) -> bool:
        """True when the exit code is 0."""
        return self.exit_code == 0

    @property
    def main_result(self) -> Optional[Result]:
        """The value of the cell's last expression, if it had one."""
        for r in self.results:
            if r.is_main_result:
                return r
        return None

    @property
    def text(self) -> Optional[str]:
        """``text/plain`` of the main result, if any (``run_code("6*7").text == "42"``)."""
        main = self.main_result
        return main.text if main is not None else None


class ExecResultBuilder:
    """Folds a stream of events into an :class:`ExecResult`."""

    def __init__(self) -> None:
        self._stdout: List[str] = []
        self._stderr: List[str] = []
        self.result = ExecResult()
        self.saw_exit = False

    def add(self, event: Event) -> None:
        t = event.type
        if t == "stdout":
            self._stdout.append(event.data if isinstance(event.data, str) else str(event.data))
        elif t == "stderr":
            self._stderr.append(event.data if isinstance(event.data, str) else str(event.data))
        elif t == "result":
            data = event.data if isinstance(event.data, dict) else {"text/plain": str(event.data)}
            self.result.results.append(Result(data=data, is_main_result=event.is_main_result))
        elif t == "error":
            self.result.error = ExecError.from_json(event.data)
        elif t == "exit":
            self.saw_exit = True
            try:
                self.result.exit_code = int(event.data)
            except (TypeError, ValueError):
                self.result.exit_code = 1
            self.result.execution_count = event.execution_count
            self.result.state_lost = event.state_lost
            self.result.rolled_back = event.rolled_back
        # Unknown event types (a newer server) are ignored here; run_code_stream still yields them.

    def extend(self, events: Iterable[Event]) -> "ExecResultBuilder":
        for e in events:
            self.add(e)
        return self

    def finish(self) -> ExecResult:
        self.result.stdout = "".join(self._stdout)
        self.result.stderr = "".join(self._stderr)
        return self.result


@dataclass
class SandboxInfo:
    """What the server knows about a sandbox (``GET /v1/sandboxes/:id``)."""

    id: str
    state: str
    template: str = "default"
    runtime: str = "ns"
    #: True, False, or ``{"allow": [rules]}``.
    egress: Union[bool, Dict[str, List[str]]] = True
    persistent: bool = False
    parent: Optional[str] = None
    children: List[str] = field(default_factory=list)
    created_at: Optional[str] = None
    last_active_at: Optional[str] = None
    idle_timeout_seconds: Optional[int] = None
    #: ``{"cpus", "memory_mb", "disk_mb", "processes"}``: what the sandbox may use.
    limits: Dict[str, Union[int, float]] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    #: Why it ended (deleted, idle timeout, crash, its agent's channel broke, ...); None while live.
    end_reason: Optional[str] = None
    #: Fields this SDK does not know yet (a newer server).
    extras: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "SandboxInfo":
        known = {f for f in cls.__dataclass_fields__ if f != "extras"}
        kwargs = {k: v for k, v in obj.items() if k in known}
        kwargs.setdefault("id", "")
        kwargs.setdefault("state", "")
        if kwargs.get("children") is None:
            kwargs["children"] = []
        if kwargs.get("metadata") is None:
            kwargs["metadata"] = {}
        if kwargs.get("limits") is None:
            kwargs["limits"] = {}
        info = cls(**kwargs)
        info.extras = {k: v for k, v in obj.items() if k not in known}
        return info

    @property
    def alive(self) -> bool:
        """True unless the sandbox was destroyed, crashed, retired by a merge or lost in a server crash."""
        return self.state not in ENDED_SANDBOX_STATES


@dataclass
class FileInfo:
    """A file's metadata (``FileStat`` in docs/api.md); ``mtime`` in epoch seconds."""

    name: str
    path: str
    type: str = "file"
    size: int = 0
    mode: int = 0
    mtime: float = 0.0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "FileInfo":
        return cls(
            name=str(obj.get("name", "")),
            path=str(obj.get("path", "")),
            type=str(obj.get("type", "file")),
            size=int(obj.get("size", 0) or 0),
            mode=int(obj.get("mode", 0) or 0),
            mtime=float(obj.get("mtime", 0) or 0),
        )

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"
