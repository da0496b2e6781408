"""Sandbox lifecycle and exec against a real Podflare server (started for this module)."""

import os
import threading
import time
import unittest
from unittest import mock

from podflare import BadRequestError, Event, ExecResult, NotFoundError, PodflareConnectionError, Sandbox, SandboxGoneError, SandboxInfo
from tests.server import ModuleServer, SandboxTestCase

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


def server_state(client, sandbox_id):
    return client.json("GET", f"/v1/sandboxes/{sandbox_id}")["state"]


class ExecTests(SandboxTestCase):
    """One sandbox shared by the exec tests (a persistent interpreter is the point)."""

    server = SERVER

    def test_id_and_info(self):
        self.assertRegex(self.sbx.id, r"^sbx_[0-9a-f]{32}$")
        info = self.sbx.info()
        self.assertIsInstance(info, SandboxInfo)
        self.assertEqual(info.id, self.sbx.id)
        self.assertIn(info.state, ("ready", "running"))
        self.assertTrue(info.alive)

    def test_print(self):
        r = self.sbx.run_code("print(6*7)")
        self.assertIsInstance(r, ExecResult)
        self.assertEqual(r.stdout, "42\n")
        self.assertEqual(r.stderr, "")
        self.assertEqual(r.exit_code, 0)
        self.assertIsNone(r.error)
        self.assertIsInstance(r.execution_count, int)

    def test_state_persists_between_calls(self):
        self.sbx.run_code("import math\nstate_x = 41")
        self.assertEqual(self.sbx.run_code("print(state_x + 1, math.pi > 3)").stdout, "42 True\n")

    def test_execution_count_increases(self):
        a = self.sbx.run_code("1").execution_count
        b = self.sbx.run_code("2").execution_count
        self.assertEqual(b, a + 1)

    def test_last_expression_is_the_main_result(self):
        r = self.sbx.run_code("6*7")
        self.assertEqual(r.text, "42")
        self.assertTrue(r.results[0].is_main_result)
        self.assertEqual(r.results[0].text, "42")

    def test_rich_results(self):
        r = self.sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        self.assertEqual(r.exit_code, 0, r.stderr)
        self.assertIsNotNone(r.main_result)
        self.assertIn("text/html", r.main_result.formats())
        self.assertIn("<table", r.main_result.html)

    def test_uncaught_exception_is_a_result_not_a_raise(self):
        r = self.sbx.run_code("1/0")
        self.assertEqual(r.exit_code, 1)
        self.assertIsNotNone(r.error)
        self.assertEqual(r.error.name, "ZeroDivisionError")
        self.assertIn("division by zero", r.error.value)
        self.assertIn("ZeroDivisionError", r.error.traceback)
        self.assertEqual(self.sbx.run_code("print('alive')").stdout, "alive\n")

    def test_system_exit_code(self):
        self.assertEqual(self.sbx.run_code("raise SystemExit(3)").exit_code, 3)
        self.assertEqual(self.sbx.run_code("print(1)").exit_code, 0)

    def test_stderr(self):
        r = self.sbx.run_code("import sys\nprint('oops', file=sys.stderr)")
        self.assertEqual(r.stderr, "oops\n")
        self.assertEqual(r.stdout, "")

    def test_child_process_output_is_captured(self):
        r = self.sbx.run_code("import subprocess\nsubprocess.run(['echo', 'from-child'])")
        self.assertIn("from-child", r.stdout)

    def test_bash(self):
        r = self.sbx.run_code("echo hi; echo err >&2; exit 4", "bash")
        self.assertEqual((r.stdout, r.stderr, r.exit_code), ("hi\n", "err\n", 4))

    def test_env_and_cwd_for_one_call(self):
        r = self.sbx.run_code("import os\nprint(os.environ.get('PF_FOO'), os.getcwd())", env={"PF_FOO": "bar"}, cwd="/tmp")
        self.assertEqual(r.stdout, "bar /tmp\n")
        r = self.sbx.run_code("echo $PF_FOO; pwd", "bash", env={"PF_FOO": "baz"}, cwd="/tmp")
        self.assertEqual(r.stdout, "baz\n/tmp\n")

    def test_timeout_ms(self):
        start = time.monotonic()
        r = self.sbx.run_code("import time\ntime.sleep(20)", timeout_ms=500)
        self.assertEqual(r.exit_code, 124)
        self.assertLess(time.monotonic() - start, 15)
        self.assertEqual(self.sbx.run_code("print('after')").stdout, "after\n")

    def test_callbacks(self):
        out, err = [], []
        r = self.sbx.run_code("import sys\nprint('o')\nprint('e', file=sys.stderr)\n6*7",
                              on_stdout=out.append, on_stderr=err.append)
        self.assertEqual("".join(out), "o\n")
        self.assertEqual("".join(err), "e\n")
        self.assertEqual(r.text, "42")

    def test_stream_events_arrive_before_the_call_ends(self):
        code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
        start = time.monotonic()
        seen = []
        for e in self.sbx.run_code_stream(code):
            self.assertIsInstance(e, Event)
            seen.append((e, time.monotonic() - start))
        types = [e.type for e, _ in seen]
        self.assertEqual(types[-1], "exit")
        self.assertEqual([e.seq for e, _ in seen], list(range(len(seen))))
        self.assertTrue(all(isinstance(e.ts, int) and e.ts > 1_600_000_000_000 for e, _ in seen))
        first = next(t for e, t in seen if e.type == "stdout" and "first" in e.data)
        end = seen[-1][1]
        self.assertGreater(end - first, 1.0, "the first line was delivered only with the end of the call")
        self.assertEqual(seen[-1][0].data, 0)

    def test_stream_aggregate(self):
        stream = self.sbx.run_code_stream("print('x')\n6*7")
        r = stream.wait()
        self.assertEqual((r.stdout, r.text, r.exit_code), ("x\n", "42", 0))

    def test_stopping_a_stream_early_interrupts_the_code(self):
        code = "import time\nprint('started', flush=True)\ntime.sleep(60)\nprint('not reached')"
        with self.sbx.run_code_stream(code) as stream:
            for e in stream:
                if e.type == "stdout":
                    break
        start = time.monotonic()
        r = self.sbx.run_code("print('next')")
        self.assertEqual(r.stdout, "next\n")
        self.assertLess(time.monotonic() - start, 15, "the abandoned exec kept the sandbox busy")

    def test_interrupt(self):
        self.assertFalse(self.sbx.interrupt())
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", self.sbx.run_code("import time\ntime.sleep(60)")))
        t.start()
        deadline = time.monotonic() + 10
        interrupted = False
        while time.monotonic() < deadline and not interrupted:
            time.sleep(0.2)
            interrupted = self.sbx.interrupt()
        t.join(20)
        self.assertTrue(interrupted)
        self.assertFalse(t.is_alive())
        r = box["r"]
        self.assertNotEqual(r.exit_code, 0)
        if r.error is not None:
            self.assertEqual(r.error.name, "KeyboardInterrupt")
        self.assertEqual(self.sbx.run_code("print('ok')").stdout, "ok\n")

    def test_calls_on_one_sandbox_queue(self):
        results = []

        def run(i):
            results.append(self.sbx.run_code(f"import time\ntime.sleep(0.2)\nprint({i})").stdout)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(sorted(results), [f"{i}\n" for i in range(4)])


