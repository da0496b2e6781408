"""Offline tests of the data types and the error table (no server needed)."""

import json
import os
import pickle
import unittest

import podflare
from podflare import (AuthenticationError, BadRequestError, Event, ExecResult, ForbiddenError, NotFoundError,
                      PayloadTooLargeError, PodflareError, PodflareTimeoutError, RateLimitError, SandboxGoneError,
                      ServerError)
from podflare._errors import ERROR_CLASSES, ERROR_STATUS, error_from_response, parse_retry_after
from podflare._models import ExecResultBuilder, SandboxInfo

PACKAGE_DIR = os.path.dirname(os.path.abspath(podflare.__file__))
REPO = os.path.dirname(os.path.dirname(PACKAGE_DIR))


def protocol_document():
    """The SDK's copy of the protocol document (generated from packages/protocol), read directly."""
    with open(os.path.join(PACKAGE_DIR, "protocol.json"), encoding="utf-8") as f:
        return json.load(f)


def ev(**kw):
    return Event.from_json(kw)


class EventAndResultTests(unittest.TestCase):
    def test_event_fields_and_extras(self):
        e = ev(type="exit", data=3, seq=4, ts=1732600000000, execution_count=7, state_lost=True)
        self.assertEqual((e.type, e.data, e.seq, e.ts), ("exit", 3, 4, 1732600000000))
        self.assertEqual(e.execution_count, 7)
        self.assertTrue(e.state_lost)
        self.assertEqual(e["execution_count"], 7)
        self.assertEqual(e["type"], "exit")
        self.assertIsNone(e.get("missing"))

    def test_builder_aggregates_a_stream(self):
        events = [
            ev(type="stdout", data="4", seq=0, ts=1),
            ev(type="stdout", data="2\n", seq=1, ts=2),
            ev(type="stderr", data="warn\n", seq=2, ts=3),
            ev(type="result", data={"text/plain": "42", "text/html": "<b>42</b>"}, is_main_result=True, seq=3, ts=4),
            ev(type="result", data={"text/plain": "<Figure>", "image/png": "iVBORw0KGgo="}, is_main_result=False, seq=4, ts=5),
            ev(type="error", data={"name": "ValueError", "value": "bad", "traceback": "Traceback…\nValueError: bad"}, seq=5, ts=6),
            ev(type="exit", data=1, execution_count=3, state_lost=False, seq=6, ts=7),
        ]
        r = ExecResultBuilder().extend(events).finish()
        self.assertIsInstance(r, ExecResult)
        self.assertEqual(r.stdout, "42\n")
        self.assertEqual(r.stderr, "warn\n")
        self.assertEqual(r.exit_code, 1)
        self.assertFalse(r.ok)
        self.assertEqual(r.execution_count, 3)
        self.assertEqual(len(r.results), 2)
        self.assertEqual(r.text, "42")
        self.assertEqual(r.main_result.html, "<b>42</b>")
        self.assertEqual(r.results[1].png_bytes()[:4], b"\x89PNG")
        self.assertEqual(r.error.name, "ValueError")
        self.assertEqual(str(r.error), "ValueError: bad")

    def test_unknown_event_types_are_ignored_by_the_aggregate(self):
        r = ExecResultBuilder().extend([ev(type="progress", data=0.5), ev(type="exit", data=0)]).finish()
        self.assertEqual(r.exit_code, 0)
        self.assertEqual(r.stdout, "")


