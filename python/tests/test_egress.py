"""Egress allowlists from the Python SDK against a real server. Only denied names are asked for:
the proxy refuses them without resolving anything, so no traffic leaves the machine."""

import unittest

from podflare import BadRequestError, Event, Sandbox
from tests.server import ModuleServer

SERVER = ModuleServer()


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


FETCH = """import urllib.request, urllib.error
try:
    urllib.request.urlopen("http://denied.invalid/", timeout=5)
except urllib.error.HTTPError as e:
    print("http", e.code)
"""


class EgressTests(unittest.TestCase):
    def test_allowlist_denies_and_records(self):
        client = SERVER.client()
        try:
            with Sandbox(client=client, egress={"allow": ["allowed.invalid", "10.0.0.0/8"]}) as sbx:
                self.assertEqual(sbx.info().egress, {"allow": ["allowed.invalid", "10.0.0.0/8"]})
                self.assertEqual(sbx.run_code(FETCH).stdout, "http 403\n")
                events = sbx.events()
                self.assertTrue(all(isinstance(e, Event) for e in events))
                denied = [e for e in events if e.type == "egress_denied"]
                self.assertEqual([(e.data["via"], e.data["host"], e.data["port"]) for e in denied],
                                 [("http", "denied.invalid", 80)])
                self.assertEqual(sbx.events(after=denied[-1].seq), [])
        finally:
            client.close()

    def test_bad_rules(self):
        client = SERVER.client()
        try:
            with self.assertRaises(BadRequestError) as caught:
                Sandbox(client=client, egress={"allow": ["not a host!"]})
            self.assertIn("egress.allow.0", str(caught.exception))
            with self.assertRaises(TypeError):
                Sandbox(client=client, egress="yes")  # type: ignore[arg-type]
        finally:
            client.close()


if __name__ == "__main__":
    unittest.main()
