"""Podflare process spawner: starts the server's helper processes (slirp4netns) on its behalf.

Why a process of its own: Node starts a child with fork() + exec(), and fork() copies the page
tables of the whole server (100+ MB), which blocks the server's event loop for milliseconds per
child; a fork(5) with egress would stall five times on the critical path. This process is small and
uses posix_spawn (vfork-style: nothing is copied), so a start costs a fraction of a millisecond.

Protocol: JSON lines. Requests on stdin:
  {"id": n, "op": "spawn", "argv": [...], "ready_fd": 3?, "exit_fd": 4?, "stream_stderr": false?}
      → {"id": n, "ok": true, "pid": p}
      `ready_fd`: the child gets the write end of a pipe there; its first byte is reported as
      {"ev": "ready", "pid": p}. `exit_fd`: the child gets the read end of a pipe whose write end
      only this process holds (slirp4netns exits when it closes: when we die, so do they).
      `detach`: the child gets a session of its own and is left running when this process ends
      (a sandbox's slirp4netns, which outlives the server: see podflare_holder.py).
      `stream_stderr`: what the child writes on stderr is passed on as it comes,
      {"ev": "stderr", "pid": p, "data": "..."} (else only its tail, with the exit).
  {"id": n, "op": "kill", "pid": p} → {"id": n, "ok": true}   (SIGKILL, if still ours)
  {"id": n, "op": "memfd", "name": s, "size": b} → {"id": n, "ok": true, "fd": f, "pid": spawner's pid}
      A memfd of `size` bytes (sealable, not yet sealed) this process holds as fd `f`, known by its
      `name` (unique; never by fd number: a restarted spawner may reuse the number for another
      VM's memory): shared guest RAM. The server (root) fills it through /proc/<pid>/fd/<f>; a
      spawn passes it to a child with "fds": [[child_fd, name], ...].
  {"id": n, "op": "seal", "name": s} → {"id": n, "ok": true}
      Seals it for good (no write, no resize, no further seal change): refused (EBUSY) while
      anything maps it shared and writable. From then on nobody, root included, changes its bytes;
      copy-on-write private mappings still work.
  {"id": n, "op": "listen", "name": s, "path": p} → {"id": n, "ok": true}
      A unix socket listening at `path` (made 0600, in a directory the server keeps root's alone),
      held like a memfd under `name` and passed to children the same way: a VM's QEMU gets its
      agent and QMP sockets so, bound where only root can reach them (QEMU, unprivileged, could
      not bind there itself), and a later server reconnects to them by path.
  {"id": n, "op": "close", "name": s} → {"id": n, "ok": true}   (the processes it was passed to keep theirs)
Events on stdout: {"ev": "exit", "pid": p, "code": c|null, "signal": s|null, "stderr": "..."}.
When stdin closes (the server is gone) every child is killed, then this process exits; the
kernel kills it (PR_SET_PDEATHSIG) if the server dies first.
"""
import ctypes
import fcntl
import json
import os
import selectors
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
STDERR_KEEP = 2000


def read_some(fd, n):
    """What a watched fd has: b"" at its end (or when it failed), None if nothing yet."""
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Child:
    def __init__(self, pid, ready_r, exit_w, err_r, stream_stderr, detach=False):
        self.pid = pid
        self.detach = detach
        self.ready_r = ready_r
        self.exit_w = exit_w
        self.err_r = err_r
        self.stream_stderr = stream_stderr
        self.stderr = b""


