"""The hosted product's module paths and helpers: podflare.anthropic, podflare.langchain, podflare.gemini.

What this stands in for: neither ``langchain-core`` nor ``google-genai`` can be installed here (no
PyPI, and Debian has no python3 package of either). So:
  - podflare.langchain: the test checks that importing the module works without LangChain, that
    asking for PodflareTool raises an ImportError naming ``langchain-core``, and runs
    ``run_tool_input`` (exactly what PodflareTool._run calls) for real against a sandbox. The
    BaseTool subclass itself is not exercised here.
  - podflare.gemini: the declaration's shape is checked against what ``types.FunctionDeclaration``
    accepts (OpenAPI-style upper-case types), and ``run_function_call`` runs for real with a plain
    dict call ``{"name", "args", "id"}`` and with an object carrying the same attributes as
    ``types.FunctionCall`` (the helper only reads those). ``podflare_tool`` (needs google-genai)
    is checked for its ImportError.
"""

import importlib
import sys
import unittest
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from podflare import Sandbox
from tests.server import ModuleServer

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
        return False
    except ImportError:
        return True


@dataclass
class FunctionCall:
    """Stands in for google.genai.types.FunctionCall (a pydantic model with these fields)."""
    name: str
    args: Dict[str, Any] = field(default_factory=dict)
    id: Optional[str] = None


class ModulePathTests(unittest.TestCase):
    def test_anthropic_is_importable_from_both_paths(self):
        import podflare.anthropic as top
        import podflare.integrations.anthropic as alias
        self.assertIs(top.handle_code_execution_tool_use, alias.handle_code_execution_tool_use)
        self.assertIs(top.TOOLS, alias.TOOLS)
        self.assertEqual(sorted(top.__all__), sorted(alias.__all__))
        from podflare.anthropic import CODE_EXECUTION_TOOL  # the hosted README's import
        self.assertEqual(CODE_EXECUTION_TOOL["name"], "code_execution")

    @unittest.skipUnless(_missing("langchain_core"), "langchain-core is installed: the ImportError path cannot be shown")
    def test_langchain_imports_without_langchain_and_names_the_package_when_needed(self):
        sys.modules.pop("podflare.langchain", None)
        module = importlib.import_module("podflare.langchain")
        self.assertTrue(callable(module.run_tool_input))
        with self.assertRaises(ImportError) as caught:
            from podflare.langchain import PodflareTool  # noqa: F401
        self.assertIn("langchain-core", str(caught.exception))

    @unittest.skipUnless(_missing("google.genai"), "google-genai is installed: the ImportError path cannot be shown")
    def test_gemini_tool_names_the_package_when_missing(self):
        from podflare.gemini import podflare_tool
        with self.assertRaises(ImportError) as caught:
            podflare_tool()
        self.assertIn("google-genai", str(caught.exception))

    def test_gemini_declaration_shape(self):
        from podflare.gemini import podflare_function_declaration
        decl = podflare_function_declaration()
        self.assertEqual(decl["name"], "run_code")
        self.assertTrue(decl["description"])
        self.assertEqual(decl["parameters"]["type"], "OBJECT")
        self.assertEqual(decl["parameters"]["properties"]["code"]["type"], "STRING")
        self.assertEqual(decl["parameters"]["properties"]["language"]["enum"], ["python", "bash"])
        self.assertEqual(decl["parameters"]["required"], ["code"])
        self.assertEqual(podflare_function_declaration("python")["name"], "python")


class HelpersAgainstASandboxTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sbx = Sandbox(client=SERVER.client())

    @classmethod
    def tearDownClass(cls):
        cls.sbx.close()

    def test_langchain_run_tool_input_keeps_state(self):
        from podflare.langchain import run_tool_input
        self.assertIn("set", run_tool_input(self.sbx, {"code": "lc = 41\nprint('set')"}))
        self.assertIn("42", run_tool_input(self.sbx, {"code": "print(lc + 1)"}))
        self.assertIn("7", run_tool_input(self.sbx, {"code": "echo $((3 + 4))", "language": "bash"}))
        self.assertIn("ZeroDivisionError", run_tool_input(self.sbx, {"code": "1 / 0"}))
        with self.assertRaises(ValueError):
            run_tool_input(self.sbx, {"code": "1", "language": "ruby"})

    def test_gemini_run_function_call_with_dict_and_object_calls(self):
        from podflare.gemini import run_function_call
        first = run_function_call({"name": "run_code", "args": {"code": "g = 6 * 7\nprint('ok')"}, "id": "c1"}, self.sbx)
        self.assertEqual(first["name"], "run_code")
        self.assertEqual(first["id"], "c1")
        self.assertEqual(first["response"]["exit_code"], 0)
        self.assertIn("ok", first["response"]["output"])
        second = run_function_call(FunctionCall(name="run_code", args={"code": "g"}), self.sbx)
        self.assertNotIn("id", second)
        self.assertIn("42", second["response"]["output"])
        failing = run_function_call({"name": "run_code", "args": {"code": "exit 3", "language": "bash"}}, self.sbx)
        self.assertEqual(failing["response"]["exit_code"], 3)
        bad = run_function_call({"name": "run_code", "args": {}}, self.sbx)
        self.assertIn("error", bad["response"])


if __name__ == "__main__":
    unittest.main()
