"""The per-key request rate limit, from the Python SDK: a real server allowing one request per
second per key (bursts of three) answers 429 with Retry-After, raised as RateLimitError."""

import time
import unittest

from podflare import RateLimitError
from tests.server import ModuleServer

KEY = "pf-rate-key-0123456789"
SERVER = ModuleServer(api_keys=[KEY], env={"PODFLARE_RATE_LIMIT_RPS": "1", "PODFLARE_RATE_LIMIT_BURST": "3"}, pool_size=0)


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class RateLimitTests(unittest.TestCase):
    def test_rate_limit_raises_with_retry_after_and_waiting_is_enough(self):
        client = SERVER.client()
        self.addCleanup(client.close)
        with self.assertRaises(RateLimitError) as cm:
            for _ in range(10):
                client.capacity()
        err = cm.exception
        self.assertEqual((err.code, err.status), ("rate_limited", 429))
        self.assertTrue(err.retryable)
        self.assertIsNotNone(err.retry_after)
        self.assertGreaterEqual(err.retry_after, 1.0)
        self.assertIn("1 per second", err.message)
        self.assertTrue(client.health(), "healthz is not rate limited")
        time.sleep(err.retry_after)
        self.assertIn("sandboxes", client.capacity())
