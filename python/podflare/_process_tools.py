"""The background-process tools the adapters offer (``start_process``, ``read_process_output``,
``expose_port``, ``kill_process``): their definitions, what they do and the text the model is shown.

The wording and the input schemas are the TypeScript SDK's (``packages/sdk/src/adapters/process-tools.ts``),
word for word: test/adapters-anthropic.test.ts compares :data:`PROCESS_TOOLS` with ``processTools()``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

from ._sandbox import Sandbox

__all__ = ["PROCESS_TOOL_DESCRIPTIONS", "PROCESS_TOOL_NAMES", "PROCESS_TOOLS", "ProcessToolInputError",
           "run_process_tool", "describe_not_found"]

#: What the model is told about each tool (the same wording as the TypeScript SDK's and the MCP server's).
PROCESS_TOOL_DESCRIPTIONS: Dict[str, str] = {
    "startProcess": (
        "Start a shell command in the background (a dev server, a test watcher, a long build) and return its pid at once. "
        "It keeps running beside the code-running tool; read its output with the read-process-output tool, stop it with "
        "the kill-process tool."),
    "readProcessOutput": (
        "Read what a background process wrote (stdout and stderr in order) from an offset: pass the nextOffset of the "
        "previous call to get only what is new. Says whether it is still running and its exit code."),
    "exposePort": (
        "Get a URL through which a person (or a browser) reaches a server listening on a port inside the sandbox, e.g. a "
        "dev server started in the background. Anyone with the URL reaches that port only, until it expires."),
    "killProcess": "Stop a background process and everything it started.",
}

#: The tools' names as the model sees them.
PROCESS_TOOL_NAMES: Dict[str, str] = {
    "startProcess": "start_process",
    "readProcessOutput": "read_process_output",
    "exposePort": "expose_port",
    "killProcess": "kill_process",
}

MAX_PID = 4_194_304
MAX_EXPOSE_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_OUTPUT_CHARS = 20_000
NO_OUTPUT = "(no output)"

_PID = {"type": "integer", "minimum": 1, "maximum": MAX_PID, "description": "The process id returned by start_process."}

#: The four tools' definitions (name, description, JSON ``input_schema``), as the Messages API takes them.
PROCESS_TOOLS: List[Dict[str, Any]] = [
    {"name": "start_process", "description": PROCESS_TOOL_DESCRIPTIONS["startProcess"], "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string",
                        "description": 'The command line, run with bash -c, e.g. "python3 -m http.server 8000".'},
            "cwd": {"type": "string", "description": "Working directory. Default: /root"},
        },
        "required": ["command"]}},
    {"name": "read_process_output", "description": PROCESS_TOOL_DESCRIPTIONS["readProcessOutput"], "input_schema": {
        "type": "object",
        "properties": {
            "pid": _PID,
            "offset": {"type": "integer", "minimum": 0,
                       "description": "Where to start reading: the nextOffset of the previous read. Default: 0"},
        },
        "required": ["pid"]}},
    {"name": "expose_port", "description": PROCESS_TOOL_DESCRIPTIONS["exposePort"], "input_schema": {
        "type": "object",
        "properties": {
            "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                     "description": "The port the server listens on inside the sandbox (on 127.0.0.1 or 0.0.0.0)."},
            "expires_in_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_EXPOSE_SECONDS,
                                   "description": "How long the URL works. Default: 3600"},
        },
        "required": ["port"]}},
    {"name": "kill_process", "description": PROCESS_TOOL_DESCRIPTIONS["killProcess"], "input_schema": {
        "type": "object", "properties": {"pid": _PID}, "required": ["pid"]}},
]


class ProcessToolInputError(ValueError):
    """A mistake in a process tool's input: told to the model, not raised to the caller."""


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _integer(data: Mapping[str, Any], key: str, low: int, high: int, optional: bool) -> Optional[int]:
    value = data.get(key)
    if value is None:
        if optional:
            return None
        raise ProcessToolInputError(f'"{key}" is required: an integer from {low} to {high}.')
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProcessToolInputError(f'"{key}" must be an integer from {low} to {high}, got {_compact(value)}.')
    return value


def _truncate_middle(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = int(max(0, max_chars) * 0.6)
    tail = max(0, max_chars) - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[… {omitted} characters omitted …]\n{text[len(text) - tail:] if tail else ''}"


def _read_output(sbx: Sandbox, pid: int, offset: int, max_chars: int) -> str:
    out: List[str] = []
    next_offset = offset
    dropped = 0
    for ev in sbx.commands.output(pid, offset=offset):
        kind = ev.get("type")
        if kind in ("stdout", "stderr"):
            out.append(ev["data"])
            next_offset = int(ev["offset"]) + len(ev["data"])
        elif kind == "lost":
            dropped += int(ev["data"])
    info = sbx.commands.get(pid)
    head: Dict[str, Any] = {"pid": pid, "running": info.running, "exitCode": info.exit_code, "nextOffset": next_offset}
    if dropped:
        head["droppedChars"] = dropped
    text = _truncate_middle("".join(out), max_chars)
    return f"{_compact(head)}\n{text or NO_OUTPUT}"


def run_process_tool(name: str, data: Mapping[str, Any], sbx: Sandbox,
                     max_output_chars: Optional[int] = None) -> str:
    """Runs one process tool by name on its input; returns the text the model is shown (the same as
    the TypeScript SDK's). Raises :class:`ProcessToolInputError` for bad input and
    :class:`NotFoundError` for an unknown pid."""
    if name == "start_process":
        command, cwd = data.get("command"), data.get("cwd")
        if not isinstance(command, str) or not command:
            raise ProcessToolInputError('start_process needs a non-empty string "command" input.')
        if cwd is not None and not isinstance(cwd, str):
            raise ProcessToolInputError('"cwd" must be a string.')
        handle = sbx.commands.run(command, background=True, cwd=cwd)
        return _compact({"pid": handle.pid})
    if name == "read_process_output":
        pid = _integer(data, "pid", 1, MAX_PID, False)
        offset = _integer(data, "offset", 0, 2**53 - 1, True) or 0
        return _read_output(sbx, int(pid or 0), offset, max_output_chars or DEFAULT_MAX_OUTPUT_CHARS)
    if name == "expose_port":
        port = _integer(data, "port", 1, 65535, False)
        seconds = _integer(data, "expires_in_seconds", 1, MAX_EXPOSE_SECONDS, True)
        answer = sbx.get_port_url(int(port or 0), seconds)
        return _compact({"url": answer["url"], "expiresAt": answer.get("expires_at")})
    if name == "kill_process":
        pid = int(_integer(data, "pid", 1, MAX_PID, False) or 0)
        return f"Killed process {pid}." if sbx.commands.kill(pid) else f"Process {pid} had already ended."
    raise ProcessToolInputError(f'Unknown process tool "{name}".')


def describe_not_found(data: Mapping[str, Any]) -> str:
    """The text the model is shown for an unknown pid."""
    return f"No background process with pid {data.get('pid')} in this sandbox."

