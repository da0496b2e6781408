"""The Python SDK against a server whose default runtime is the microVM one
(``podflare serve --runtime vm``): ``Sandbox(runtime="vm")`` gets a VM clone with its own kernel."""

import os
import unittest

from podflare import Sandbox
from tests.server import ModuleServer

SERVER = ModuleServer(extra_args=["--runtime", "vm"])
setUpModule, tearDownModule = SERVER.set_up, SERVER.tear_down


class VmSandboxTest(unittest.TestCase):
    def test_vm_sandbox_has_its_own_kernel_and_keeps_state(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        with Sandbox(client=client, runtime="vm") as sbx:
            self.assertEqual(sbx.info().runtime, "vm")
            sbx.run_code("x = 20")
            self.assertEqual(sbx.run_code("x * 2 + 2").text, "42")
            release = sbx.run_code("uname -r", language="bash").stdout.strip()
            self.assertNotEqual(release, os.uname().release)
            self.assertTrue(release.endswith("-cloud-amd64"), release)

    def test_freeze_and_resume_keep_the_interpreter(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        with Sandbox(client=client, runtime="vm", persistent=True) as sbx:
            sbx.run_code("kept = 'still here'")
            sbx.freeze()
            self.assertEqual(sbx.info().state, "frozen")
            sbx.resume()
            self.assertEqual(sbx.info().state, "ready")
            self.assertEqual(sbx.run_code("kept").text, "'still here'")

    def test_the_servers_default_runtime_is_vm(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        with Sandbox(client=client) as sbx:
            self.assertEqual(sbx.info().runtime, "vm")


if __name__ == "__main__":
    unittest.main()
