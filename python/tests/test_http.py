"""The HTTP layer against a scripted stdlib server (no Podflare server needed): keep-alive reuse,
reconnecting once on a connection the server closed while it sat idle, NDJSON read as it arrives,
chunked uploads, truncated downloads, error bodies. These are the failure modes a real server
cannot be made to produce on demand."""

import hashlib
import http.server
import json
import socket
import threading
import time
import unittest
from unittest import mock

from podflare import (Client, PodflareConnectionError, PodflareTimeoutError, RateLimitError, Sandbox, ServerError)
from podflare import _client as client_module


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "fake"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status, obj, headers=None, close=False):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if close:
            # Hang up without saying "Connection: close": what a keep-alive timeout looks like.
            self.close_connection = True

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data), True
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(n), False

    def do_GET(self):
        self.server.requests.append((self.command, self.path, self.client_address[1]))
        if self.path == "/v1/ping":
            self._json(200, {"ok": True})
        elif self.path == "/v1/close-after":
            self._json(200, {"ok": True}, close=True)
        elif self.path == "/v1/trunc":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/v1/err429":
            self._json(429, {"error": "too many sandboxes", "code": "rate_limited"}, {"Retry-After": "7"})
        elif self.path == "/v1/html502":
            body = b"<html>bad gateway</html>"
            self.send_response(502)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/v1/slow":
            time.sleep(1.0)
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": f"no such endpoint: GET {self.path}", "code": "not_found"})

    def do_POST(self):
        self.server.requests.append((self.command, self.path, self.client_address[1]))
        body, _ = self._read_body()
        if self.path == "/v1/sandboxes":
            self._json(201, {"id": "sbx_" + "a" * 32, "state": "ready"})
        elif self.path.endswith("/exec"):
            code = json.loads(body)["code"]
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [{"type": "stdout", "data": "first\n"}, "sleep",
                      {"type": "stdout", "data": code + "\n"},
                      {"type": "exit", "data": 0, "execution_count": 1, "state_lost": False}]
            seq = 0
            for e in events:
                if e == "sleep":
                    time.sleep(0.6)
                    continue
                line = json.dumps({**e, "seq": seq, "ts": int(time.time() * 1000)}).encode() + b"\n"
                seq += 1
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        else:
            self._json(404, {"error": "no such endpoint", "code": "not_found"})

    def do_PUT(self):
        self.server.requests.append((self.command, self.path, self.client_address[1]))
        body, chunked = self._read_body()
        self._json(201, {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "chunked": chunked})

    def do_DELETE(self):
        self.server.requests.append((self.command, self.path, self.client_address[1]))
        self.send_response(204)
        self.end_headers()


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on purpose (timeouts)
        pass


class FakeServerTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.httpd = QuietServer(("127.0.0.1", 0), Handler)
        cls.httpd.daemon_threads = True
        cls.httpd.requests = []
        cls.thread = threading.Thread(target=cls.httpd.serve_forever, daemon=True)
        cls.thread.start()
        cls.url = f"http://127.0.0.1:{cls.httpd.server_address[1]}"

    @classmethod
    def tearDownClass(cls):
        cls.httpd.shutdown()
        cls.httpd.server_close()
        cls.thread.join(5)

    def setUp(self):
        self.client = Client(host=self.url, api_key="k")
        self.addCleanup(self.client.close)

    def test_keep_alive_reuses_one_connection(self):
        for _ in range(10):
            self.assertEqual(self.client.json("GET", "/v1/ping"), {"ok": True})
        self.assertEqual(self.client.connections_opened, 1)
        self.assertEqual(self.client.idle_connections, 1)

    def test_a_connection_closed_by_the_server_is_noticed_before_reuse(self):
        self.client.json("GET", "/v1/close-after")
        time.sleep(0.1)
        self.assertEqual(self.client.json("GET", "/v1/ping"), {"ok": True})
        self.assertEqual(self.client.connections_opened, 2)

    def test_a_stale_connection_is_retried_once_on_a_fresh_one(self):
        self.client.json("GET", "/v1/close-after")
        time.sleep(0.1)
        # Defeat the idle check so the request really goes out on the dead socket.
        with mock.patch.object(client_module, "_socket_alive", lambda sock: True):
            self.assertEqual(self.client.json("GET", "/v1/ping"), {"ok": True})
            self.client.json("GET", "/v1/close-after")
            time.sleep(0.1)
            # A POST with a JSON body is replayed too: the dead socket never delivered it.
            r = self.client.json("POST", "/v1/sandboxes", json={})
            self.assertEqual(r["state"], "ready")
        self.assertEqual(self.client.connections_opened, 3)

    def test_exec_events_are_read_as_they_arrive(self):
        sbx = Sandbox(client=self.client)
        arrivals = []
        start = time.monotonic()
        for e in sbx.run_code_stream("second"):
            arrivals.append((e.type, e.data, e.seq, time.monotonic() - start))
        self.assertEqual([a[0] for a in arrivals], ["stdout", "stdout", "exit"])
        self.assertEqual([a[2] for a in arrivals], [0, 1, 2])
        self.assertLess(arrivals[0][3], 0.4, "the first event waited for the end of the answer")
        self.assertGreater(arrivals[-1][3], 0.5)
        r = sbx.run_code("again")
        self.assertEqual(r.stdout, "first\nagain\n")
        self.assertEqual(r.execution_count, 1)
        self.assertEqual(self.client.connections_opened, 1, "the connection was not reused after the stream")
        sbx.close()

    def test_headers(self):
        self.client.json("GET", "/v1/ping")
        # the fake does not echo headers; check what would be sent instead
        self.assertEqual(self.client._base_headers["Authorization"], "Bearer k")
        self.assertTrue(self.client._base_headers["User-Agent"].startswith("podflare-python/"))

    def test_upload_from_a_generator_is_chunked(self):
        def gen():
            for i in range(50):
                yield bytes([i]) * 10000
        r = self.client.json("PUT", "/v1/up", body=gen())
        self.assertTrue(r["chunked"])
        self.assertEqual(r["size"], 500000)
        self.assertEqual(r["sha256"], hashlib.sha256(b"".join(bytes([i]) * 10000 for i in range(50))).hexdigest())

    def test_upload_of_bytes_and_seekable_files_has_a_length(self):
        import io
        import tempfile
        r = self.client.json("PUT", "/v1/up", body=b"abc")
        self.assertEqual((r["size"], r["chunked"]), (3, False))
        f = io.BytesIO(b"0123456789")
        f.seek(4)
        r = self.client.json("PUT", "/v1/up", body=f)
        self.assertEqual((r["size"], r["chunked"]), (6, False))
        with tempfile.TemporaryFile() as tf:
            tf.write(b"z" * 300000)
            tf.seek(0)
            r = self.client.json("PUT", "/v1/up", body=tf)
        self.assertEqual((r["size"], r["chunked"]), (300000, False))

    def test_truncated_download_is_an_error(self):
        from podflare._files import DownloadStream
        resp = self.client.request("GET", "/v1/trunc")
        stream = DownloadStream(resp, 256, "trunc")
        with self.assertRaises(PodflareConnectionError) as cm:
            list(stream)
        self.assertIn("500 of 1000", str(cm.exception))
        with self.assertRaises(PodflareConnectionError):
            self.client.request("GET", "/v1/trunc").read()

    def test_error_bodies(self):
        with self.assertRaises(RateLimitError) as cm:
            self.client.json("GET", "/v1/err429")
        self.assertEqual(cm.exception.retry_after, 7.0)
        self.assertEqual(cm.exception.message, "too many sandboxes")
        with self.assertRaises(ServerError) as cm2:
            self.client.json("GET", "/v1/html502")
        self.assertEqual(cm2.exception.status, 502)
        self.assertIn("bad gateway", cm2.exception.message)
        # error answers leave the connection reusable
        self.client.json("GET", "/v1/ping")
        self.assertEqual(self.client.connections_opened, 1)

    def test_client_timeout(self):
        c = Client(host=self.url, timeout=0.2)
        self.addCleanup(c.close)
        with self.assertRaises(PodflareTimeoutError) as cm:
            c.json("GET", "/v1/slow")
        self.assertIsInstance(cm.exception, TimeoutError)
        self.assertEqual(cm.exception.status, 0)

    def test_threads_share_the_pool(self):
        errors = []

        def work():
            try:
                for _ in range(20):
                    self.client.json("GET", "/v1/ping")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertLessEqual(self.client.connections_opened, 8)


class UnreachableTests(unittest.TestCase):
    def test_connection_refused(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        c = Client(host=f"http://127.0.0.1:{port}")
        with self.assertRaises(PodflareConnectionError) as cm:
            c.health()
        self.assertIn("cannot reach", str(cm.exception))
        self.assertIn("PODFLARE_HOST", str(cm.exception))
        self.assertIsInstance(cm.exception, ConnectionError)

    def test_host_parsing_and_env_defaults(self):
        with mock.patch.dict("os.environ", {}, clear=True):
            self.assertEqual(Client().host, "http://127.0.0.1:7070")
        with mock.patch.dict("os.environ", {"PODFLARE_HOST": "10.0.0.5:7171/", "PODFLARE_API_KEY": "sekret"}):
            c = Client()
            self.assertEqual(c.host, "http://10.0.0.5:7171")
            self.assertEqual(c._base_headers["Authorization"], "Bearer sekret")
        c = Client(host="https://proxy.example/podflare/")
        self.assertEqual(c.host, "https://proxy.example/podflare")
        self.assertEqual(c._url("/v1/x", {"path": "/root/a b", "recursive": True, "n": None}),
                         "/podflare/v1/x?path=/root/a%20b&recursive=1")
        self.assertEqual(Client(host="http://[::1]:7070").host, "http://[::1]:7070")


if __name__ == "__main__":
    unittest.main()
