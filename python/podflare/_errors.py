"""Every error the SDK raises is a :class:`PodflareError`; each subclass is a failure the caller can
act on. HTTP answers are mapped to classes by the server's stable ``code`` in one table
(:data:`ERROR_CLASSES`), falling back to the HTTP status when the body is not ours (a proxy's 502
page, an empty body).

What is NOT an exception: a non-zero exit code and an ``error`` event inside an exec's stream (an
uncaught exception in the user's code). Those are results: ``ExecResult.exit_code`` and
``ExecResult.error``.
"""

from __future__ import annotations

import builtins
import email.utils
import json
import time
from typing import Any, Dict, Mapping, Optional, Type, cast

from ._protocol import ERROR_STATUS, RETRYABLE_CODES

__all__ = [
    "PodflareError",
    "BadRequestError",
    "AuthenticationError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "SandboxGoneError",
    "PayloadTooLargeError",
    "InsufficientStorageError",
    "RateLimitError",
    "RateLimitedError",
    "PodflareTimeoutError",
    "ServerError",
    "PodflareConnectionError",
    "ERROR_CLASSES",
    "ERROR_STATUS",
    "error_from_response",
]

# ERROR_STATUS (code -> HTTP status) and the retryable codes come from the protocol document
# (packages/protocol/src/errors.ts, through protocol.json); the classes below are the SDK's own.
#: Retryable: the protocol's retryable codes, plus no answer at all (the same call may get through).
_RETRYABLE = RETRYABLE_CODES | {"connection_error"}


class PodflareError(Exception):
    """The root of every error the SDK raises.

    Attributes:
        message: for errors from the server, its ``error`` string verbatim.
        code: the server's stable code (``not_found``, ``sandbox_gone``…) or one of the SDK's own:
            ``connection_error`` (no answer) and ``invalid_response`` (an answer that is not the API).
        status: the HTTP status, or 0 when there was no HTTP answer.
        field: the request field the error is about, when the server named one.

    Example::

        try:
            sbx.run_code("print(1)")
        except SandboxGoneError:
            sbx = Sandbox()
        except PodflareError as err:
            if not err.retryable:
                raise
    """

    default_code = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: int = 0,
        field: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: str = code if code is not None else self.default_code
        self.status = status
        self.field = field

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later (rate limit, overload, timeout, network)."""
        return self.code in _RETRYABLE

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status})"

    def __reduce__(self) -> Any:  # keep the keyword-only attributes through pickling (multiprocessing)
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: Type["PodflareError"], message: str, state: Dict[str, Any]) -> "PodflareError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class BadRequestError(PodflareError):
    """The request was malformed: a missing or ill-typed field (``field`` names it), an unknown
    language, a bad path (400). Also raised for 405 and 415, and for arguments the SDK refuses
    before sending anything (then ``status`` is 0)."""

    default_code = "bad_request"


class AuthenticationError(PodflareError):
    """The API key is missing or wrong (401): set ``PODFLARE_API_KEY`` or pass ``api_key=``."""

    default_code = "unauthorized"


class ForbiddenError(AuthenticationError):
    """The API key may not touch that sandbox (403)."""

    default_code = "forbidden"


class NotFoundError(PodflareError):
    """Unknown sandbox (or one retired by a merge), unknown file, or unknown route (404)."""

    default_code = "not_found"


class ConflictError(PodflareError):
    """The operation conflicts with the sandbox's current state (409)."""

    default_code = "conflict"


class NotSupportedError(PodflareError):
    """The sandbox's runtime cannot do this (422), e.g. checkpoints where it cannot fork; the
    message says what it can."""

    default_code = "not_supported"


class SandboxGoneError(PodflareError):
    """The sandbox existed but was destroyed: closed, idle timeout, lifetime reached or crashed (410).
    Create a new one; pass a larger ``idle_timeout_seconds`` if it timed out while unused."""

    default_code = "sandbox_gone"


class PayloadTooLargeError(BadRequestError):
    """The request body is over the server's cap (413). JSON bodies are capped at 8 MiB: send files
    with ``upload()``, which has no cap beyond the sandbox's disk."""

    default_code = "payload_too_large"


class InsufficientStorageError(PodflareError):
    """The sandbox's disk is full (507): its own disk limit (``limits.disk_mb``) is reached, or the
    server's disk volume, shared by every sandbox, is. Free space in the sandbox (or ask for a
    larger ``disk_mb``) and try again; other sandboxes are not affected."""

    default_code = "insufficient_storage"


