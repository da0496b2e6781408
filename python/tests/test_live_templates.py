"""Templates from a live sandbox through the Python SDK: ``save_template`` makes one of a sandbox's
files, ``Sandbox(template=...)`` starts with them (and its variables), ``list_templates``
shows it and ``delete_template`` removes it; a taken name is a ConflictError, a bad one a
BadRequestError."""

import secrets
import unittest

from podflare import BadRequestError, ConflictError, Sandbox
from tests.server import ModuleServer

SERVER = ModuleServer()
NAME = "pf-py-lt-" + secrets.token_hex(3)


def setUpModule():
    SERVER.set_up()


def tearDownModule():
    try:
        Sandbox.delete_template(NAME, host=SERVER.url)
    except Exception:
        pass
    SERVER.tear_down()


class LiveTemplateTests(unittest.TestCase):
    def test_save_start_list_delete(self):
        with Sandbox(host=SERVER.url) as sbx:
            sbx.run_code("v = 7\nopen('/root/state.txt', 'w').write('saved')")
            saved = sbx.save_template(NAME, description="py test")
            self.assertEqual(saved["name"], NAME)
            self.assertEqual(saved["carries"], {"files": True, "interpreter": True})
            with self.assertRaises(ConflictError):
                sbx.save_template(NAME)
            with self.assertRaises(BadRequestError):
                sbx.save_template("Not A Name")
        names = {t["name"]: t for t in Sandbox.list_templates(host=SERVER.url)}
        self.assertEqual(names[NAME]["kind"], "directory")
        with Sandbox(host=SERVER.url, template=NAME) as child:
            self.assertEqual(child.run_code("print(open('/root/state.txt').read())").stdout, "saved\n")
            self.assertEqual(child.run_code("print(v)").stdout, "7\n")
            with self.assertRaises(ConflictError):
                Sandbox.delete_template(NAME, host=SERVER.url)
        Sandbox.delete_template(NAME, host=SERVER.url)
        self.assertNotIn(NAME, {t["name"] for t in Sandbox.list_templates(host=SERVER.url)})
        with self.assertRaises(BadRequestError):
            Sandbox(host=SERVER.url, template=NAME)


if __name__ == "__main__":
    unittest.main()
