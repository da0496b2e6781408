"""The OpenAI Agents SDK tool. The `agents` package cannot be installed here (no PyPI), so these
tests put a minimal stand-in `agents` module in sys.modules whose FunctionTool has the real one's
constructor fields (name, description, params_json_schema, on_invoke_tool, strict_json_schema) and
call on_invoke_tool(ctx, json_args) the way the SDK's runner does. The adapter is kept thin: it
builds the tool and forwards to Sandbox.run_code, which runs against a real server here."""

import asyncio
import json
import os
import sys
import types
import unittest
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict
from unittest import mock

from podflare import Sandbox
from podflare.integrations.openai_agents import PARAMS_JSON_SCHEMA, podflare_code_interpreter, podflare_process_tools
from tests.server import ModuleServer

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


@dataclass
class FunctionTool:
    """Stand-in for agents.FunctionTool (same leading fields, same invoke signature)."""
    name: str
    description: str
    params_json_schema: Dict[str, Any]
    on_invoke_tool: Callable[[Any, str], Awaitable[Any]]
    strict_json_schema: bool = True
    is_enabled: bool = True


def stand_in_agents():
    module = types.ModuleType("agents")
    module.FunctionTool = FunctionTool
    return mock.patch.dict(sys.modules, {"agents": module})


def invoke(tool, args):
    return asyncio.run(tool.on_invoke_tool(object(), json.dumps(args) if not isinstance(args, str) else args))


class OpenAIAgentsTests(unittest.TestCase):
    def test_clear_import_error_without_the_package(self):
        with mock.patch.dict(sys.modules, {"agents": None}):
            with self.assertRaises(ImportError) as cm:
                podflare_code_interpreter()
        self.assertIn("pip install openai-agents", str(cm.exception))

    def test_schema(self):
        with stand_in_agents():
            tool = podflare_code_interpreter()
        self.assertIsInstance(tool, FunctionTool)
        self.assertEqual(tool.name, "run_code")
        self.assertFalse(tool.strict_json_schema)
        schema = tool.params_json_schema
        self.assertEqual(schema, PARAMS_JSON_SCHEMA)
        self.assertEqual(schema["required"], ["code"])
        self.assertEqual(schema["properties"]["code"], {"type": "string", "description": "The code to run."})
        self.assertEqual(schema["properties"]["language"]["enum"], ["python", "bash"])
        self.assertIsNone(tool.podflare.sandbox, "no sandbox before the first call")

    def test_invoke_with_a_given_sandbox(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        with Sandbox(client=client) as sbx, stand_in_agents():
            tool = podflare_code_interpreter(sbx)
            self.assertEqual(invoke(tool, {"code": "y = 6*7\nprint(y)"}), "42")
            self.assertEqual(invoke(tool, {"code": "y + 1"}), "43")
            self.assertEqual(invoke(tool, {"code": "echo bash-ok", "language": "bash"}), "bash-ok")
            self.assertIn("ZeroDivisionError", invoke(tool, {"code": "1/0"}))
            self.assertIn("invalid arguments", invoke(tool, "{not json"))
            self.assertIn("invalid arguments", invoke(tool, {"code": "1", "language": "ruby"}))
            tool.podflare.close()  # not ours: left alone
            self.assertEqual(sbx.run_code("print(y)").stdout, "42\n")

    def test_lazy_sandbox_from_the_environment(self):
        with stand_in_agents(), mock.patch.dict(os.environ, {"PODFLARE_HOST": SERVER.url}):
            tool = podflare_code_interpreter()
            self.assertIsNone(tool.podflare.sandbox)
            self.assertEqual(invoke(tool, {"code": "z = 'lazy'\nprint(z)"}), "lazy")
            sbx = tool.podflare.sandbox
            self.assertIsNotNone(sbx)
            self.assertEqual(invoke(tool, {"code": "print(z)"}), "lazy", "the same sandbox is reused")
            self.assertIs(tool.podflare.sandbox, sbx)
            tool.podflare.close()
            self.assertTrue(sbx.closed)
            client = SERVER.client()
            self.addCleanup(client.close)
            self.assertEqual(client.json("GET", f"/v1/sandboxes/{sbx.id}")["state"], "stopped")

    def test_process_tools_share_the_code_tools_sandbox(self):
        with stand_in_agents(), mock.patch.dict(os.environ, {"PODFLARE_HOST": SERVER.url}):
            run_code = podflare_code_interpreter()
            self.addCleanup(run_code.podflare.close)
            start, read, expose, kill = podflare_process_tools(run_code)
            self.assertEqual([t.name for t in (start, read, expose, kill)],
                             ["start_process", "read_process_output", "expose_port", "kill_process"])
            self.assertEqual(read.params_json_schema["required"], ["pid"])
            started = invoke(start, {"command": "echo started; exec sleep 600"})
            pid = json.loads(started)["pid"]
            self.assertIsNotNone(run_code.podflare.sandbox, "started in the code tool's (lazily created) sandbox")
            self.assertEqual(run_code.podflare.sandbox.commands.get(pid).running, True)
            self.assertRegex(json.loads(invoke(expose, {"port": 8000}))["url"], r"^http://127\.0\.0\.1:\d+/v1/ports/")
            self.assertEqual(invoke(kill, {"pid": pid}), f"Killed process {pid}.")
            out = invoke(read, {"pid": pid, "offset": 0})
            self.assertIn("started", out)
            self.assertEqual(json.loads(out.split("\n")[0])["pid"], pid)
            self.assertIn('invalid arguments: "pid" must be an integer', invoke(kill, {"pid": "x"}))
            self.assertIn("No background process with pid 4000000", invoke(read, {"pid": 4_000_000}))


if __name__ == "__main__":
    unittest.main()
