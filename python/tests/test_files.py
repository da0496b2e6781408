"""Files against a real server: upload/download in every form, the helpers, and a 100 MB round trip
that never holds the file in the client's memory."""

import hashlib
import io
import os
import tempfile
import tracemalloc
import unittest

from podflare import BadRequestError, FileInfo, NotFoundError
from tests.server import ModuleServer, SandboxTestCase

SERVER = ModuleServer()
BIG = 100 * 1024 * 1024
#: What the client may allocate (Python-level, tracemalloc) while moving 100 MB: a few chunks.
MEMORY_BUDGET = 12 * 1024 * 1024


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    SERVER.tear_down()


class FileTests(SandboxTestCase):
    server = SERVER
    client_timeout = 300

    def test_bytes_round_trip(self):
        data = bytes(range(256)) * 1000
        answer = self.sbx.upload(data, "/root/t/bytes.bin")
        self.assertEqual(answer, {"path": "/root/t/bytes.bin", "size": len(data)})
        self.assertEqual(self.sbx.download("/root/t/bytes.bin"), data)
        r = self.sbx.run_code("print(len(open('/root/t/bytes.bin','rb').read()))")
        self.assertEqual(r.stdout, f"{len(data)}\n")

    def test_str_file_object_and_iterable(self):
        self.sbx.upload("/root/t/s.txt", "héllo\n")
        self.assertEqual(self.sbx.download("/root/t/s.txt"), "héllo\n".encode())
        self.sbx.upload(io.BytesIO(b"from a file object"), "/root/t/f.bin")
        self.assertEqual(self.sbx.download("/root/t/f.bin"), b"from a file object")
        self.sbx.upload((bytes([i]) * 70000 for i in range(20)), "/root/t/gen.bin")
        self.assertEqual(self.sbx.download("/root/t/gen.bin"), b"".join(bytes([i]) * 70000 for i in range(20)))
        self.sbx.upload(b"", "/root/t/empty")
        self.assertEqual(self.sbx.download("/root/t/empty"), b"")

    def test_upload_takes_either_order_and_refuses_ambiguity(self):
        # The hosted docs show upload(path, data) and upload(data, path): both must land the bytes
        # at the path. (Before, upload("data.csv", b"...") wrote b"data.csv" to a file named after
        # the bytes and reported success.)
        self.sbx.upload("/root/t/order1.csv", b"a,b\n1,2\n")
        self.assertEqual(self.sbx.download("/root/t/order1.csv"), b"a,b\n1,2\n")
        self.sbx.upload(b"x,y\n", "/root/t/order2.csv")
        self.assertEqual(self.sbx.download("/root/t/order2.csv"), b"x,y\n")
        self.sbx.upload(data=b"kw", path="/root/t/order3.txt")
        self.assertEqual(self.sbx.download("/root/t/order3.txt"), b"kw")
        self.sbx.files.write("/root/t/order4.txt", "via write")
        self.assertEqual(self.sbx.download("/root/t/order4.txt"), b"via write")
        with self.assertRaises(BadRequestError) as caught:
            self.sbx.upload(b"no path", b"here")
        self.assertIn("path", str(caught.exception))
        with self.assertRaises(BadRequestError) as caught:
            self.sbx.upload("a,b\n1,2\n", "/root/t/order5.csv")  # data first, both str
        self.assertIn("newline", str(caught.exception))
        listing = self.sbx.run_code("import os\nprint(sorted(os.listdir('/root/t')))").stdout
        self.assertNotIn("here", listing)
        self.assertNotIn("a,b", listing)

    def test_code_sees_uploads_and_downloads_see_code(self):
        self.sbx.run_code("open('/root/t2.txt', 'w').write('written by code')")
        self.assertEqual(self.sbx.download("/root/t2.txt"), b"written by code")
        self.sbx.upload(b"a,b\n1,2\n", "data.csv")  # relative: under /root
        r = self.sbx.run_code("import pandas as pd\nprint(pd.read_csv('/root/data.csv')['b'].sum())")
        self.assertEqual(r.stdout, "2\n")

    def test_download_stream_and_download_to(self):
        data = os.urandom(3 * 1024 * 1024 + 17)
        self.sbx.upload(data, "/root/t/rand.bin")
        with self.sbx.download_stream("/root/t/rand.bin", chunk_size=1 << 20) as stream:
            self.assertEqual(stream.size, len(data))
            chunks = list(stream)
        self.assertEqual([len(c) for c in chunks], [1 << 20] * 3 + [17])
        self.assertEqual(b"".join(chunks), data)
        buf = io.BytesIO()
        self.assertEqual(self.sbx.download_to("/root/t/rand.bin", buf), len(data))
        self.assertEqual(buf.getvalue(), data)
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, "out.bin")
            self.sbx.download_to("/root/t/rand.bin", local)
            with open(local, "rb") as f:
                self.assertEqual(f.read(), data)

    def test_stopping_a_download_early_keeps_things_usable(self):
        self.sbx.upload(os.urandom(4 << 20), "/root/t/partial.bin")
        stream = self.sbx.download_stream("/root/t/partial.bin", chunk_size=65536)
        next(stream)
        stream.close()
        self.assertEqual(self.sbx.run_code("print('fine')").stdout, "fine\n")

    def test_helpers(self):
        files = self.sbx.files
        self.assertEqual(files.mkdir("/root/h/a/b"), "/root/h/a/b")
        files.write("/root/h/a/x.txt", b"12345")
        self.assertTrue(files.exists("/root/h/a/x.txt"))
        self.assertFalse(files.exists("/root/h/nope"))
        st = files.stat("/root/h/a/x.txt")
        self.assertIsInstance(st, FileInfo)
        self.assertEqual((st.name, st.path, st.type, st.size), ("x.txt", "/root/h/a/x.txt", "file", 5))
        self.assertTrue(st.is_file)
        self.assertGreater(st.mtime, 1_600_000_000)
        names = sorted((e.name, e.type) for e in files.list("/root/h/a"))
        self.assertEqual(names, [("b", "dir"), ("x.txt", "file")])
        self.assertEqual(files.read("/root/h/a/x.txt"), b"12345")
        self.assertEqual(files.read_text("/root/h/a/x.txt"), "12345")
        files.remove("/root/h/a/x.txt")
        self.assertFalse(files.exists("/root/h/a/x.txt"))
        files.remove("/root/h", recursive=True)
        self.assertFalse(files.exists("/root/h"))

    def test_file_errors(self):
        with self.assertRaises(NotFoundError):
            self.sbx.download("/root/missing.bin")
        with self.assertRaises(NotFoundError):
            self.sbx.files.stat("/root/missing.bin")
        with self.assertRaises(BadRequestError):
            self.sbx.download("/root")  # a directory

    def test_100_mb_round_trip_in_constant_memory(self):
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "big.bin")
            digest = hashlib.sha256()
            with open(src, "wb") as f:
                block = os.urandom(1 << 20)
                for i in range(BIG >> 20):
                    chunk = block[i:] + block[:i]  # every MiB different
                    digest.update(chunk)
                    f.write(chunk)
            expected = digest.hexdigest()

            tracemalloc.start()
            try:
                with open(src, "rb") as f:
                    answer = self.sbx.upload(f, "/root/big.bin")
                _, upload_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertEqual(answer["size"], BIG)
            self.assertLess(upload_peak, MEMORY_BUDGET, f"upload peaked at {upload_peak} bytes")

            r = self.sbx.run_code(
                "import hashlib\nh = hashlib.sha256()\n"
                "with open('/root/big.bin', 'rb') as f:\n"
                "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\nprint(h.hexdigest())")
            self.assertEqual(r.stdout.strip(), expected)

            dst = os.path.join(d, "back.bin")
            tracemalloc.start()
            try:
                written = self.sbx.download_to("/root/big.bin", dst)
                _, download_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertEqual(written, BIG)
            self.assertLess(download_peak, MEMORY_BUDGET, f"download peaked at {download_peak} bytes")
            back = hashlib.sha256()
            with open(dst, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    back.update(b)
            self.assertEqual(back.hexdigest(), expected)
        self.sbx.files.remove("/root/big.bin")


if __name__ == "__main__":
    unittest.main()