class Spawner:
    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.children = {}  # pid -> Child
        self.memfds = {}  # name -> fd: shared guest RAM this process holds (op memfd)
        self.out = sys.stdout
        self.inbuf = b""
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # SIGINT/SIGTERM to the server's whole process group are for the server, which stops its
        # sandboxes (through this spawner's children) before it goes: this process ends when its
        # stdin closes or the server dies. A handler, not SIG_IGN: children start with the default.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.on_wake)
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, self.on_stdin)
        self.running = True

    def send(self, msg):
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def on_stdin(self):
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.running = False
            return
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                self.handle(line)

    def handle(self, line):
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            if req["op"] == "spawn":
                reply = {"pid": self.spawn(req["argv"], req.get("ready_fd"), req.get("exit_fd"), bool(req.get("stream_stderr")),
                                           bool(req.get("batch")), req.get("fds") or [], bool(req.get("detach")))}
            elif req["op"] == "memfd":
                reply = {"fd": self.memfd(str(req["name"]), int(req["size"])), "pid": os.getpid()}
            elif req["op"] == "seal":
                fcntl.fcntl(self.own_memfd(req["name"]), F_ADD_SEALS, ALL_SEALS)
                reply = {}
            elif req["op"] == "listen":
                self.listen(str(req["name"]), str(req["path"]))
                reply = {}
            elif req["op"] == "close":
                self.own_memfd(req["name"])
                os.close(self.memfds.pop(str(req["name"])))
                reply = {}
            elif req["op"] == "kill":
                child = self.children.get(int(req["pid"]))
                if child is not None:  # not reaped yet: the pid is still this child's
                    os.kill(child.pid, signal.SIGKILL)
                reply = {}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            self.send({"id": rid, "ok": True, **reply})
        except Exception as exc:  # every failure goes back to the server, never kills the spawner
            self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def memfd(self, name, size):
        if name in self.memfds:
            raise ValueError(f"a memfd named {name!r} exists")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
        except Exception:
            os.close(fd)
            raise
        self.memfds[name] = fd
        return fd

    def listen(self, name, path):
        if name in self.memfds:
            raise ValueError(f"an fd named {name!r} exists")
        if not os.path.isabs(path):
            raise ValueError("a listening socket needs an absolute path")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(path)  # a dead VM's, in the server's own directory
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(8)
        except Exception:
            sock.close()
            raise
        self.memfds[name] = sock.detach()

    def own_memfd(self, name):
        fd = self.memfds.get(str(name))
        if fd is None:
            raise ValueError(f"no memfd named {name!r} in this spawner")
        return fd

    def spawn(self, argv, ready_fd, exit_fd, stream_stderr=False, batch=False, fds=(), detach=False):
        # The memfds it is given, at the fds it names (dup2 clears close-on-exec on the copy): last,
        # so that no fd opened below (which may have such a number here) is overwritten first.
        passed = [(os.POSIX_SPAWN_DUP2, self.own_memfd(src), int(at)) for at, src in fds]
        if any(at <= 2 for _, _, at in passed):
            raise ValueError("a memfd cannot replace stdin, stdout or stderr")
        actions = []
        opened = []
        ready_r = exit_w = None
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(null)
            err_r, err_w = os.pipe()
            opened.append(err_w)
            actions += [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
            if ready_fd is not None:
                ready_r, ready_w = os.pipe()
                opened.append(ready_w)
                actions.append((os.POSIX_SPAWN_DUP2, ready_w, int(ready_fd)))
            if exit_fd is not None:
                exit_r, exit_w = os.pipe()
                opened.append(exit_r)
                actions.append((os.POSIX_SPAWN_DUP2, exit_r, int(exit_fd)))
            actions += passed
            if batch:
                # Inherited by the child. posix_spawn's own scheduler attribute takes only
                # SCHED_OTHER, FIFO and RR; the spawner is single-threaded, so the switch is safe.
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            try:
                pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setsid=detach)
            finally:
                if batch:
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except Exception:
            for fd in (ready_r, exit_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        child = Child(pid, ready_r, exit_w, err_r, stream_stderr, detach)
        self.children[pid] = child
        os.set_blocking(err_r, False)
        self.sel.register(err_r, selectors.EVENT_READ, lambda c=child: self.on_stderr(c))
        if ready_r is not None:
            self.sel.register(ready_r, selectors.EVENT_READ, lambda c=child: self.on_ready(c))
        return pid

    def on_ready(self, child):
        if child.ready_r is None:
            return
        data = read_some(child.ready_r, 64)
        self.unwatch(child.ready_r)
        child.ready_r = None
        if data:
            self.send({"ev": "ready", "pid": child.pid})

    def on_stderr(self, child):
        if child.err_r is None:
            return
        data = read_some(child.err_r, 65536)
        if data is None:
            return
        if data:
            child.stderr = (child.stderr + data)[-STDERR_KEEP:]
            if child.stream_stderr:
                self.send({"ev": "stderr", "pid": child.pid, "data": data.decode("utf-8", "replace")})
            return
        self.unwatch(child.err_r)
        child.err_r = None

    def unwatch(self, fd):
        self.sel.unregister(fd)
        os.close(fd)

    def on_wake(self):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.reap()

    def reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.err_r is not None:  # what it wrote last
                try:
                    child.stderr = (child.stderr + os.read(child.err_r, 65536))[-STDERR_KEEP:]
                except OSError:
                    pass
            for fd in (child.ready_r, child.err_r):
                if fd is not None:
                    self.unwatch(fd)
            if child.exit_w is not None:
                os.close(child.exit_w)
            self.send({"ev": "exit", "pid": pid,
                       "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                       "signal": signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None,
                       "stderr": child.stderr.decode("utf-8", "replace")})

    def run(self):
        while self.running:
            events = self.sel.select()
            fd_map = self.sel.get_map()
            for key, _ in events:
                # A handler earlier in this batch may have closed (and even reused) this fd.
                if fd_map.get(key.fd) is key:
                    key.data()
        for pid, child in list(self.children.items()):
            if child.detach:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def main():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the server died before the line above took effect
        return
    Spawner().run()


if __name__ == "__main__":
    main()
