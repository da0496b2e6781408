"""Templates through the Python SDK: ``Sandbox(template="python-datasci")``, the first line of the
hosted quick start, and a clear error for a template that does not exist.

python-datasci is built by ``podflare template build python-datasci`` (scripts/setup.sh --test runs
it; instant once built). setUpModule runs the same command, so this module works on a fresh
machine too (minutes the first time).
"""

import subprocess
import unittest

from podflare import BadRequestError, Sandbox
from tests.server import CLI, IMAGES_DIR, ModuleServer

SERVER = ModuleServer()


def setUpModule():
    subprocess.run(["node", str(CLI), "template", "build", "python-datasci", "--quiet", "--images-dir", IMAGES_DIR],
                   check=True, timeout=1800)
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class TemplateTests(unittest.TestCase):
    def test_python_datasci_has_the_scientific_stack(self):
        with Sandbox(host=SERVER.url, template="python-datasci") as sbx:
            res = sbx.run_code("import scipy, sklearn, seaborn, statsmodels, sympy, openpyxl\n"
                               "print(sympy.factor('x**2 - 1'))")
            self.assertEqual(res.exit_code, 0, res.stderr)
            self.assertEqual(res.stdout.strip(), "(x - 1)*(x + 1)")
            self.assertEqual(sbx.info().template, "python-datasci")

    def test_default_has_the_toolbox(self):
        with Sandbox(host=SERVER.url) as sbx:
            res = sbx.run_code("curl --version >/dev/null && git --version >/dev/null && python3 -m pip --version",
                               language="bash")
            self.assertEqual(res.exit_code, 0, res.stderr)

    def test_unknown_template_names_the_ones_there_are(self):
        with self.assertRaises(BadRequestError) as caught:
            Sandbox(host=SERVER.url, template="no-such-template")
        self.assertIn("no-such-template", str(caught.exception))
        self.assertIn("python-datasci", str(caught.exception))
        self.assertIn("default", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
