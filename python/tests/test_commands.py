"""sandbox.commands against a real server: foreground and background commands, reconnect by pid,
stdin, kill, and a fork child that gets none of its parent's processes."""

import time
import unittest

from podflare import BadRequestError, CommandHandle, NotFoundError, Sandbox
from tests.server import ModuleServer, SandboxTestCase

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class CommandTests(SandboxTestCase):
    server = SERVER
    client_timeout = 120

    def test_foreground(self):
        r = self.sbx.commands.run('echo "$PWD $X"; echo e >&2; exit 4', cwd="/tmp", envs={"X": "y"})
        self.assertEqual((r.stdout, r.stderr, r.exit_code), ("/tmp y\n", "e\n", 4))

    def test_background_reconnect_stdin_kill(self):
        seen = []
        handle = self.sbx.commands.run('while read line; do echo "got $line"; done', background=True)
        self.assertIsInstance(handle, CommandHandle)
        # The interpreter is free while it runs.
        self.assertEqual(self.sbx.run_code("print(6*7)").stdout, "42\n")
        handle.send_stdin("a\n")
        self.sbx.commands.send_stdin(handle.pid, "b\n", eof=True)
        again = self.sbx.commands.connect(handle.pid)
        result = again.wait(on_stdout=seen.append)
        self.assertEqual(result.stdout, "got a\ngot b\n")
        self.assertEqual("".join(seen), result.stdout)
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(handle.wait().stdout, result.stdout)

        sleeper = self.sbx.commands.run("sleep 300", background=True)
        self.assertTrue(any(p.pid == sleeper.pid and p.running for p in self.sbx.commands.list()))
        self.assertTrue(sleeper.kill())
        self.assertEqual(sleeper.wait().exit_code, 137)
        self.assertFalse(self.sbx.commands.get(sleeper.pid).running)

    def test_fork_child_has_no_processes(self):
        p = self.sbx.commands.run("sleep 300", background=True)
        child = self.sbx.fork(1)[0]
        try:
            self.assertEqual(child.commands.list(), [])
        finally:
            child.close()
        self.assertTrue(self.sbx.commands.get(p.pid).running)
        p.kill()

    def test_get_host_reaches_a_port_without_the_key(self):
        import urllib.request
        self.sbx.files.upload("/root/www/index.html", b"hi from a port\n")
        self.sbx.commands.run("exec python3 -m http.server 8300 --bind 127.0.0.1", background=True, cwd="/root/www")
        host = self.sbx.get_host(8300)
        self.assertIn("/v1/ports/", host)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/", timeout=10) as res:
                    self.assertEqual(res.read(), b"hi from a port\n")
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def test_errors(self):
        with self.assertRaises(NotFoundError):
            self.sbx.commands.get(999999)
        with self.assertRaises(BadRequestError):
            self.sbx.commands.run("")


if __name__ == "__main__":
    unittest.main()


class PtyTests(SandboxTestCase):
    server = SERVER
    client_timeout = 120

    def test_prompt_echo_resize(self):
        import re
        plain = lambda t: re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", t)
        term = self.sbx.pty.create(cols=90, rows=20)
        term.wait_for(lambda out: plain(out).endswith("# "))
        term.send_input("echo hi\r")
        term.wait_for(lambda out: re.search(r"echo hi\r\n\r?hi\r\n", plain(out)) is not None)
        term.resize(111, 33)
        time.sleep(0.2)
        term.send_input("tput cols\r")
        term.wait_for(lambda out: re.search(r"[\r\n]111\r\n", plain(out)) is not None)
        term.send_input("exit 2\r")
        self.assertEqual(term.wait(30), 2)


class TarTests(SandboxTestCase):
    server = SERVER
    client_timeout = 120

    def test_round_trip(self):
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = b"hello tar\n"
            info = tarfile.TarInfo("dir/hello.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        self.sbx.files.upload_tar("/root/tarred", buf.getvalue())
        self.assertEqual(self.sbx.files.download("/root/tarred/dir/hello.txt"), b"hello tar\n")
        back = self.sbx.files.download_tar("/root/tarred").read()
        with tarfile.open(fileobj=io.BytesIO(back)) as tar:
            self.assertEqual(tar.extractfile("./dir/hello.txt").read(), b"hello tar\n")


class JavaScriptTests(unittest.TestCase):
    def test_state_persists(self):
        with Sandbox(client=SERVER.client(timeout=120)) as sbx:
            self.assertEqual(sbx.run_code("let x = 41", language="javascript").exit_code, 0)
            self.assertEqual(sbx.run_code("x + 1", language="javascript").stdout, "42\n")
