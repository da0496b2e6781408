"""The Anthropic handler with real-shaped tool_use blocks, against a real server.

The `anthropic` package cannot be installed here (no PyPI), so the "SDK object" form is a class
with the same attributes as `anthropic.types.ToolUseBlock` (id, input, name, type); the handler
only reads those attributes, so the real class behaves the same.
"""

import json
import time
import unittest
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict

from podflare.integrations.anthropic import (BASH_TOOL, CODE_EXECUTION_TOOL, TOOLS, code_execution_tool,
                                             handle_code_execution_tool_use)
from podflare.anthropic import PROCESS_TOOLS, handle_process_tool_use
from tests.server import ModuleServer, SandboxTestCase

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


@dataclass
class ToolUseBlock:
    """Stands in for anthropic.types.ToolUseBlock (a pydantic model with these fields)."""
    id: str
    input: Dict[str, Any]
    name: str
    type: str = "tool_use"
    cache_control: Any = field(default=None)


class AnthropicHandlerTests(SandboxTestCase):
    server = SERVER

    def test_dict_block_success(self):
        block = {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "code_execution",
                 "input": {"code": "print(6*7)"}}
        self.assertEqual(handle_code_execution_tool_use(block, self.sbx), {
            "type": "tool_result",
            "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
            "content": [{"type": "text", "text": "42"}],
            "is_error": False,
        })

    def test_object_block_success_and_state(self):
        handle_code_execution_tool_use(ToolUseBlock("toolu_1", {"code": "total = sum(range(10))"}, "code_execution"), self.sbx)
        out = handle_code_execution_tool_use(ToolUseBlock("toolu_2", {"code": "total * 2"}, "code_execution"), self.sbx)
        self.assertEqual(out["tool_use_id"], "toolu_2")
        self.assertEqual(out["content"], [{"type": "text", "text": "90"}])
        self.assertFalse(out["is_error"])

    def test_error_path(self):
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "toolu_e", "name": "code_execution",
                                              "input": {"code": "print('before')\n1/0"}}, self.sbx)
        self.assertTrue(out["is_error"])
        text = out["content"][0]["text"]
        self.assertIn("before", text)
        self.assertIn("ZeroDivisionError", text)
        self.assertEqual(text.count("ZeroDivisionError: division by zero"), 1, text)

    def test_atomic_failure_is_undone(self):
        handle_code_execution_tool_use({"type": "tool_use", "id": "t1", "name": "code_execution",
                                        "input": {"code": "kept = 1"}}, self.sbx)
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "t2", "name": "code_execution",
                                              "input": {"code": "kept = 2\n1/0"}}, self.sbx, atomic=True)
        self.assertTrue(out["is_error"])
        self.assertIn("[rolled back:", out["content"][0]["text"])
        after = handle_code_execution_tool_use({"type": "tool_use", "id": "t3", "name": "code_execution",
                                                "input": {"code": "print(kept)"}}, self.sbx)
        self.assertEqual(after["content"][0]["text"], "1")

    def test_no_output(self):
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "t", "name": "code_execution",
                                              "input": {"code": "x = 1"}}, self.sbx)
        self.assertEqual(out["content"][0]["text"], "(no output)")

    def test_bash_tool_shape(self):
        ok = handle_code_execution_tool_use(ToolUseBlock("toolu_b1", {"command": "echo hi"}, "bash"), self.sbx)
        self.assertEqual((ok["content"][0]["text"], ok["is_error"]), ("hi", False))
        bad = handle_code_execution_tool_use({"type": "tool_use", "id": "toolu_b2", "name": "bash",
                                              "input": {"command": "echo out; echo err >&2; exit 3"}}, self.sbx)
        self.assertTrue(bad["is_error"])
        self.assertEqual(bad["content"][0]["text"], "out\nerr\n[exit code 3]")
        restart = handle_code_execution_tool_use({"type": "tool_use", "id": "toolu_b3", "name": "bash",
                                                  "input": {"restart": True}}, self.sbx)
        self.assertFalse(restart["is_error"])

    def test_language_in_input(self):
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "t", "name": "code_execution",
                                              "input": {"code": "echo $((6*7))", "language": "bash"}}, self.sbx)
        self.assertEqual(out["content"][0]["text"], "42")

    def test_bad_input_is_an_error_result(self):
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "t", "name": "code_execution",
                                              "input": {"source": "print(1)"}}, self.sbx)
        self.assertTrue(out["is_error"])
        self.assertIn("code", out["content"][0]["text"])
        with self.assertRaises(ValueError):
            handle_code_execution_tool_use({"type": "text", "text": "hi"}, self.sbx)

    def test_truncation(self):
        out = handle_code_execution_tool_use({"type": "tool_use", "id": "t", "name": "code_execution",
                                              "input": {"code": "print('x' * 10000)"}}, self.sbx, max_output_chars=100)
        self.assertLess(len(out["content"][0]["text"]), 200)
        self.assertIn("characters cut", out["content"][0]["text"])

    def test_tool_definitions(self):
        self.assertEqual(CODE_EXECUTION_TOOL["name"], "code_execution")
        self.assertEqual(CODE_EXECUTION_TOOL["input_schema"]["required"], ["code"])
        self.assertEqual(CODE_EXECUTION_TOOL["input_schema"]["properties"]["code"]["type"], "string")
        self.assertEqual(BASH_TOOL, {"type": "bash_20250124", "name": "bash"})
        self.assertEqual(TOOLS, [CODE_EXECUTION_TOOL])
        self.assertEqual(code_execution_tool("python")["name"], "python")


