"""OpenAI Agents SDK: a function tool that runs code in a Podflare sandbox.

    from agents import Agent, Runner
    from podflare.integrations.openai_agents import podflare_code_interpreter

    agent = Agent(name="analyst", tools=[podflare_code_interpreter()])
    print(Runner.run_sync(agent, "What is 2**100?").final_output)

The tool's input is ``{code: string, language?: "python" | "bash"}``. Without a ``sandbox`` it creates
one on first use (from ``PODFLARE_HOST`` / ``PODFLARE_API_KEY``) and keeps it for later calls, so
Python state persists across the agent's turns; ``tool.podflare.close()`` (or process exit)
destroys it. This module imports ``agents`` only inside :func:`podflare_code_interpreter`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
from typing import Any, Callable, Dict, List, Optional

from .._errors import NotFoundError
from .._process_tools import PROCESS_TOOLS, ProcessToolInputError, describe_not_found, run_process_tool
from .._sandbox import Sandbox
from .anthropic import format_result_text

__all__ = ["podflare_code_interpreter", "PodflareCodeInterpreter", "PARAMS_JSON_SCHEMA", "TOOL_NAME",
           "podflare_process_tools"]

#: The tool's name as the model sees it.
TOOL_NAME = "run_code"

DESCRIPTION = (
    "Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the last "
    "expression and any error. Python (default) keeps variables, imports and files between calls, "
    "like a notebook; pandas, numpy and matplotlib are installed. language='bash' runs a shell "
    "command. Files live under /root."
)

#: The tool's input schema. Not strict-mode (``language`` is optional).
PARAMS_JSON_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "The code to run."},
        "language": {"type": "string", "enum": ["python", "bash"], "description": "python (default) or bash."},
    },
    "required": ["code"],
    "additionalProperties": False,
}


class PodflareCodeInterpreter:
    """The tool's state: the sandbox (given, or created on first use) and the invoke function.

    ``invoke(ctx, args_json)`` is the ``on_invoke_tool`` of the FunctionTool: it parses the model's
    JSON arguments, runs the code in a worker thread (the SDK's event loop is not blocked) and
    returns the text the model sees. Bad arguments come back as an error text, not an exception.
    """

    def __init__(self, sandbox: Optional[Sandbox] = None, *, timeout_ms: Optional[int] = None,
                 max_output_chars: Optional[int] = 50_000,
                 sandbox_factory: Optional[Callable[[], Sandbox]] = None) -> None:
        self._sandbox = sandbox
        self._owned = False
        self._lock = threading.Lock()
        self._factory = sandbox_factory or Sandbox
        self.timeout_ms = timeout_ms
        self.max_output_chars = max_output_chars

    @property
    def sandbox(self) -> Optional[Sandbox]:
        """The sandbox in use, or None before the first call when it is created lazily."""
        return self._sandbox

    def get_sandbox(self) -> Sandbox:
        with self._lock:
            if self._sandbox is None or (self._owned and self._sandbox.closed):
                self._sandbox = self._factory()
                if not self._owned:
                    self._owned = True
                    atexit.register(self.close)
            return self._sandbox

    def run(self, args_json: str) -> str:
        """Runs the tool synchronously on the model's JSON arguments; returns the output text."""
        try:
            args = json.loads(args_json) if args_json else {}
        except ValueError as err:
            return f"invalid arguments: not JSON ({err})"
        if not isinstance(args, dict) or not isinstance(args.get("code"), str):
            return 'invalid arguments: expected {"code": string, "language"?: "python" | "bash"}'
        language = args.get("language") or "python"
        if language not in ("python", "bash"):
            return f"invalid arguments: language must be python or bash, got {language!r}"
        result = self.get_sandbox().run_code(args["code"], language, timeout_ms=self.timeout_ms)
        return format_result_text(result, self.max_output_chars)

    async def invoke(self, ctx: Any, args_json: str) -> str:
        return await asyncio.to_thread(self.run, args_json)

    def close(self) -> None:
        """Destroys the sandbox if this tool created it (a sandbox passed in is left alone)."""
        with self._lock:
            sbx = self._sandbox if self._owned else None
        if sbx is not None:
            try:
                sbx.close()
            except Exception:
                pass


def podflare_code_interpreter(
    sandbox: Optional[Sandbox] = None,
    *,
    name: str = TOOL_NAME,
    description: str = DESCRIPTION,
    timeout_ms: Optional[int] = None,
    max_output_chars: Optional[int] = 50_000,
) -> Any:
    """An OpenAI Agents SDK ``FunctionTool`` running code in ``sandbox`` (created on first use
    when None). Its ``.podflare`` attribute is the :class:`PodflareCodeInterpreter` (with
    ``.sandbox`` and ``.close()``).

    Raises:
        ImportError: when the ``agents`` package (``pip install openai-agents``) is missing.
    """
    try:
        from agents import FunctionTool  # type: ignore[import]
    except ImportError as err:
        raise ImportError(
            "podflare_code_interpreter() needs the OpenAI Agents SDK: pip install openai-agents "
            "(it provides the `agents` package)") from err
    state = PodflareCodeInterpreter(sandbox, timeout_ms=timeout_ms, max_output_chars=max_output_chars)
    tool = FunctionTool(
        name=name,
        description=description,
        params_json_schema=json.loads(json.dumps(PARAMS_JSON_SCHEMA)),
        on_invoke_tool=state.invoke,
        strict_json_schema=False,
    )
    setattr(tool, "podflare", state)
    return tool


def podflare_process_tools(sandbox: Any, *, max_output_chars: Optional[int] = None) -> List[Any]:
    """OpenAI Agents SDK ``FunctionTool``s for background processes: ``start_process``,
    ``read_process_output``, ``expose_port`` and ``kill_process`` (the TypeScript SDK's and the MCP
    server's tools, same wording and texts). ``sandbox`` is a :class:`Sandbox` or a
    :func:`podflare_code_interpreter` tool, whose sandbox they then share (created on first use).
    Bad arguments and an unknown pid come back as text the model reads, not as exceptions.

    Example::

        run_code = podflare_code_interpreter()
        agent = Agent(name="dev", tools=[run_code, *podflare_process_tools(run_code)])
    """
    try:
        from agents import FunctionTool  # type: ignore[import]
    except ImportError as err:
        raise ImportError(
            "podflare_process_tools() needs the OpenAI Agents SDK: pip install openai-agents "
            "(it provides the `agents` package)") from err
    state = getattr(sandbox, "podflare", None)
    get_sandbox: Callable[[], Sandbox] = state.get_sandbox if isinstance(state, PodflareCodeInterpreter) else (lambda: sandbox)

    def make(definition: Dict[str, Any]) -> Any:
        name = definition["name"]

        def run(args_json: str) -> str:
            try:
                args = json.loads(args_json) if args_json else {}
            except ValueError as err:
                return f"invalid arguments: not JSON ({err})"
            if not isinstance(args, dict):
                return "invalid arguments: expected a JSON object"
            try:
                return run_process_tool(name, args, get_sandbox(), max_output_chars)
            except ProcessToolInputError as err:
                return f"invalid arguments: {err}"
            except NotFoundError:
                return describe_not_found(args)

        async def invoke(ctx: Any, args_json: str) -> str:
            return await asyncio.to_thread(run, args_json)

        schema = dict(json.loads(json.dumps(definition["input_schema"])), additionalProperties=False)
        return FunctionTool(name=name, description=definition["description"], params_json_schema=schema,
                            on_invoke_tool=invoke, strict_json_schema=False)

    return [make(d) for d in PROCESS_TOOLS]
