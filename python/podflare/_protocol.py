"""The Podflare protocol's shared definitions, read from ``protocol.json`` next to this module.

That file is generated from the TypeScript definitions in packages/protocol (``npm run
gen:protocol``) and committed; a test in the repository fails when it drifts from them. Nothing
here is written by hand: the error table, the sandbox states, the id pattern and the named exit
codes all come from the document.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from types import MappingProxyType
from typing import Any, FrozenSet, Mapping, Pattern, Tuple

__all__ = [
    "PROTOCOL",
    "AGENT_PROTOCOL_VERSION",
    "ERROR_SPECS",
    "ERROR_STATUS",
    "RETRYABLE_CODES",
    "SANDBOX_STATES",
    "ENDED_SANDBOX_STATES",
    "SANDBOX_ID_PATTERN",
    "EXIT_CODES",
    "TIMEOUT_EXIT_CODE",
    "KILLED_EXIT_CODE",
    "EXEC_EVENT_TYPES",
]


def _load() -> Mapping[str, Any]:
    text = resources.files(__package__).joinpath("protocol.json").read_text(encoding="utf-8")
    return MappingProxyType(json.loads(text))


#: The whole document, read-only.
PROTOCOL: Mapping[str, Any] = _load()

#: The server <-> agent channel's version (the SDK does not speak it; here for completeness).
AGENT_PROTOCOL_VERSION: int = PROTOCOL["agent_protocol_version"]

#: Each stable error code's ``{status, retryable, description}``.
ERROR_SPECS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {code: MappingProxyType(dict(spec)) for code, spec in PROTOCOL["errors"].items()}
)

#: The server's stable error codes and their HTTP statuses.
ERROR_STATUS: Mapping[str, int] = MappingProxyType({code: spec["status"] for code, spec in ERROR_SPECS.items()})

#: The server codes whose call may succeed later unchanged.
RETRYABLE_CODES: FrozenSet[str] = frozenset(code for code, spec in ERROR_SPECS.items() if spec["retryable"])

#: Every state a sandbox can be in, and those it never leaves.
SANDBOX_STATES: Tuple[str, ...] = tuple(PROTOCOL["sandbox_states"])
ENDED_SANDBOX_STATES: FrozenSet[str] = frozenset(PROTOCOL["ended_sandbox_states"])

#: A whole sandbox id (``sbx_`` and 32 hex digits).
SANDBOX_ID_PATTERN: Pattern[str] = re.compile(PROTOCOL["sandbox_id_pattern"])

#: The exit codes of execs that did not end by themselves.
EXIT_CODES: Mapping[str, int] = MappingProxyType(dict(PROTOCOL["exit_codes"]))
#: An exec that hit its ``timeout_ms`` (as coreutils' ``timeout``).
TIMEOUT_EXIT_CODE: int = EXIT_CODES["timeout"]
#: An exec killed before it could exit (its sandbox ended under it).
KILLED_EXIT_CODE: int = EXIT_CODES["killed"]

#: The ``type`` of every exec stream event.
EXEC_EVENT_TYPES: Tuple[str, ...] = tuple(PROTOCOL["exec_event_types"])