class AnthropicProcessToolTests(SandboxTestCase):
    server = SERVER

    def use(self, name, data):
        return handle_process_tool_use({"type": "tool_use", "id": f"toolu_{name}", "name": name, "input": data}, self.sbx)

    def test_dev_server_started_read_exposed_and_killed(self):
        self.assertEqual([t["name"] for t in PROCESS_TOOLS],
                         ["start_process", "read_process_output", "expose_port", "kill_process"])
        self.sbx.run_code('import os\nos.makedirs("/root/site", exist_ok=True)\n'
                          'open("/root/site/index.html", "w").write("<p>claude page</p>")')
        started = self.use("start_process", {"command": "exec python3 -u -m http.server 8000 --bind 127.0.0.1",
                                             "cwd": "/root/site"})
        self.assertEqual(started["tool_use_id"], "toolu_start_process")
        self.assertFalse(started["is_error"])
        self.assertRegex(started["content"][0]["text"], r'^\{"pid":\d+\}$')
        pid = json.loads(started["content"][0]["text"])["pid"]

        exposed = self.use("expose_port", {"port": 8000})
        url = json.loads(exposed["content"][0]["text"])["url"]
        self.assertRegex(url, r"^http://127\.0\.0\.1:\d+/v1/ports/")
        page, deadline = None, time.monotonic() + 60
        while page is None:  # the server may still be starting
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    if resp.status == 200:
                        page = resp.read().decode()
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(page, "<p>claude page</p>")

        def head(result):
            return json.loads(result["content"][0]["text"].split("\n")[0])

        log = self.use("read_process_output", {"pid": pid})
        self.assertTrue(head(log)["running"])
        self.assertIn("Serving HTTP on 127.0.0.1 port 8000", log["content"][0]["text"])
        self.assertIn('"GET / HTTP/1.1" 200', log["content"][0]["text"])
        again = self.use("read_process_output", {"pid": pid, "offset": head(log)["nextOffset"]})
        self.assertNotIn("Serving HTTP", again["content"][0]["text"])

        self.assertEqual(self.use("kill_process", {"pid": pid})["content"][0]["text"], f"Killed process {pid}.")
        ended, deadline = self.use("read_process_output", {"pid": pid, "offset": 0}), time.monotonic() + 30
        while head(ended)["running"] and time.monotonic() < deadline:
            time.sleep(0.2)
            ended = self.use("read_process_output", {"pid": pid, "offset": 0})
        self.assertEqual((head(ended)["running"], head(ended)["exitCode"]), (False, 137))
        self.assertIn("Serving HTTP", ended["content"][0]["text"])
        self.assertFalse(self.sbx.commands.get(pid).running)

        bad = self.use("kill_process", {"pid": "not a pid"})
        self.assertTrue(bad["is_error"])
        self.assertIn('"pid" must be an integer', bad["content"][0]["text"])
        unknown = self.use("read_process_output", {"pid": 4_000_000})
        self.assertTrue(unknown["is_error"])
        self.assertIn("No background process with pid 4000000", unknown["content"][0]["text"])


if __name__ == "__main__":
    unittest.main()
