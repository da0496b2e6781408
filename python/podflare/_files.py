"""File operations on a sandbox: raw bodies streamed both ways (no base64, no size cap beyond the
sandbox's disk), plus list/stat/exists/remove/mkdir. Neither side ever holds a whole file unless the
caller asks for bytes (``download``)."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple, Union, cast

from ._client import Client, Response
from ._errors import BadRequestError, NotFoundError, PodflareConnectionError
from ._models import FileInfo

__all__ = ["Files", "DownloadStream", "DEFAULT_CHUNK_SIZE"]

#: Default size of the chunks ``download_stream`` yields.
DEFAULT_CHUNK_SIZE = 1024 * 1024


class DownloadStream(Iterator[bytes]):
    """An iterator over a sandbox file's bytes, in chunks of ``chunk_size`` (the last may be
    shorter), read from the socket as the caller consumes them. Use it in a ``with`` block or call
    :meth:`close` when stopping early.

    Attributes:
        size: the file's size in bytes (its Content-Length), or None if the server did not say.
    """

    def __init__(self, response: Response, chunk_size: int, what: str) -> None:
        self._resp: Optional[Response] = response
        self._chunk_size = chunk_size
        self._what = what
        self.size = response.content_length
        self.received = 0

    def __iter__(self) -> "DownloadStream":
        return self

    def __next__(self) -> bytes:
        if self._resp is None:
            raise StopIteration
        chunk = self._resp.read_chunk(self._chunk_size)
        if chunk:
            self.received += len(chunk)
            return chunk
        self._resp.close()
        self._resp = None
        if self.size is not None and self.received < self.size:
            raise PodflareConnectionError(
                f"download of {self._what} was cut after {self.received} of {self.size} bytes "
                "(the file shrank while being read, or the connection dropped)",
                code="connection_error", status=0)
        raise StopIteration

    def read(self) -> bytes:
        """The rest of the file as bytes."""
        return b"".join(self)

    def close(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()

    def __enter__(self) -> "DownloadStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Files:
    """``sandbox.files``: the sandbox's filesystem. Relative paths are taken from ``/root``.

    Example::

        sbx.files.mkdir("/root/out")
        sbx.files.write("/root/out/a.txt", b"hello")
        [f.name for f in sbx.files.list("/root/out")]   # ['a.txt']
        sbx.files.exists("/root/out/b.txt")              # False
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    @property
    def _base(self) -> str:
        return f"/v1/sandboxes/{urllib.parse.quote(self._id, safe='')}/files"

    def upload(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Writes data to a path in the sandbox (parents created; the file appears atomically when
        complete). Both orders work, told apart by type (the hosted docs show both):
        ``upload(path, data)`` and ``upload(data, path)`` where ``data`` is bytes, a file object
        (read in blocks, never loaded whole), an iterable of bytes chunks (sent chunked as produced)
        or a ``str`` (UTF-8). With two strings the first is the path, as in the TypeScript SDK;
        keywords ``path=`` and ``data=`` always work. Anything ambiguous raises
        :class:`BadRequestError` instead of writing a file under a wrong name.

        Returns ``{"path": …, "size": …}``.
        """
        path, data = upload_arguments(args, kwargs)
        return cast(Dict[str, Any], self._client.json("PUT", self._base, query={"path": path}, body=data))

    def write(self, path: str, data: Any) -> Dict[str, Any]:
        """Same as :meth:`upload` (``files.write(path, data)``)."""
        return self.upload(path=path, data=data)

    def download(self, path: str) -> bytes:
        """The whole file as bytes (use :meth:`download_stream` or :meth:`download_to` for big ones)."""
        return self._client.request("GET", self._base, query={"path": path}).read()

    def read(self, path: str) -> bytes:
        """Same as :meth:`download`."""
        return self.download(path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.download(path).decode(encoding)

    def upload_tar(self, path: str, data: Any) -> None:
        """Unpacks an (uncompressed) tar archive into the directory ``path``, creating it. ``data``
        is bytes, a binary file object or an iterable of chunks, streamed; ``tar`` runs inside the
        sandbox."""
        self._client.json("PUT", self._base + "/tar", query={"path": path}, body=data)

    def download_tar(self, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DownloadStream:
        """The directory ``path`` as an uncompressed tar, streamed in chunks (``.read()`` for bytes)."""
        resp = self._client.request("GET", self._base + "/tar", query={"path": path})
        return DownloadStream(resp, chunk_size, f"{self._id}:{path} (tar)")

    def download_stream(self, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DownloadStream:
        """The file as an iterator of bytes chunks, streamed: memory use stays at one chunk.

        Example::

            with sbx.download_stream("/root/big.bin") as chunks, open("big.bin", "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        resp = self._client.request("GET", self._base, query={"path": path})
        return DownloadStream(resp, chunk_size, f"{self._id}:{path}")

    def download_to(self, path: str, dest: Union[str, "os.PathLike[str]", BinaryIO],
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
        """Streams the file into ``dest`` (a binary file object, or a local path that is created or
        truncated) and returns the number of bytes written."""
        with self.download_stream(path, chunk_size) as stream:
            if isinstance(dest, (str, os.PathLike)):
                with open(dest, "wb") as f:
                    for chunk in stream:
                        f.write(chunk)
            else:
                for chunk in stream:
                    dest.write(chunk)
            return stream.received

    def list(self, path: str = "/root") -> List[FileInfo]:
        """The entries of a directory."""
        answer = self._client.json("GET", self._base + "/list", query={"path": path})
        return [FileInfo.from_json(e) for e in (answer or {}).get("entries", [])]

    def stat(self, path: str) -> FileInfo:
        """A file's metadata; raises NotFoundError when it does not exist."""
        answer = self._client.json("GET", self._base + "/stat", query={"path": path})
        return FileInfo.from_json((answer or {}).get("stat", {}))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except NotFoundError:
            return False

    def remove(self, path: str, recursive: bool = False) -> None:
        """Deletes a file (or, with ``recursive=True``, a directory tree)."""
        self._client.empty("DELETE", self._base, query={"path": path, "recursive": recursive})

    def mkdir(self, path: str) -> str:
        """Creates a directory and its parents; returns its path."""
        answer = self._client.json("POST", self._base + "/mkdir", query={"path": path})
        return str((answer or {}).get("path", path))


def upload_arguments(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, Any]:
    """``(path, data)`` from an upload call in either order.

    The path is the one ``str`` among the two; with two ``str`` the first is the path. A path
    holding a newline or a NUL byte is refused: it is data passed first, not a file name anyone
    means, and writing it would silently lose the upload under a name made from its contents."""
    unknown = set(kwargs) - {"path", "data"}
    if unknown:
        raise TypeError(f"upload() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if len(args) + len(kwargs) != 2:
        raise TypeError("upload() takes a path and the data: upload(path, data)")
    if "path" in kwargs or "data" in kwargs:
        path = kwargs.get("path", args[0] if args and "data" in kwargs else None)
        data = kwargs.get("data", args[0] if args and "path" in kwargs else None)
    elif isinstance(args[0], str):
        path, data = args[0], args[1]
    elif isinstance(args[1], str):
        data, path = args[0], args[1]
    else:
        raise BadRequestError(
            f"upload(path, data) needs the sandbox path as a str; got {type(args[0]).__name__} "
            f"and {type(args[1]).__name__}", field="path")
    if not isinstance(path, str):
        raise BadRequestError(f"the upload path must be a str, got {type(path).__name__}", field="path")
    if "\n" in path or "\0" in path:
        raise BadRequestError(
            f"the upload path {path[:40]!r}… holds a newline or NUL byte: it looks like data. "
            "With two strings the first is the path: upload(path, data)", field="path")
    return path, data
