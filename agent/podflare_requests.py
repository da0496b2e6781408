"""Request handling helpers shared by the supervisor's modules: the error answer type, checks of
request fields, and the mapping of exceptions to the protocol's error codes."""
from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

from podflare_common import HOME


class AgentError(Exception):
    """An error answer: `code` is one of the stable codes of packages/protocol/src/errors.ts."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def bad_request(message: str) -> AgentError:
    return AgentError('bad_request', message)


def resolve_path(value: Any) -> str:
    """A request path: non-empty text without NUL; relative paths are joined to HOME."""
    if not isinstance(value, str) or not value:
        raise bad_request('path must be a non-empty string')
    if '\0' in value:
        raise bad_request('path must not contain NUL')
    return value if os.path.isabs(value) else os.path.join(HOME, value)


def check_code(code: str, language: str) -> None:
    """Code the agent can run: bash takes its code as an argv string (no NUL possible; Python
    answers NUL in source with its own SyntaxError), and both need it encodable as UTF-8 (JSON
    can carry lone surrogates, which cannot be)."""
    if language == 'bash' and '\0' in code:
        raise bad_request('bash code must not contain NUL bytes')
    try:
        code.encode('utf-8')
    except UnicodeEncodeError as exc:
        raise bad_request(f'code is not valid Unicode text (a lone surrogate at character {exc.start})') from None


def opt_field(req: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """An optional request field of the given type (bools are not ints here)."""
    value = req.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f'{name} has the wrong type')
    return value


def req_int(req: dict, name: str, minimum: int) -> int:
    value = opt_field(req, name, int)
    if value is None or value < minimum:
        raise bad_request(f'{name} must be an integer >= {minimum}')
    return value


def error_info(exc: BaseException) -> tuple[str, str]:
    """Maps an exception from a request handler to (code, message)."""
    if isinstance(exc, AgentError):
        return exc.code, exc.message
    if isinstance(exc, FileNotFoundError):
        return 'not_found', str(exc)
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return 'bad_request', str(exc)
    if isinstance(exc, PermissionError):
        return 'forbidden', str(exc)
    if isinstance(exc, FileExistsError):
        return 'conflict', str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.ENAMETOOLONG,
                                                  errno.ELOOP, errno.EINVAL):
        return 'bad_request', str(exc)
    # What the caller asked for cannot be done in this sandbox: the caller's problem, not ours.
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EPERM):
        return 'forbidden', str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.ETXTBSY):
        return 'conflict', str(exc)
    # The sandbox's disk limit (EDQUOT) or the server's disk volume (ENOSPC) is full: 507.
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return 'insufficient_storage', str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return 'payload_too_large', str(exc)
    return 'internal', f'{type(exc).__name__}: {exc}'


def exit_code_of(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def log(message: str) -> None:
    """Diagnostics of the agent itself go to its own stderr (the server's log), never the channel."""
    try:
        sys.stderr.write(f'podflare-agent: {message}\n')
        sys.stderr.flush()
    except Exception:
        pass


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f'signal {sig}'
