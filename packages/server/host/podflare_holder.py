"""Podflare sandbox holder: keeps one namespace sandbox alive while servers come and go.

Why it exists: a sandbox must outlive the server (a restart or an upgrade loses no interpreter
state). Modelled on containerd's shim: one small process per sandbox, started in a session of its
own (never a member of the server's process group, so a group SIGTERM/SIGINT misses it), that
the server does not hold: when the server dies the holder is re-parented to init (or the nearest
subreaper) and goes on. One per sandbox rather than one per host: a holder failing loses one
sandbox, not all of them; nothing is shared between tenants; and the relay loop is trivially
single-purpose (no scheduling between sandboxes). The price is one small Python process each.

It holds the sandbox's agent channel and relays it, line by line, to whichever server is connected
to its control socket (`--socket`, in a root-only directory of the state directory; only peers of
uid 0 are accepted, checked with SO_PEERCRED). A new connection replaces the previous one (a new
server takes over). Only whole lines are relayed in both directions: what a dying server had half
written is dropped, never glued to the next server's first request; while no server is connected
the agent's output waits in the kernel (the agent's writes block), so nothing is lost but replies
to requests of the dead server, which the next server ignores (their ids are not its own).

Two modes:
  spawn: `--spawn -- argv...` starts the sandbox (bwrap) with the agent channel at fd 3 and fds 4,
         5 and 6 passed through from the server (bwrap's info, userns block and seccomp fds),
         as uid/gid `--uid` (never root). bwrap runs `--die-with-parent`: it dies with this holder.
         The holder exits when bwrap does.
  accept: `--accept PATH` listens on PATH (a fork child's way back, chowned to `--uid`), accepts
         one connection from a process of uid `--uid` (the forked agent) and relays it. The holder
         exits when that connection ends.
  spare: `--spare [--ready-fd N]` starts ahead of need, so that a fork does not wait for a
         Python start. Its names (`--socket`, `--log`) are those of a placeholder id as long as a
         sandbox's; the first server to connect sends one line, {"id": ..., "accept": PATH,
         "watch": bool}: the holder takes that sandbox's names (renames its socket and log, and
         writes the id over the placeholder in its own command line, which is how servers
         recognise a holder), listens on PATH, answers "assigned" and goes on as in accept mode on
         that same connection (with "watch", watching that server as `--watch-server` would). A
         spare whose server goes away before using it exits.
Once listening, it writes "ready <pid>" on stdout and from then on logs to `--log`.

`--watch-server PID` (a server whose stop destroys its sandboxes, `--on-stop destroy`): PID is the
server, our parent. When it dies without a stop (kill -9, a crashed test), the holder ends the
sandbox (bwrap, and with it every process of the sandbox) instead of keeping it for a next server:
such a server's sandboxes must not outlive it. Watched with a pidfd (no pid reuse can fool it);
what the sandbox leaves on the host (its cgroups, its directory) the next server's start removes.
SIGUSR1 asks the same of a holder a destroying server adopted: it watches the server connected.
"""
import argparse
import json
import os
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

ACCEPT_TIMEOUT_S = 120
TAIL_KEEP = 4000  # bytes of bwrap's output kept for the log
LINE_CAP = 8 * 1024 * 1024  # a partial line longer than this is passed on (the server refuses it)
BUFFER_CAP = 1024 * 1024  # stop reading a side while this much waits to be written to the other
SO_PEERCRED_FORMAT = '3i'