class RateLimitError(PodflareError):
    """Too many requests or sandboxes (429). Wait ``retry_after`` seconds before trying again.

    Attributes:
        retry_after: seconds the server asked to wait (its ``Retry-After`` header), or None.
    """

    default_code = "rate_limited"

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


#: Another name for :class:`RateLimitError`.
RateLimitedError = RateLimitError


class PodflareTimeoutError(PodflareError, builtins.TimeoutError):
    """The sandbox did not answer in time (504), or the server did not answer within the client's
    ``timeout`` (``status`` 0). Also a builtin ``TimeoutError``. Exported as
    ``podflare.TimeoutError`` too (not by ``import *``, so the builtin is not shadowed)."""

    default_code = "timeout"


class ServerError(PodflareError):
    """The server failed (5xx): a bug (``internal``), it cannot start a sandbox now
    (``unavailable``, 503: retry later), or the sandbox's agent broke the protocol
    (``agent_protocol``, 502)."""

    default_code = "internal"


class PodflareConnectionError(PodflareError, builtins.ConnectionError):
    """The server could not be reached, or the connection dropped mid-answer (``status`` 0). Check
    ``PODFLARE_HOST`` (or ``host=``) and that ``podflare serve`` runs there. Also a builtin
    ``ConnectionError``."""

    default_code = "connection_error"


#: The one table mapping the server's stable codes to error classes.
ERROR_CLASSES: Mapping[str, Type[PodflareError]] = {
    "bad_request": BadRequestError,
    "unauthorized": AuthenticationError,
    "forbidden": ForbiddenError,
    "not_found": NotFoundError,
    "method_not_allowed": BadRequestError,
    "conflict": ConflictError,
    "sandbox_gone": SandboxGoneError,
    "payload_too_large": PayloadTooLargeError,
    "unsupported_media_type": BadRequestError,
    "rate_limited": RateLimitError,
    "internal": ServerError,
    "agent_protocol": ServerError,
    "unavailable": ServerError,
    "timeout": PodflareTimeoutError,
    "insufficient_storage": InsufficientStorageError,
    "checkpoint_not_found": NotFoundError,
    "not_supported": NotSupportedError,
    "node_unavailable": ServerError,
    "no_capacity": ServerError,
}


def code_for_status(status: int) -> str:
    """The closest code for an HTTP status whose body carries none we understand."""
    for code, s in ERROR_STATUS.items():
        # A bare 502 is a proxy's; agent_protocol always comes with our JSON body.
        if s == status and code != "agent_protocol":
            return code
    return "internal" if status >= 500 else "bad_request"


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """A ``Retry-After`` header (delta seconds or an HTTP date) as seconds from now."""
    if value is None or not value.strip():
        return None
    raw = value.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(
    status: int,
    body: bytes,
    headers: Any = None,
    context: str = "",
) -> PodflareError:
    """The error for a non-2xx answer: the class from the body's ``code`` when it is our JSON error
    body (message = its ``error`` verbatim), else from the HTTP status."""
    message: Optional[str] = None
    code: Optional[str] = None
    field: Optional[str] = None
    try:
        parsed = json.loads(body.decode("utf-8", "replace")) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), str):
            message = parsed["error"]
        if isinstance(parsed.get("code"), str) and parsed["code"] in ERROR_CLASSES:
            code = parsed["code"]
        if isinstance(parsed.get("field"), str):
            field = parsed["field"]
    if code is None:
        code = code_for_status(status)
    if message is None:
        snippet = body.decode("utf-8", "replace").strip()[:200] if body else ""
        message = f"HTTP {status} from {context}" + (f": {snippet}" if snippet else "")
    cls = ERROR_CLASSES[code]
    if cls is RateLimitError:
        retry_after = None
        if headers is not None:
            retry_after = parse_retry_after(_header(headers, "retry-after"))
        return RateLimitError(message, code=code, status=status, field=field, retry_after=retry_after)
    return cls(message, code=code, status=status, field=field)


def _header(headers: Any, name: str) -> Optional[str]:
    """A header from a dict or an ``http.client.HTTPMessage`` (whose lookups ignore case)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    value = get(name)
    if value is None:
        value = get(name.title())
    return cast(Optional[str], value)
