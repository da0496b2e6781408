"""Each exception class from a real failing call, against a real server started with an API key
and a cap of one live sandbox (so auth and rate limiting can be provoked)."""

import os
import time
import unittest
from unittest import mock

from podflare import (AuthenticationError, BadRequestError, Client, NotFoundError, PayloadTooLargeError,
                      PodflareConnectionError, PodflareError, PodflareTimeoutError, RateLimitError, Sandbox,
                      SandboxGoneError)
from tests.server import ModuleServer

KEY = "pf-test-key-0123456789"
SERVER = ModuleServer(api_keys=[KEY], env={"PODFLARE_MAX_SANDBOXES": "1"})


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class ErrorTests(unittest.TestCase):
    def setUp(self):
        self.client = SERVER.client()
        self.addCleanup(self.client.close)

    def sandbox(self):
        sbx = Sandbox(client=self.client)
        self.addCleanup(sbx.close)
        return sbx

    def test_missing_api_key(self):
        with mock.patch.dict(os.environ, {}, clear=True):
            c = Client(host=SERVER.url)
        self.addCleanup(c.close)
        with self.assertRaises(AuthenticationError) as cm:
            Sandbox(client=c)
        err = cm.exception
        self.assertEqual((err.code, err.status), ("unauthorized", 401))
        self.assertIn("PODFLARE_API_KEY", err.message)
        self.assertTrue(c.health(), "healthz needs no key")

    def test_wrong_api_key(self):
        with self.assertRaises(AuthenticationError) as cm:
            Sandbox(host=SERVER.url, api_key="wrong")
        self.assertEqual(cm.exception.message, "invalid API key")

    def test_api_key_from_the_environment(self):
        with mock.patch.dict(os.environ, {"PODFLARE_HOST": SERVER.url, "PODFLARE_API_KEY": KEY}):
            with Sandbox() as sbx:
                self.assertEqual(sbx.run_code("print(1)").stdout, "1\n")

    def test_not_found(self):
        missing = "sbx_" + "0" * 32
        with self.assertRaises(NotFoundError) as cm:
            Sandbox.connect(missing, client=self.client)
        self.assertEqual((cm.exception.code, cm.exception.status), ("not_found", 404))
        self.assertIn(missing, cm.exception.message)
        sbx = self.sandbox()
        with self.assertRaises(NotFoundError):
            sbx.download("/root/no-such-file")

    def test_bad_request(self):
        sbx = self.sandbox()
        with self.assertRaises(BadRequestError) as cm:
            sbx.run_code("print(1)", language="cobol")
        self.assertEqual((cm.exception.code, cm.exception.status), ("bad_request", 400))
        self.assertEqual(cm.exception.field, "language")
        with self.assertRaises(BadRequestError) as cm:
            Sandbox.connect("not-an-id", client=self.client)
        self.assertIn("not a sandbox id", cm.exception.message)
        # the failed calls left the sandbox and the connection usable
        self.assertEqual(sbx.run_code("print(2)").stdout, "2\n")

    def test_bad_create_option(self):
        with self.assertRaises(BadRequestError) as cm:
            Sandbox(client=self.client, template="no-such-template")
        self.assertEqual(cm.exception.field, "template")

    def test_payload_too_large(self):
        sbx = self.sandbox()
        with self.assertRaises(PayloadTooLargeError) as cm:
            sbx.run_code("#" * (9 * 1024 * 1024))
        self.assertEqual(cm.exception.status, 413)
        self.assertIsInstance(cm.exception, BadRequestError)
        self.assertEqual(sbx.run_code("print(3)").stdout, "3\n")

    def test_sandbox_gone(self):
        sbx = Sandbox(client=self.client)
        sbx.close()
        with self.assertRaises(SandboxGoneError) as cm:
            sbx.run_code("print(1)")
        self.assertEqual((cm.exception.code, cm.exception.status), ("sandbox_gone", 410))
        self.assertIn(sbx.id, cm.exception.message)
        with self.assertRaises(SandboxGoneError):
            sbx.upload(b"x", "/root/x")

    def test_rate_limited(self):
        first = self.sandbox()
        with self.assertRaises(RateLimitError) as cm:
            Sandbox(client=self.client)
        err = cm.exception
        self.assertEqual((err.code, err.status), ("rate_limited", 429))
        self.assertEqual(err.retry_after, 5.0)
        self.assertTrue(err.retryable)
        self.assertEqual(first.run_code("print('still here')").stdout, "still here\n")

    def test_client_timeout(self):
        sbx = self.sandbox()
        start = time.monotonic()
        with self.assertRaises(PodflareTimeoutError) as cm:
            sbx.run_code("import time\ntime.sleep(30)", request_timeout=0.5)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIsInstance(cm.exception, TimeoutError)
        self.assertEqual(cm.exception.status, 0)
        # the hang-up interrupted the code: the sandbox answers again soon
        self.assertEqual(sbx.run_code("print('back')", request_timeout=20).stdout, "back\n")

    def test_connection_error(self):
        c = Client(host="http://127.0.0.1:9")  # discard port: nothing listens
        with self.assertRaises(PodflareConnectionError) as cm:
            Sandbox(client=c)
        self.assertIn("127.0.0.1:9", str(cm.exception))

    def test_every_error_is_a_podflare_error(self):
        for cls in (AuthenticationError, BadRequestError, NotFoundError, PayloadTooLargeError,
                    PodflareConnectionError, PodflareTimeoutError, RateLimitError, SandboxGoneError):
            self.assertTrue(issubclass(cls, PodflareError))


if __name__ == "__main__":
    unittest.main()
