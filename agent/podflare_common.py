"""What the agent's two processes share: the channel's framing (JSON lines), the hello each
supervisor sends, the protocol's constants, and where the agent lives. Standard library only.

The protocol's constants (its version, the named exit codes) come from podflare_protocol.json, which
is generated from packages/protocol (`npm run gen:protocol`) and travels in the image's agent layer
next to this file; a test fails when the copy drifts from the TypeScript definitions."""
from __future__ import annotations

import json
import os
import socket
from typing import Any

AGENT_DIR = os.path.dirname(os.path.abspath(__file__))
PROTOCOL_FILE = os.path.join(AGENT_DIR, 'podflare_protocol.json')


def load_protocol(path: str = PROTOCOL_FILE) -> dict[str, Any]:
    """The protocol document (packages/protocol/src/spec.ts)."""
    with open(path, encoding='utf-8') as f:
        return json.load(f)


_PROTOCOL = load_protocol()
#: Sent in the hello; the server refuses an agent whose version is not its own.
PROTOCOL_VERSION: int = _PROTOCOL['agent_protocol_version']
#: The exit code of an exec that hit its timeout.
TIMEOUT_EXIT_CODE: int = _PROTOCOL['exit_codes']['timeout']
#: Relative paths are taken from here, and it is the default working directory.
HOME = os.environ.get('PODFLARE_AGENT_HOME', '/root')
CHANNEL_READ = 1024 * 1024
MAX_LINE = 64 * 1024 * 1024       # longer request lines are answered with bad_request and dropped


def encode_line(obj: Any) -> bytes:
    """One JSON line. Lone surrogates (undecodable file names) cannot be UTF-8 encoded; such
    messages fall back to ASCII escapes, which JSON.parse turns back into the same string."""
    text = json.dumps(obj, ensure_ascii=False, separators=(',', ':'))
    try:
        return text.encode('utf-8') + b'\n'
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(',', ':')).encode('ascii') + b'\n'


class LineBuffer:
    """Splits a byte stream into lines. A line longer than `limit` is dropped and reported once
    as None, so one bad line cannot exhaust memory."""

    def __init__(self, limit: int = MAX_LINE):
        self.buf = bytearray()
        self.scan = 0              # bytes before this offset hold no newline
        self.limit = limit
        self.discarding = False    # inside an over-long line: drop until its newline

    def feed(self, data: bytes) -> list[bytes | None]:
        buf = self.buf
        buf += data
        lines: list[bytes | None] = []
        start = 0
        while (end := buf.find(b'\n', max(start, self.scan))) >= 0:
            if self.discarding:
                self.discarding = False
            else:
                lines.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        self.scan = len(buf)
        if len(buf) > self.limit:
            if not self.discarding:
                lines.append(None)
            self.discarding = True
            buf.clear()
            self.scan = 0
        return lines


def hello_message() -> dict:
    return {'type': 'hello', 'version': PROTOCOL_VERSION, 'pid': os.getpid(), 'hostname': socket.gethostname()}
