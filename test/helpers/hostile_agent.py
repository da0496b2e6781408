"""A hostile agent, started by user code inside a namespace sandbox (test/hostile-agent.test.ts).

It takes the real agent's channel over, as any code in a sandbox can: the supervisor (PID 1 of the
sandbox) and user code run as the same user in the same user namespace, so `pidfd_getfd` copies the
supervisor's channel socket (its fd 3) into this process, and `PTRACE_SEIZE` + `PTRACE_INTERRUPT`
stop the supervisor so that this process alone reads the server's requests and answers them. The
supervisor stays stopped as long as this process (its tracer) lives. In a microVM the same works
from the guest's root: the channel is then a virtio-serial port (a character device).

Usage: python3 hostile_agent.py MODE. Modes (what it answers with, beyond the common ops):
  flood       exec: stdout events of 1 MiB, endlessly (never an exit)
  sizes       stat: a file; file_read: `size` negative, non-numeric, fractional or huge by path
  fork        fork: the pid of a sibling sandbox (another fork child of this sandbox's PID 1)
  manifest    manifest + file_read of its listing: valid listing lines, endlessly
  badmanifest manifest + file_read of its listing: text that is not JSON
  merge       stat/list/file_read: a directory whose entry names a path outside it (merge_into)
  close       shuts the channel down at once
Every mode answers `stat` of /hostile-ready (the test's sign that the takeover is done).
"""
import base64
import ctypes
import json
import os
import socket
import stat
import sys
import time

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
MIB = 1024 * 1024


class PortChannel:
    """A microVM's channel: a virtio-serial port (a character device), read and written like a socket."""

    def __init__(self, fd: int):
        self.fd = fd

    def recv(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def shutdown(self, _how: int) -> None:
        raise SystemExit('a port cannot be shut down')


def channel_fd_of_init() -> int:
    """The supervisor's channel: fd 3 in a sandbox it was started in; in a fork child, the socket
    it connected to the server with (its only socket)."""
    links = {}
    for name in os.listdir('/proc/1/fd'):
        try:
            links[int(name)] = os.readlink(f'/proc/1/fd/{name}')
        except OSError:
            continue
    if 3 in links and (links[3].startswith('socket:') or links[3].startswith('/dev/')):
        return 3
    sockets = sorted(fd for fd, link in links.items() if link.startswith('socket:'))
    if not sockets:
        raise SystemExit(f'no channel among {links}')
    return sockets[0]


def take_channel() -> 'socket.socket | PortChannel':
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    pidfd = libc.syscall(SYS_PIDFD_OPEN, 1, 0)
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), 'pidfd_open(1)')
    # Stop the supervisor first, then copy its channel: a request it read in between would never
    # be answered (the test's readiness poll bounds each try for what still slips through).
    for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
        if libc.ptrace(request, 1, None, None) < 0:
            raise OSError(ctypes.get_errno(), f'ptrace({request:#x}, 1)')
    target = channel_fd_of_init()
    fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f'pidfd_getfd(1, {target})')
    if stat.S_ISCHR(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
        return PortChannel(fd)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def sibling_fork_child() -> int:
    """A fork child of this sandbox (PID 1 of a pid namespace nested in ours), as our pid."""
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/status') as f:
                nspid = next(line for line in f if line.startswith('NSpid:')).split()[1:]
        except (OSError, StopIteration):
            continue
        if len(nspid) == 2 and nspid[1] == '1':
            return int(nspid[0])
    raise SystemExit('no fork child found')


def main() -> None:
    mode = sys.argv[1]
    time.sleep(0.5)  # the exec that started us is answered by the real agent first
    sock = take_channel()
    if mode == 'close':
        sock.shutdown(socket.SHUT_RDWR)
        time.sleep(3600)
    send = lambda obj: sock.sendall(json.dumps(obj).encode() + b'\n')  # noqa: E731
    file_stat = {'name': 'f', 'path': '/f', 'type': 'file', 'size': 5, 'mode': 0o644, 'mtime': 0}
    sizes = {'/neg': -5, '/abc': 'abc', '/frac': 1.5, '/huge': 2 ** 60}
    listed = 0

    def listing() -> str:
        """The next ~1 MiB of an endless listing, every path a new one."""
        nonlocal listed
        lines = []
        for _ in range(MIB // 100):
            listed += 1
            lines.append(json.dumps([f'/data/{listed:012d}' + '/x' * 20, 'f', 1, 0o644, 1, None]))
        return base64.b64encode(('\n'.join(lines) + '\n').encode()).decode()
    buf = b''
    while True:
        data = sock.recv(MIB)
        if not data:
            return
        buf += data
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            req = json.loads(line)
            rid, op = req['id'], req['op']
            if op == 'stat' and req['path'] == '/hostile-ready':
                send({'id': rid, 'ok': True, 'stat': file_stat})
            elif mode == 'flood' and op == 'exec':
                chunk = 'x' * MIB
                while True:
                    send({'id': rid, 'type': 'stdout', 'data': chunk})
            elif mode == 'sizes' and op == 'stat':
                send({'id': rid, 'ok': True, 'stat': file_stat})
            elif mode == 'sizes' and op == 'file_read':
                send({'id': rid, 'ok': True, 'data': 'aGVsbG8=', 'eof': True, 'size': sizes.get(req['path'], 5)})
            elif mode == 'merge' and op == 'stat':
                kind = 'dir' if req['path'] == '/root/d' else 'file'
                send({'id': rid, 'ok': True, 'stat': {**file_stat, 'path': req['path'], 'type': kind}})
            elif mode == 'merge' and op == 'list':
                send({'id': rid, 'ok': True, 'entries': [{**file_stat, 'name': 'x', 'path': '/root/precious'}]})
            elif mode == 'merge' and op == 'file_read':
                send({'id': rid, 'ok': True, 'data': base64.b64encode(b'pwned').decode(), 'eof': True, 'size': 5})
            elif mode == 'fork' and op == 'fork':
                send({'id': rid, 'ok': True, 'pids': [sibling_fork_child()]})
            elif mode in ('manifest', 'badmanifest') and op == 'manifest':
                send({'id': rid, 'ok': True, 'entries': 1})
            elif mode == 'manifest' and op == 'file_read':
                send({'id': rid, 'ok': True, 'data': listing(), 'eof': False, 'size': 0})
            elif mode == 'badmanifest' and op == 'file_read':
                send({'id': rid, 'ok': True, 'data': base64.b64encode(b'this is not json\n').decode(), 'eof': True, 'size': 17})
            elif op in ('remove', 'ping', 'interrupt'):
                send({'id': rid, 'ok': True, 'pid': 1, 'hostname': 'hostile', 'interrupted': False})
            else:
                send({'id': rid, 'ok': False, 'error': {'code': 'bad_request', 'message': f'hostile agent: no {op}'}})


if __name__ == '__main__':
    main()
