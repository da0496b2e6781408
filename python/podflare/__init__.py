"""Podflare's Python SDK: sandboxes with a persistent Python interpreter (plus bash) that can be
forked, diffed and merged, on a self-hosted Podflare server.

    from podflare import Sandbox

    with Sandbox() as sbx:
        print(sbx.run_code("print(6*7)").stdout)   # 42

Standard library only. ``PODFLARE_HOST`` (default ``http://127.0.0.1:7070``) and
``PODFLARE_API_KEY`` configure where it connects.
"""

from ._client import DEFAULT_HOST, SDK_VERSION, Client
from ._errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotSupportedError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    InsufficientStorageError,
    PodflareConnectionError,
    PodflareError,
    PodflareTimeoutError,
    RateLimitedError,
    RateLimitError,
    SandboxGoneError,
    ServerError,
)
from ._commands import CommandHandle, CommandResult, Commands, ProcessInfo
from ._files import DownloadStream, Files
from ._pty import Pty, PtyHandle
from ._models import Event, ExecError, ExecResult, FileInfo, Result, SandboxInfo
from ._sandbox import ExecStream, Sandbox

# The names the TypeScript SDK uses. Not in __all__, so `from podflare import *` does not shadow
# the builtins; `from podflare import TimeoutError` works.
TimeoutError = PodflareTimeoutError
ConnectionError = PodflareConnectionError

__version__ = SDK_VERSION

__all__ = [
    "Sandbox",
    "Client",
    "ExecResult",
    "ExecStream",
    "ExecError",
    "Result",
    "Event",
    "SandboxInfo",
    "FileInfo",
    "Files",
    "Commands",
    "CommandHandle",
    "CommandResult",
    "ProcessInfo",
    "Pty",
    "PtyHandle",
    "DownloadStream",
    "PodflareError",
    "BadRequestError",
    "AuthenticationError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "NotSupportedError",
    "SandboxGoneError",
    "PayloadTooLargeError",
    "InsufficientStorageError",
    "RateLimitError",
    "RateLimitedError",
    "PodflareTimeoutError",
    "ServerError",
    "PodflareConnectionError",
    "DEFAULT_HOST",
    "__version__",
]
