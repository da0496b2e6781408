"""The supervisor's file operations (upload, read, stat, list, manifest, remove, mkdir). They run in
the supervisor itself, so they work while an exec runs."""
from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass

from podflare_requests import bad_request, opt_field, req_int, resolve_path

MAX_FILE_READ = 16 * 1024 * 1024  # file_read answers at most this many bytes


@dataclass
class Upload:
    fd: int
    tmp: str
    path: str
    mode: int
    size: int = 0


class FileOps:
    """The file operations. Run by the supervisor itself, so they work while an exec runs;
    contents are streamed in chunks and never held whole in memory."""

    def __init__(self) -> None:
        self.uploads: dict[str, Upload] = {}

    def upload_begin(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        mode = opt_field(req, 'mode', int)
        parent, name = os.path.split(path)
        if not name:
            raise bad_request(f'{path} names a directory')
        os.makedirs(parent or '/', exist_ok=True)
        if mode is None:
            mode = 0o644
            try:  # replacing a file keeps its permissions (an executable script stays executable)
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    mode = stat.S_IMODE(st.st_mode)
            except OSError:
                pass
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, 'Is a directory', path)
        # The temp file lives next to the target so the final rename is atomic.
        tmp = os.path.join(parent, f'.{name[:200]}.pf-upload-{secrets.token_hex(6)}')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        handle = secrets.token_hex(8)
        self.uploads[handle] = Upload(fd, tmp, path, mode & 0o7777)
        return {'handle': handle}

    def upload_chunk(self, req: dict) -> dict:
        upload = self._upload(req)
        data = req.get('data')
        if not isinstance(data, str):
            raise bad_request('data must be a base64 string')
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request('data is not valid base64') from None
        view = memoryview(raw)
        while view:
            view = view[os.write(upload.fd, view):]
        upload.size += len(raw)
        return {}

    def upload_end(self, req: dict) -> dict:
        upload = self._upload(req)
        del self.uploads[req['handle']]
        try:
            if opt_field(req, 'abort', bool, False):
                os.close(upload.fd)
                os.unlink(upload.tmp)
                return {'size': upload.size}
            os.fchmod(upload.fd, upload.mode)
            os.close(upload.fd)
            os.rename(upload.tmp, upload.path)
        except BaseException:
            self._discard(upload)
            raise
        return {'size': upload.size}

    def file_read(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        offset = req_int(req, 'offset', 0)
        length = min(req_int(req, 'length', 1), MAX_FILE_READ)
        # O_NONBLOCK: opening a FIFO must not hang the supervisor (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, 'Is a directory', path)
            if not stat.S_ISREG(st.st_mode):
                raise bad_request(f'{path} is not a regular file')
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        # A short read means EOF; so does reaching the size (but /proc files report size 0).
        eof = len(data) < length or (st.st_size > 0 and offset + len(data) >= st.st_size)
        return {'data': base64.b64encode(data).decode('ascii'), 'eof': eof, 'size': st.st_size}

    def stat(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        return {'stat': file_stat(path, os.lstat(path))}

    def manifest(self, req: dict) -> dict:
        """Every entry of the root filesystem under `paths` (other mounts skipped: /proc, /sys,
        /dev ...) as JSON lines `[path, type, size, mode, mtime_ns, link target]` written to `out`
        (on a tmpfs, so the listing does not list itself). The VM runtime diffs two of these."""
        paths = req.get('paths') or ['/']
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith('/') for p in paths):
            raise bad_request('paths must be absolute paths')
        out = resolve_path(req.get('out'))
        root_dev = os.lstat('/').st_dev
        count = 0
        with open(out, 'w', encoding='ascii') as f:
            def emit(path: str, st: os.stat_result) -> None:
                nonlocal count
                mode = st.st_mode
                kind = 'd' if stat.S_ISDIR(mode) else 'f' if stat.S_ISREG(mode) else 'l' if stat.S_ISLNK(mode) else 'o'
                link = os.readlink(path) if kind == 'l' else None
                f.write(json.dumps([path, kind, st.st_size if kind != 'd' else 0, stat.S_IMODE(mode), st.st_mtime_ns, link]) + '\n')
                count += 1

            def walk(path: str) -> None:
                try:
                    st = os.lstat(path)
                except OSError:
                    return
                if st.st_dev != root_dev:
                    return
                emit(path, st)
                if not stat.S_ISDIR(st.st_mode):
                    return
                try:
                    names = sorted(os.listdir(path))
                except OSError:
                    return
                for name in names:
                    walk(os.path.join(path, name))

            for p in paths:
                walk(p)
        return {'entries': count}

    def list(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        entries = []
        with os.scandir(path) as it:
            for entry in it:
                try:
                    entries.append(file_stat(entry.path, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:  # removed while we were listing
                    continue
        entries.sort(key=lambda e: e['name'])
        return {'entries': entries}

    def remove(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        recursive = opt_field(req, 'recursive', bool, False)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if recursive:
                shutil.rmtree(path)
            else:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise bad_request(f'{path} is a non-empty directory (pass recursive)') from None
                    raise
        else:
            os.unlink(path)
        return {}

    def mkdir(self, req: dict) -> dict:
        path = resolve_path(req.get('path'))
        if opt_field(req, 'parents', bool, True):
            os.makedirs(path, exist_ok=True)
        else:
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
        return {}

    def open_fds(self) -> list[int]:
        return [u.fd for u in self.uploads.values()]

    def abort_all(self) -> None:
        """Uploads left open when the channel closes are removed."""
        for upload in self.uploads.values():
            self._discard(upload)
        self.uploads.clear()

    def _upload(self, req: dict) -> Upload:
        upload = self.uploads.get(req.get('handle'))  # type: ignore[arg-type]
        if upload is None:
            raise bad_request('unknown upload handle')
        return upload

    @staticmethod
    def _discard(upload: Upload) -> None:
        for action in (lambda: os.close(upload.fd), lambda: os.unlink(upload.tmp)):
            try:
                action()
            except OSError:
                pass


def file_stat(path: str, st: os.stat_result) -> dict:
    mode = st.st_mode
    kind = ('dir' if stat.S_ISDIR(mode) else 'file' if stat.S_ISREG(mode)
            else 'symlink' if stat.S_ISLNK(mode) else 'other')
    name = os.path.basename(path.rstrip('/')) or '/'
    return {'name': name, 'path': path, 'type': kind, 'size': st.st_size,
            'mode': stat.S_IMODE(mode), 'mtime': st.st_mtime}


# --------------------------------------------------------------------------------------------
# Supervisor: processes and execs
# --------------------------------------------------------------------------------------------