class LifecycleTests(unittest.TestCase):
    def setUp(self):
        self.client = SERVER.client()
        self.addCleanup(self.client.close)

    def test_context_manager_destroys_on_exit(self):
        with Sandbox(client=self.client) as sbx:
            sid = sbx.id
            self.assertEqual(sbx.run_code("print(1)").stdout, "1\n")
        self.assertTrue(sbx.closed)
        self.assertEqual(server_state(self.client, sid), "stopped")
        with self.assertRaises(SandboxGoneError):
            sbx.run_code("print(1)")

    def test_context_manager_destroys_on_exception(self):
        class Boom(Exception):
            pass
        with self.assertRaises(Boom):
            with Sandbox(client=self.client) as sbx:
                sid = sbx.id
                raise Boom()
        self.assertEqual(server_state(self.client, sid), "stopped")
        with self.assertRaises(SandboxGoneError):
            Sandbox.connect(sid, client=self.client)

    def test_close_is_idempotent(self):
        sbx = Sandbox(client=self.client)
        sbx.close()
        sbx.close()
        self.assertTrue(sbx.closed)

    def test_create_options(self):
        with Sandbox(client=self.client, egress=False, idle_timeout_seconds=120, metadata={"owner": "tests"}) as sbx:
            info = sbx.info()
            self.assertFalse(info.egress)
            self.assertEqual(info.idle_timeout_seconds, 120)
            self.assertEqual(info.metadata, {"owner": "tests"})
            self.assertEqual(info.template, "default")

    def test_limits(self):
        with Sandbox(client=self.client, limits={"memory_mb": 256, "processes": 64}) as sbx:
            self.assertEqual(sbx.info().limits, {"cpus": 2, "memory_mb": 256, "disk_mb": 4096, "processes": 64})
            r = sbx.run_code("x = bytearray(600 * 1024 * 1024)")
            self.assertEqual(r.error.name, "MemoryLimitExceeded")
            self.assertEqual(sbx.run_code("6 * 7").text, "42")
        with self.assertRaises(BadRequestError) as caught:
            Sandbox(client=self.client, limits={"memory_mb": 10 ** 8})
        self.assertIn("memory_mb", str(caught.exception))

    def test_connect_and_list(self):
        with Sandbox(client=self.client) as sbx:
            sbx.run_code("shared_value = 'kept'")
            other = Sandbox.connect(sbx.id, host=SERVER.url, api_key=SERVER.api_key)
            self.assertEqual(other.run_code("print(shared_value)").stdout, "kept\n")
            ids = [i.id for i in Sandbox.list(client=self.client)]
            self.assertIn(sbx.id, ids)
            stopped_now = Sandbox.list(client=self.client, state="stopped")
            self.assertNotIn(sbx.id, [i.id for i in stopped_now])
            other.client.close()
        stopped = [i.id for i in Sandbox.list(client=self.client, all=True)]
        self.assertIn(sbx.id, stopped)
        with self.assertRaises(NotFoundError):
            Sandbox.connect("sbx_" + "0" * 32, client=self.client)

    def test_defaults_from_the_environment(self):
        with mock.patch.dict(os.environ, {"PODFLARE_HOST": SERVER.url}):
            with Sandbox() as sbx:
                self.assertEqual(sbx.client.host, SERVER.url)
                self.assertEqual(sbx.run_code("print('env')").stdout, "env\n")
            self.assertEqual(sbx.client.idle_connections, 0, "a private client is closed with its sandbox")

    def test_hosted_sdk_variable_names_the_server(self):
        # PODFLARE_HOSTD_URL is what the hosted SDKs read; with only it set, the SDK must talk to
        # it (it used to fall back to 127.0.0.1:7070 silently), and PODFLARE_HOST still wins.
        env = {k: v for k, v in os.environ.items() if k != "PODFLARE_HOST"}
        env["PODFLARE_HOSTD_URL"] = SERVER.url
        with mock.patch.dict(os.environ, env, clear=True):
            with Sandbox() as sbx:
                self.assertEqual(sbx.client.host, SERVER.url)
                self.assertEqual(sbx.run_code("print('hostd')").stdout, "hostd\n")
        unreachable = "http://127.0.0.1:9"  # discard port: nothing listens
        with mock.patch.dict(os.environ, {"PODFLARE_HOST": SERVER.url, "PODFLARE_HOSTD_URL": unreachable}):
            with Sandbox() as sbx:
                self.assertEqual(sbx.client.host, SERVER.url)
        env["PODFLARE_HOSTD_URL"] = unreachable
        with mock.patch.dict(os.environ, env, clear=True):
            with self.assertRaises(PodflareConnectionError) as caught:
                Sandbox()
        self.assertIn("127.0.0.1:9", str(caught.exception))
        self.assertIn("PODFLARE_HOSTD_URL", str(caught.exception))

    def test_one_client_many_sandboxes_one_pool(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        sandboxes = [Sandbox(client=client) for _ in range(3)]
        try:
            for _ in range(5):
                for i, s in enumerate(sandboxes):
                    self.assertEqual(s.run_code(f"print({i})").stdout, f"{i}\n")
            self.assertEqual(client.connections_opened, 1, "sequential calls should share one kept-alive connection")
            errors = []

            def work(s, i):
                try:
                    for _ in range(10):
                        assert s.run_code(f"print({i})").stdout == f"{i}\n"
                except Exception as e:  # pragma: no cover - reported below
                    errors.append(e)
            threads = [threading.Thread(target=work, args=(s, i)) for i, s in enumerate(sandboxes)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            self.assertEqual(errors, [])
            self.assertLessEqual(client.connections_opened, 1 + len(sandboxes))
        finally:
            for s in sandboxes:
                s.close()

    def test_capacity_and_health(self):
        self.assertTrue(self.client.health())
        cap = self.client.capacity()
        self.assertIn("sandboxes", cap)
        self.assertIn("pool", cap)


if __name__ == "__main__":
    unittest.main()
