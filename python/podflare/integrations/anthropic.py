"""Alias of :mod:`podflare.anthropic` (the path the hosted product's README uses), kept so code
written against either path runs unchanged."""

from ..anthropic import (BASH_TOOL, CODE_EXECUTION_TOOL, PROCESS_TOOL_DESCRIPTIONS, PROCESS_TOOL_NAMES, PROCESS_TOOLS, TOOLS,
                         code_execution_tool, format_result_text, handle_code_execution_tool_use, handle_process_tool_use)

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
