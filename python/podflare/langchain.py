"""LangChain: a tool that runs the model's code in a Podflare sandbox.

::

    from podflare import Sandbox
    from podflare.langchain import PodflareTool

    with Sandbox() as sbx:
        tool = PodflareTool(sandbox=sbx)
        agent = create_react_agent(llm, [tool])   # or llm.bind_tools([tool])

The tool's input is ``{"code": str, "language": "python" | "bash"}``; Python runs in the sandbox's
persistent interpreter (variables persist between calls). ``langchain-core`` is imported only when
:class:`PodflareTool` is first used, so importing this module never needs it; without it, that
first use raises an ImportError naming the package. :func:`run_tool_input` is the framework-free
part (what the tool's ``_run`` does), usable on its own.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ._sandbox import Sandbox
from .anthropic import format_result_text

__all__ = ["PodflareTool", "run_tool_input", "TOOL_NAME", "TOOL_DESCRIPTION"]

TOOL_NAME = "podflare_code_interpreter"
TOOL_DESCRIPTION = (
    "Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the last "
    "expression and any error. Python (default) keeps variables, imports and files between calls, "
    "like a notebook. language='bash' runs a shell command. Files live under /root."
)
_LANGUAGES = ("python", "bash")


def run_tool_input(sandbox: Sandbox, tool_input: Mapping[str, Any], *,
                   timeout_ms: Optional[int] = None, max_output_chars: Optional[int] = None) -> str:
    """Runs a tool input ``{"code": …, "language"?: …}`` in ``sandbox``; returns the text the model sees.

    Bad input raises ValueError (LangChain reports tool errors to the model); a failing sandbox
    raises PodflareError.
    """
    code = tool_input.get("code")
    language = tool_input.get("language") or "python"
    if not isinstance(code, str):
        raise ValueError('expected {"code": string, "language"?: "python" | "bash"}')
    if language not in _LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(_LANGUAGES)}, got {language!r}")
    return format_result_text(sandbox.run_code(code, language, timeout_ms=timeout_ms), max_output_chars)


def _build_tool_class() -> type:
    try:
        from langchain_core.tools import BaseTool
        from pydantic import BaseModel, ConfigDict, Field
    except ImportError as err:
        raise ImportError(
            "podflare.langchain.PodflareTool needs the langchain-core package (pip install langchain-core)"
        ) from err

    class PodflareToolInput(BaseModel):
        code: str = Field(description="The code to run.")
        language: str = Field(default="python", description="python (default) or bash.")

    class PodflareTool(BaseTool):  # type: ignore[misc, valid-type]
        """A LangChain tool running code in ``sandbox`` (its persistent Python interpreter, or bash)."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        name: str = TOOL_NAME
        description: str = TOOL_DESCRIPTION
        args_schema: type = PodflareToolInput
        sandbox: Any
        timeout_ms: Optional[int] = None
        max_output_chars: Optional[int] = None

        def _run(self, code: str, language: str = "python", **_: Any) -> str:
            return run_tool_input(self.sandbox, {"code": code, "language": language},
                                  timeout_ms=self.timeout_ms, max_output_chars=self.max_output_chars)

    return PodflareTool


def __getattr__(name: str) -> Any:
    # PEP 562: the class subclasses LangChain's BaseTool, so it is built (and langchain-core
    # imported) only when someone asks for it.
    if name == "PodflareTool":
        cls = _build_tool_class()
        globals()["PodflareTool"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