class ProtocolDocumentTests(unittest.TestCase):
    """The SDK against the protocol document that test/protocol-spec.test.ts checks against the
    TypeScript definitions: a code added there fails here until it has its class."""

    def test_every_code_of_the_table_has_its_class_and_status(self):
        errors = protocol_document()["errors"]
        self.assertEqual(set(ERROR_CLASSES), set(errors))
        self.assertEqual(dict(ERROR_STATUS), {code: spec["status"] for code, spec in errors.items()})
        for code, spec in errors.items():
            body = json.dumps({"error": "x", "code": code}).encode()
            err = error_from_response(spec["status"], body, {}, "")
            self.assertIsInstance(err, ERROR_CLASSES[code], code)
            self.assertEqual((err.code, err.status, err.retryable), (code, spec["status"], spec["retryable"]), code)
            self.assertIn(ERROR_CLASSES[code].default_code, errors, code)

    def test_every_status_of_the_table_falls_back_to_a_class(self):
        errors = protocol_document()["errors"]
        for code, spec in errors.items():
            if code == "agent_protocol":
                continue  # by design: a bare 502 is a proxy's, so it reads as internal
            err = error_from_response(spec["status"], b"<html>not ours</html>", {}, "")
            self.assertEqual(errors[err.code]["status"], spec["status"], code)

    def test_states_exit_codes_and_ids_follow_the_document(self):
        doc = protocol_document()
        self.assertEqual(doc["exit_codes"], {"timeout": 124, "killed": 137})
        for state in doc["sandbox_states"]:
            info = SandboxInfo.from_json({"id": "sbx_" + "0" * 32, "state": state})
            self.assertEqual(info.alive, state not in doc["ended_sandbox_states"], state)
        self.assertRegex("sbx_" + "ab" * 16, doc["sandbox_id_pattern"])

    def test_the_agent_carries_the_same_document(self):
        agent_copy = os.path.join(REPO, "agent", "podflare_protocol.json")
        if not os.path.exists(agent_copy):
            self.skipTest("not in the repository (an installed SDK): no agent directory next to it")
        with open(agent_copy, encoding="utf-8") as a, open(os.path.join(PACKAGE_DIR, "protocol.json"), encoding="utf-8") as b:
            self.assertEqual(a.read(), b.read())


class ErrorTableTests(unittest.TestCase):

    def test_code_wins_over_status(self):
        err = error_from_response(400, b'{"error":"sandbox sbx_x is gone","code":"sandbox_gone"}', {}, "GET x")
        self.assertIsInstance(err, SandboxGoneError)
        self.assertEqual(err.message, "sandbox sbx_x is gone")
        self.assertEqual(str(err), "sandbox sbx_x is gone")
        self.assertEqual((err.code, err.status), ("sandbox_gone", 400))

    def test_field_is_kept(self):
        err = error_from_response(400, b'{"error":"language: invalid","code":"bad_request","field":"language"}', {}, "")
        self.assertIsInstance(err, BadRequestError)
        self.assertEqual(err.field, "language")

    def test_status_fallback_when_the_body_is_not_ours(self):
        cases = {401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError, 413: PayloadTooLargeError,
                 410: SandboxGoneError, 504: PodflareTimeoutError, 502: ServerError, 418: BadRequestError}
        for status, cls in cases.items():
            err = error_from_response(status, b"<html>proxy error</html>", {}, "GET http://h/v1/x")
            self.assertIsInstance(err, cls, status)
            self.assertIn(f"HTTP {status}", err.message)
            self.assertIn("proxy error", err.message)

    def test_rate_limit_retry_after(self):
        err = error_from_response(429, b'{"error":"slow down","code":"rate_limited"}', {"retry-after": "5"}, "")
        self.assertIsInstance(err, RateLimitError)
        self.assertIsInstance(err, podflare.RateLimitedError)
        self.assertEqual(err.retry_after, 5.0)
        self.assertTrue(err.retryable)
        self.assertEqual(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0), 10.0)
        self.assertIsNone(parse_retry_after("soon"))

    def test_builtin_bases_and_pickling(self):
        self.assertTrue(issubclass(PodflareTimeoutError, TimeoutError))
        self.assertTrue(issubclass(podflare.PodflareConnectionError, ConnectionError))
        self.assertIs(podflare.TimeoutError, PodflareTimeoutError)
        err = pickle.loads(pickle.dumps(NotFoundError("gone", code="not_found", status=404)))
        self.assertIsInstance(err, NotFoundError)
        self.assertEqual((err.message, err.code, err.status), ("gone", "not_found", 404))
        self.assertTrue(all(issubclass(c, PodflareError) for c in ERROR_CLASSES.values()))

    def test_star_import_does_not_shadow_builtins(self):
        ns = {}
        exec("from podflare import *", ns)
        self.assertNotIn("TimeoutError", ns)
        self.assertNotIn("ConnectionError", ns)
        self.assertIn("Sandbox", ns)


if __name__ == "__main__":
    unittest.main()
