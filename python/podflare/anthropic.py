"""Anthropic Messages API: run Claude's ``tool_use`` blocks in a Podflare sandbox.

Send :data:`CODE_EXECUTION_TOOL` (input ``{code, language?}``) and/or :data:`BASH_TOOL` (Anthropic's
client-side bash tool, input ``{command}``) as ``tools``, then hand each ``tool_use`` block of the
answer to :func:`handle_code_execution_tool_use` and send back what it returns::

    import anthropic
    from podflare import Sandbox
    from podflare.anthropic import TOOLS, handle_code_execution_tool_use

    client = anthropic.Anthropic()
    messages = [{"role": "user", "content": "What is the 50th Fibonacci number?"}]
    with Sandbox() as sbx:
        while True:
            msg = client.messages.create(model=..., max_tokens=2048, tools=TOOLS, messages=messages)
            messages.append({"role": "assistant", "content": msg.content})
            uses = [b for b in msg.content if b.type == "tool_use"]
            if not uses:
                break
            messages.append({"role": "user",
                             "content": [handle_code_execution_tool_use(b, sbx) for b in uses]})

The ``anthropic`` package is not needed: blocks may be its SDK objects or plain dicts.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, cast

from ._errors import NotFoundError
from ._models import ExecResult
from ._process_tools import (PROCESS_TOOL_DESCRIPTIONS, PROCESS_TOOL_NAMES, PROCESS_TOOLS, ProcessToolInputError,
                             describe_not_found, run_process_tool)
from ._protocol import TIMEOUT_EXIT_CODE
from ._sandbox import Sandbox

__all__ = [
    "CODE_EXECUTION_TOOL",
    "BASH_TOOL",
    "TOOLS",
    "code_execution_tool",
    "handle_code_execution_tool_use",
    "format_result_text",
    "PROCESS_TOOLS",
    "PROCESS_TOOL_NAMES",
    "PROCESS_TOOL_DESCRIPTIONS",
    "handle_process_tool_use",
]

_LANGUAGES = ("python", "bash")


def code_execution_tool(name: str = "code_execution", description: Optional[str] = None) -> Dict[str, Any]:
    """The definition of the code tool, to put in ``tools=`` (a custom, client-side tool)."""
    return {
        "name": name,
        "description": description or (
            "Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the "
            "last expression and any error. Python (default) keeps variables, imports and files "
            "between calls, like a notebook; pandas, numpy and matplotlib are installed. "
            "language='bash' runs a shell command. Files live under /root."
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "The code to run."},
                "language": {
                    "type": "string",
                    "enum": list(_LANGUAGES),
                    "description": "python (default) or bash.",
                },
            },
            "required": ["code"],
        },
    }


#: The code tool definition (name ``code_execution``, input ``{code, language?}``).
CODE_EXECUTION_TOOL: Dict[str, Any] = code_execution_tool()

#: Anthropic's client-side bash tool; its ``tool_use`` input is ``{command}`` (or ``{restart: true}``).
#: Note: each command runs in a fresh ``bash -c`` in the sandbox: files persist, cwd and exported
#: variables do not (chain with ``&&``).
BASH_TOOL: Dict[str, Any] = {"type": "bash_20250124", "name": "bash"}

#: The tools to send: the code tool (which also runs bash with ``language: "bash"``).
TOOLS: List[Dict[str, Any]] = [CODE_EXECUTION_TOOL]


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _input_of(block: Any) -> Mapping[str, Any]:
    raw = _field(block, "input")
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return raw
    for attr in ("model_dump", "to_dict", "dict"):  # an SDK/pydantic object
        fn = getattr(raw, attr, None)
        if callable(fn):
            value = fn()
            if isinstance(value, Mapping):
                return value
    return cast(Mapping[str, Any], vars(raw)) if hasattr(raw, "__dict__") else {}


def format_result_text(result: ExecResult, max_chars: Optional[int] = None) -> str:
    """The text a model sees for an exec: stdout, stderr, the last expression's value, the error's
    traceback (when stderr does not already hold it) and a non-zero exit code. Never empty (the
    Messages API refuses empty text blocks)."""
    parts: List[str] = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append(result.stderr.rstrip("\n"))
    main = result.main_result
    if main is not None and main.text:
        parts.append(main.text)
    if result.error is not None:
        tb = result.error.traceback.strip()
        if not tb:
            tb = str(result.error)
        if not result.stderr or tb not in result.stderr:
            parts.append(tb)
    if result.exit_code != 0 and result.error is None:
        note = "timed out" if result.exit_code == TIMEOUT_EXIT_CODE else f"exit code {result.exit_code}"
        parts.append(f"[{note}]")
    if result.state_lost:
        parts.append("[the interpreter was restarted: earlier variables are gone]")
    if result.rolled_back:
        parts.append("[rolled back: everything this call did (variables, files) was undone]")
    text = "\n".join(p for p in parts if p) or "(no output)"
    if max_chars is not None and len(text) > max_chars:
        cut = len(text) - max_chars
        text = text[: max_chars // 2] + f"\n… [{cut} characters cut] …\n" + text[-(max_chars - max_chars // 2):]
    return text


def _tool_result(tool_use_id: Any, text: str, is_error: bool,
                 extra: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    content: List[Dict[str, Any]] = [{"type": "text", "text": text}]
    if extra:
        content.extend(extra)
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": is_error}


def handle_code_execution_tool_use(
    block: Any,
    sbx: Sandbox,
    *,
    timeout_ms: Optional[int] = None,
    max_output_chars: Optional[int] = None,
    include_images: bool = True,
    atomic: bool = False,
) -> Dict[str, Any]:
    """Runs a ``tool_use`` block in ``sbx`` and returns its ``tool_result`` block (a dict).

    ``block`` is an ``anthropic`` SDK object or a plain dict ``{type, id, name, input}``. The input
    is the code tool's ``{code, language?}`` or the bash tool's ``{command}`` / ``{restart: true}``.

    Returns ``{"type": "tool_result", "tool_use_id": …, "content": [{"type": "text", "text": …}],
    "is_error": exit_code != 0}``; with ``include_images``, PNG figures follow the text as image
    blocks. A block without usable input gives an ``is_error`` result (the model can correct
    itself); a failing sandbox raises (PodflareError).

    Args:
        timeout_ms: bound on the code's run time (exit code 124 past it).
        max_output_chars: cut the text in the middle beyond this many characters.
        include_images: add matplotlib figures and other PNG results as image blocks.
        atomic: a call that fails is undone (variables and files as before it); the text says so.
    """
    block_type = _field(block, "type")
    if block_type not in (None, "tool_use"):
        raise ValueError(f"expected a tool_use block, got type {block_type!r}")
    tool_use_id = _field(block, "id")
    if not tool_use_id:
        raise ValueError("the tool_use block has no id")
    data = _input_of(block)

    code = data.get("code")
    language = data.get("language") or "python"
    if code is None and "command" in data:
        code, language = data.get("command"), "bash"
    if code is None and data.get("restart"):
        return _tool_result(tool_use_id, "bash restarted (every command runs in a fresh shell)", False)
    if not isinstance(code, str):
        return _tool_result(tool_use_id, "invalid tool input: expected {\"code\": string} "
                            "(or {\"command\": string} for bash)", True)
    if language not in _LANGUAGES:
        return _tool_result(tool_use_id, f"invalid tool input: language must be one of {', '.join(_LANGUAGES)}, "
                            f"got {language!r}", True)

    result = sbx.run_code(code, language, timeout_ms=timeout_ms, atomic=atomic)
    images: List[Dict[str, Any]] = []
    if include_images:
        for r in result.results:
            if r.png:
                images.append({"type": "image",
                               "source": {"type": "base64", "media_type": "image/png", "data": r.png}})
    return _tool_result(tool_use_id, format_result_text(result, max_output_chars), result.exit_code != 0, images)


def handle_process_tool_use(block: Any, sbx: Sandbox, *, max_output_chars: Optional[int] = None) -> Dict[str, Any]:
    """Runs a ``tool_use`` block of one of :data:`PROCESS_TOOLS` (``start_process``,
    ``read_process_output``, ``expose_port``, ``kill_process``) in ``sbx`` and returns its
    ``tool_result`` block. The text is the TypeScript SDK's: ``{"pid":…}`` when started; a JSON head
    line (pid, running, exitCode, nextOffset) then the output when read (cut in the middle past
    ``max_output_chars``, default 20000); ``{"url","expiresAt"}`` when exposed. Bad input and an
    unknown pid give ``is_error`` results; a failing sandbox raises (PodflareError).

    Example::

        tools = TOOLS + PROCESS_TOOLS
        ...
        results = [handle_process_tool_use(b, sbx) if b.name in PROCESS_TOOL_NAMES.values()
                   else handle_code_execution_tool_use(b, sbx) for b in uses]
    """
    block_type = _field(block, "type")
    if block_type not in (None, "tool_use"):
        raise ValueError(f"expected a tool_use block, got type {block_type!r}")
    tool_use_id = _field(block, "id")
    if not tool_use_id:
        raise ValueError("the tool_use block has no id")
    data = _input_of(block)
    try:
        return _tool_result(tool_use_id, run_process_tool(str(_field(block, "name")), data, sbx, max_output_chars), False)
    except ProcessToolInputError as err:
        return _tool_result(tool_use_id, str(err), True)
    except NotFoundError:
        return _tool_result(tool_use_id, describe_not_found(data), True)