def peer_creds(conn):
    """(pid, uid, gid) of the process that connected."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FORMAT))
    return struct.unpack(SO_PEERCRED_FORMAT, creds)


def peer_uid(conn):
    return peer_creds(conn)[1]


def listen_unix(path, mode, owner=None):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if owner is not None:
        os.chown(path, owner, owner)
    os.chmod(path, mode)
    sock.listen(8)
    sock.setblocking(False)
    return sock


class Relay:
    """Whole lines between the agent and the connected server, non-blocking both ways."""

    def __init__(self, control_path):
        self.sel = selectors.DefaultSelector()
        self.control_path = control_path
        self.control = None
        self.agent = None
        self.server = None
        self.from_agent = b''  # partial line read from the agent
        self.from_server = b''  # partial line read from the server
        self.to_server = bytearray()
        self.to_agent = bytearray()
        self.running = True
        self.agent_closed = False  # the agent's end of the channel closed (the sandbox is over)
        self.server_watch = None  # a pidfd of the server whose death ends the sandbox (--watch-server, SIGUSR1)
        self.watch_asked = False  # SIGUSR1 came: watch the server connected (or about to connect)

    def listen(self):
        # Root's only (0600 in a 0700 directory), and peers are checked again on accept.
        self.control = listen_unix(self.control_path, 0o600)
        self.sel.register(self.control, selectors.EVENT_READ, 'control')

    def set_agent(self, agent):
        agent.setblocking(False)
        self.agent = agent
        self.sel.register(agent, selectors.EVENT_READ, 'agent')

    def update(self):
        """Registers each socket for what it can do now (backpressure: no read while the other side is full)."""
        for sock, name, readable, pending in (
            (self.agent, 'agent', self.server is not None and len(self.to_server) < BUFFER_CAP, self.to_agent),
            (self.server, 'server', len(self.to_agent) < BUFFER_CAP, self.to_server),
        ):
            if sock is None:
                continue
            events = (selectors.EVENT_READ if readable else 0) | (selectors.EVENT_WRITE if pending else 0)
            key = self.sel.get_map().get(sock.fileno())
            if events == 0:
                if key is not None:
                    self.sel.unregister(sock)
            elif key is None:
                self.sel.register(sock, events, name)
            elif key.events != events:
                self.sel.modify(sock, events, name)

    def drop_server(self):
        if self.server is None:
            return
        self.sel.unregister(self.server) if self.sel.get_map().get(self.server.fileno()) else None
        self.server.close()
        self.server = None
        # Half a line to or from a dead server means nothing to the next one.
        self.from_server = b''
        self.to_server.clear()

    def on_control(self):
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        if peer_uid(conn) != 0:
            conn.close()
            return
        self.drop_server()
        conn.setblocking(False)
        self.server = conn
        log('a server connected')
        self.arm_watch()

    def watch(self, pidfd):
        """From now on, the exit of the process behind `pidfd` (a server) ends the sandbox."""
        if self.server_watch is not None:
            self.sel.unregister(self.server_watch)
            os.close(self.server_watch)
        self.server_watch = pidfd
        self.sel.register(pidfd, selectors.EVENT_READ, self.on_server_gone)

    def on_server_gone(self):
        log('its server died without stopping (it destroys its sandboxes at a stop): ending the sandbox')
        self.running = False

    def arm_watch(self):
        """After SIGUSR1 (a server that destroys its sandboxes adopted this one): watch the server
        connected, once it is a live one; a dead server's connection not yet dropped does not count,
        the adopting server's is the next one."""
        if not self.watch_asked or self.server is None:
            return
        try:
            pidfd = os.pidfd_open(peer_creds(self.server)[0])
        except (ProcessLookupError, OSError):
            return
        if select.select([pidfd], [], [], 0)[0]:  # exited already
            os.close(pidfd)
            return
        os.set_inheritable(pidfd, False)
        self.watch_asked = False
        self.watch(pidfd)
        log('watching the server that adopted it')

    @staticmethod
    def whole_lines(buf, data):
        buf += data
        cut = buf.rfind(b'\n') + 1
        if cut == 0 and len(buf) > LINE_CAP:
            cut = len(buf)
        return buf[:cut], buf[cut:]

    def on_agent(self, events):
        if events & selectors.EVENT_WRITE and self.to_agent:
            try:
                sent = self.agent.send(self.to_agent)
                del self.to_agent[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self.agent_closed = True
                self.running = False
                return
        if events & selectors.EVENT_READ:
            try:
                data = self.agent.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b''
            if not data:
                self.agent_closed = True
                self.running = False
                return
            lines, self.from_agent = self.whole_lines(self.from_agent, data)
            self.to_server += lines

    def on_server(self, events):
        if events & selectors.EVENT_WRITE and self.to_server:
            try:
                sent = self.server.send(self.to_server)
                del self.to_server[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self.drop_server()
                return
        if events & selectors.EVENT_READ:
            try:
                data = self.server.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b''
            if not data:
                self.drop_server()
                return
            lines, self.from_server = self.whole_lines(self.from_server, data)
            self.to_agent += lines

    def step(self, timeout=None):
        self.update()
        for key, events in self.sel.select(timeout):
            if key.data == 'control':
                self.on_control()
            elif key.data == 'agent' and self.agent is not None:
                self.on_agent(events)
            elif key.data == 'server' and self.server is not None:
                self.on_server(events)
            elif callable(key.data):
                key.data()
            if not self.running:
                return
        self.arm_watch()


LOG = {'fd': 2}


def log(text):
    try:
        os.write(LOG['fd'], f'holder {os.getpid()}: {text}\n'.encode())
    except OSError:
        pass


def detach_output(log_path):
    """After "ready": stdout and stderr go to the holder's log (the server that started us may die)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def watch_server(pid):
    """A pidfd of the server `pid` (our parent), readable once it has exited; None if it is gone
    already (we were re-parented: the pid may since name another process)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if os.getppid() != pid:
        os.close(fd)
        return None
    os.set_inheritable(fd, False)
    return fd


def agent_channel_at_fd3():
    """The agent's channel: one end at fd 3 for bwrap, the other ours. First thing, before any
    other fd is opened: fd 3 is free (the server passes only 0-2 and 4-6) and must stay bwrap's."""
    agent_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = agent_end.detach()
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    return ours


def run_spawn(args, relay, ours):
    relay.listen()
    # A pipe whose end only we hold: SIGCHLD wakes the loop through it.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # bwrap's (and the agent's) stdout and stderr: a pipe of which only the tail is kept, never a
    # file (code in the sandbox writes there: it must not fill the host's disk).
    child = subprocess.Popen(args.argv, pass_fds=(3, 4, 5, 6), user=args.uid, group=args.gid, extra_groups=[],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout
    os.set_blocking(output.fileno(), False)
    tail = {'data': b''}

    def on_output():
        try:
            data = os.read(output.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            relay.sel.unregister(output)
            return
        tail['data'] = (tail['data'] + data)[-TAIL_KEEP:]

    relay.sel.register(output, selectors.EVENT_READ, on_output)
    for fd in (3, 4, 5, 6):
        try:
            os.close(fd)
        except OSError:
            pass
    relay.set_agent(ours)
    exited = {'status': None}

    def on_wake():
        try:
            while os.read(wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        status = child.poll()
        if status is not None:
            exited['status'] = status
            relay.running = False

    relay.sel.register(wake_r, selectors.EVENT_READ, on_wake)
    if args.server_fd is not None:
        relay.watch(args.server_fd)
    print(f'ready {os.getpid()} {child.pid}', flush=True)
    detach_output(args.log)
    while relay.running:
        relay.step()
    # The agent closed its end, or bwrap ended: the sandbox is over. Make sure bwrap is too.
    if child.poll() is None:
        child.kill()
    status = child.wait()
    try:
        on_output()  # what it wrote last
    except (KeyError, ValueError):
        pass
    text = tail['data'].decode('utf-8', 'replace').strip()
    log(f'sandbox ended: bwrap status {status}' + (f'; its last output: {text}' if text else ''))


def drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def run_accept(args, relay):
    relay.listen()
    back = listen_unix(args.accept, 0o600, owner=args.uid)
    print(f'ready {os.getpid()} 0', flush=True)
    detach_output(args.log)
    relay_fork_child(args, relay, back)


def relay_fork_child(args, relay, back):
    """Waits for the forked agent on `back` (listening at args.accept), then relays it."""
    sel = selectors.DefaultSelector()
    sel.register(back, selectors.EVENT_READ, 'back')
    if args.server_fd is not None:
        sel.register(args.server_fd, selectors.EVENT_READ, 'server')
    # A fork child that never connects (its fork failed, its server died mid-fork): give up.
    deadline = time.monotonic() + ACCEPT_TIMEOUT_S
    while True:
        ready = sel.select(max(0.0, deadline - time.monotonic()))
        if not ready and time.monotonic() >= deadline:
            log('the forked agent never connected')
            return
        if any(key.data == 'server' for key, _ in ready):
            log('its server died without stopping (--watch-server) before the forked agent connected')
            return
        try:
            conn, _ = back.accept()
        except BlockingIOError:
            continue
        if peer_uid(conn) == args.uid:
            break
        conn.close()
    back.close()
    try:
        os.unlink(args.accept)
    except OSError:
        pass
    relay.set_agent(conn)
    sel.close()
    if args.server_fd is not None:
        relay.watch(args.server_fd)
    # Signals (SIGUSR1) wake the loop through this pipe.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    relay.sel.register(wake_r, selectors.EVENT_READ, lambda: drain(wake_r))
    while relay.running:
        relay.step()
    if relay.agent_closed:
        log('the forked agent closed its channel')


ASSIGNMENT_MAX = 4096
ID_CHARS = re.compile(r'[A-Za-z0-9_-]+')


def read_assignment(conn):
    """The server's one line (blocking); None if it went away first."""
    conn.setblocking(True)
    data = b''
    while b'\n' not in data:
        chunk = conn.recv(ASSIGNMENT_MAX)
        if not chunk or len(data) + len(chunk) > ASSIGNMENT_MAX:
            return None
        data += chunk
    line, rest = data.split(b'\n', 1)
    if rest:
        return None  # the server waits for our answer before it sends anything else
    return json.loads(line)


def rewrite_own_cmdline(old, new):
    """Writes `new` over `old` (same length) in this process's arguments, as /proc/<pid>/cmdline
    shows them: servers recognise a sandbox's holder by the socket path on its command line."""
    with open('/proc/self/stat', 'rb') as f:
        stat = f.read()
    fields = stat[stat.rindex(b')') + 2:].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
    with open('/proc/self/mem', 'r+b', buffering=0) as mem:
        mem.seek(start)
        area = mem.read(end - start)
        at = area.find(old)
        while at >= 0:
            mem.seek(start + at)
            mem.write(new)
            at = area.find(old, at + len(old))


def take_names(args, relay, sandbox_id):
    """The spare becomes `sandbox_id`'s holder: its socket, log and command line say so."""
    placeholder = os.path.basename(args.socket)[:-len('.sock')]
    if len(sandbox_id) != len(placeholder) or not ID_CHARS.fullmatch(sandbox_id):
        raise ValueError(f'an id of {len(placeholder)} letters, digits, "_" or "-" was expected')
    directory = os.path.dirname(args.socket)
    socket_path = os.path.join(directory, sandbox_id + '.sock')
    log_path = os.path.join(os.path.dirname(args.log), sandbox_id + '.log')
    os.rename(args.socket, socket_path)  # the listening socket follows its inode
    os.rename(args.log, log_path)  # our fds 1 and 2 still point at it
    args.socket, args.log = socket_path, log_path
    relay.control_path = socket_path
    rewrite_own_cmdline(placeholder.encode(), sandbox_id.encode())


def watch_peer(conn):
    """A pidfd of the server connected on `conn` (whose death is to end the sandbox); None if it
    has exited already."""
    try:
        pidfd = os.pidfd_open(peer_creds(conn)[0])
    except OSError:
        return None
    if select.select([pidfd], [], [], 0)[0]:
        os.close(pidfd)
        return None
    os.set_inheritable(pidfd, False)
    return pidfd


def run_spare(args, relay):
    relay.listen()
    print(f'ready {os.getpid()} 0', flush=True)
    if args.ready_fd is not None:  # started by the server's spawner, whose stdout is not ours
        os.write(args.ready_fd, b'1')
        os.close(args.ready_fd)
    detach_output(args.log)
    # Its server connects right after "ready" and keeps the connection until it hands a child over;
    # a server killed before it connected would otherwise leave this spare waiting for ever.
    try:
        server = os.pidfd_open(args.spare_of) if args.spare_of is not None else None
    except ProcessLookupError:
        log('the server left before using this spare holder')
        return
    while True:
        waiting = [relay.control] + ([server] if server is not None else [])
        if server is not None and server in select.select(waiting, [], [])[0]:
            log('the server left before using this spare holder')
            return
        try:
            conn, _ = relay.control.accept()
        except BlockingIOError:
            continue
        if peer_uid(conn) == 0:
            break
        conn.close()
    if server is not None:
        os.close(server)
    conn.setblocking(True)
    try:
        msg = read_assignment(conn)
    except (OSError, ValueError):
        msg = None
    if not isinstance(msg, dict):
        log('the server left before using this spare holder')
        return
    try:
        take_names(args, relay, str(msg.get('id')))
        args.accept = str(msg.get('accept'))
        if msg.get('watch'):
            args.server_fd = watch_peer(conn)
            if args.server_fd is None:
                raise ValueError('its server is gone already')
        back = listen_unix(args.accept, 0o600, owner=args.uid)
    except (OSError, ValueError) as exc:
        conn.sendall(f'refused {exc}\n'.encode())
        return
    log(f'holding sandbox {args.socket}')
    conn.sendall(b'assigned\n')
    conn.setblocking(False)
    relay.server = conn
    relay_fork_child(args, relay, back)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--socket', required=True, help='control socket the servers connect to')
    parser.add_argument('--log', required=True)
    parser.add_argument('--uid', type=int, required=True)
    parser.add_argument('--gid', type=int, required=True)
    parser.add_argument('--accept', help='fork child: where its agent connects')
    parser.add_argument('--watch-server', type=int, metavar='PID', help='end the sandbox when this server (our parent) dies')
    parser.add_argument('--spare', action='store_true', help='a fork child\'s holder started ahead of need')
    parser.add_argument('--ready-fd', type=int, help='spare: also says "ready" by writing to this fd')
    parser.add_argument('--spare-of', type=int, metavar='PID', help='spare: exit if this server dies before connecting')
    parser.add_argument('argv', nargs='*')
    args = parser.parse_args()
    # Our own session (the server starts us detached), so a signal to the server's group never
    # comes here; should one come anyway, it is not ours. Handlers, not SIG_IGN: bwrap and the
    # sandbox must start with the defaults (an ignored SIGINT would survive exec into the agent).
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: None)
    ours = None if args.accept or args.spare else agent_channel_at_fd3()
    args.server_fd = None
    if args.watch_server is not None:
        args.server_fd = watch_server(args.watch_server)
        if args.server_fd is None:
            log('its server is gone already (--watch-server): not starting')
            return 1
    relay = Relay(args.socket)
    # SIGUSR1: a server that destroys its sandboxes at a stop adopted this one (see Relay.arm_watch).
    signal.signal(signal.SIGUSR1, lambda *_: setattr(relay, 'watch_asked', True))
    try:
        if args.spare:
            run_spare(args, relay)
        elif args.accept:
            run_accept(args, relay)
        else:
            run_spawn(args, relay, ours)
    finally:
        for path in (args.socket,):  # a spare's own name, or the one it took
            try:
                os.unlink(path)
            except OSError:
                pass
        relay.drop_server()


if __name__ == '__main__':
    sys.exit(main())
