"""Google Gemini (``google-genai``) function calling: run the model's code in a Podflare sandbox.

::

    from google import genai
    from google.genai import types
    from podflare import Sandbox
    from podflare.gemini import podflare_function_declaration, run_function_call

    client = genai.Client()
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[podflare_function_declaration()])])
    with Sandbox() as sbx:
        reply = client.models.generate_content(model=..., contents=question, config=config)
        for call in reply.function_calls or []:
            response = run_function_call(call, sbx)    # {"name", "response": {...}}
            # send back: types.Part.from_function_response(name=response["name"], response=response["response"])

Nothing here imports ``google-genai``: the declaration is the plain dict form ``FunctionDeclaration``
accepts, and calls may be ``types.FunctionCall`` objects or dicts ``{"name", "args"}``.
:func:`podflare_tool` is the one helper that builds a ``types.Tool`` and so imports it (lazily,
with an ImportError naming the package when it is missing).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ._sandbox import Sandbox
from .anthropic import format_result_text

__all__ = ["FUNCTION_NAME", "podflare_function_declaration", "run_function_call", "podflare_tool"]

FUNCTION_NAME = "run_code"
_LANGUAGES = ("python", "bash")


def podflare_function_declaration(name: str = FUNCTION_NAME, description: Optional[str] = None) -> Dict[str, Any]:
    """The function declaration to offer Gemini (``types.FunctionDeclaration``'s dict form)."""
    return {
        "name": name,
        "description": description or (
            "Run code in a persistent, isolated sandbox and get its stdout, stderr, the value of the "
            "last expression and any error. Python (default) keeps variables, imports and files between "
            "calls, like a notebook. language='bash' runs a shell command. Files live under /root."
        ),
        "parameters": {
            "type": "OBJECT",
            "properties": {
                "code": {"type": "STRING", "description": "The code to run."},
                "language": {"type": "STRING", "enum": list(_LANGUAGES), "description": "python (default) or bash."},
            },
            "required": ["code"],
        },
    }


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def run_function_call(call: Any, sandbox: Sandbox, *, timeout_ms: Optional[int] = None,
                      max_output_chars: Optional[int] = None) -> Dict[str, Any]:
    """Runs a function call (``types.FunctionCall`` or ``{"name", "args", "id"?}``) in ``sandbox``.

    Returns the function response as a dict ``{"name", "response": {"output": text, "exit_code": n}}``
    (plus ``"id"`` when the call had one), or ``{"name", "response": {"error": why}}`` for input the
    model can correct. A failing sandbox raises PodflareError.
    """
    name = _field(call, "name") or FUNCTION_NAME
    args = _field(call, "args") or {}
    reply: Dict[str, Any] = {"name": name}
    call_id = _field(call, "id")
    if call_id:
        reply["id"] = call_id
    code = args.get("code") if isinstance(args, Mapping) else None
    language = (args.get("language") if isinstance(args, Mapping) else None) or "python"
    if not isinstance(code, str):
        reply["response"] = {"error": 'expected args {"code": string, "language"?: "python" | "bash"}'}
        return reply
    if language not in _LANGUAGES:
        reply["response"] = {"error": f"language must be one of {', '.join(_LANGUAGES)}, got {language!r}"}
        return reply
    result = sandbox.run_code(code, language, timeout_ms=timeout_ms)
    reply["response"] = {"output": format_result_text(result, max_output_chars), "exit_code": result.exit_code}
    return reply


def podflare_tool(name: str = FUNCTION_NAME) -> Any:
    """A ``google.genai.types.Tool`` holding the declaration (needs the google-genai package)."""
    try:
        from google.genai import types
    except ImportError as err:
        raise ImportError("podflare.gemini.podflare_tool needs the google-genai package (pip install google-genai)") from err
    return types.Tool(function_declarations=[types.FunctionDeclaration(**podflare_function_declaration(name))])
