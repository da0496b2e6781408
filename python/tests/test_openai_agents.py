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
from podflare.integrations.openai_agents import PARAMS_JSON_SCHEMA, podflare_code_interpreter
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


if __name__ == "__main__":
    unittest.main()
