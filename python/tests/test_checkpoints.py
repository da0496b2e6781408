"""Checkpoints, restore, atomic calls and rewind (issue 23) through the Python SDK, against a real
server: what an agent framework would do after every step."""

import unittest

from podflare import NotFoundError, Sandbox
from tests.server import ModuleServer

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class CheckpointTests(unittest.TestCase):
    def setUp(self):
        self.client = SERVER.client()
        self.addCleanup(self.client.close)

    def test_rewind_brings_back_an_overwritten_dataframe(self):
        with Sandbox(client=self.client, history=3) as sbx:
            sbx.run_code("import pandas as pd\ndf = pd.DataFrame({'x': range(100)})")
            sbx.run_code("df = None  # the bad cell")
            sbx.rewind()
            self.assertEqual(sbx.run_code("print(len(df))").stdout, "100\n")

    def test_restore_brings_back_a_deleted_directory(self):
        with Sandbox(client=self.client) as sbx:
            sbx.run_code("import os\nos.makedirs('/root/work')\nopen('/root/work/a', 'w').write('kept')")
            cp = sbx.checkpoint("before rm")
            self.assertEqual(cp["name"], "before rm")
            sbx.run_code("rm -rf /root/work", "bash")
            self.assertIn("/root/work/a", sbx.diff_checkpoint(cp, paths=["/root"])["removed"])
            sbx.restore(cp)
            self.assertEqual(sbx.run_code("print(open('/root/work/a').read())").stdout, "kept\n")
            self.assertEqual([c["id"] for c in sbx.checkpoints()], [cp["id"]])
            sbx.delete_checkpoint(cp)
            with self.assertRaises(NotFoundError):
                sbx.restore(cp)

    def test_atomic_call_is_undone_on_error_and_kept_on_success(self):
        with Sandbox(client=self.client) as sbx:
            failed = sbx.run_code("half = 1\nopen('/root/half', 'w').write('x')\nprint('out')\n1/0", atomic=True)
            self.assertEqual((failed.exit_code, failed.rolled_back, failed.stdout), (1, True, "out\n"))
            self.assertEqual(failed.error.name, "ZeroDivisionError")
            ok = sbx.run_code("whole = 2\nopen('/root/whole', 'w').write('y')", atomic=True)
            self.assertEqual((ok.exit_code, ok.rolled_back), (0, False))
            probe = sbx.run_code("import os\nprint('half' in globals(), os.path.exists('/root/half'), whole, os.path.exists('/root/whole'))")
            self.assertEqual(probe.stdout, "False False 2 True\n")


if __name__ == "__main__":
    unittest.main()
