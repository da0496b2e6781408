"""Tests of the Podflare agent: spawn the real agent (/usr/bin/python3, channel on fd 3 = one end
of a socketpair) and drive it over the channel protocol (docs/protocol.md).

Run from the repository root:  /usr/bin/python3 -m unittest discover -s agent/tests -v
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unittest
from collections import defaultdict, deque
from typing import Any

PYTHON = '/usr/bin/python3'
AGENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'podflare_agent.py')
# The protocol as generated from packages/protocol (npm run gen:protocol).
with open(os.path.join(os.path.dirname(AGENT), 'podflare_protocol.json'), encoding='utf-8') as _f:
    PROTOCOL = json.load(_f)
# Puts the channel on fd 3, exactly as the server launches the agent.
TRAMPOLINE = ('import os, sys; fd = int(sys.argv[1])\n'
              'if fd != 3: os.dup2(fd, 3); os.close(fd)\n'
              'os.execv(sys.argv[2], sys.argv[2:])')


def _has(module: str) -> bool:
    try:
        return subprocess.run([PYTHON, '-c', f'import {module}'], capture_output=True).returncode == 0
    except OSError:
        return False


HAS_MPL = _has('matplotlib')
HAS_PANDAS = _has('pandas')


class Agent:
    """One agent process and a client for its channel."""

    def __init__(self, fd_from_env: bool = False, **env: str):
        self.home = tempfile.mkdtemp(prefix='pf-agent-home-')
        self.sock, child = socket.socketpair()
        full_env = dict(os.environ, PODFLARE_AGENT_HOME=self.home, PODFLARE_INTERRUPT_GRACE_MS='400')
        full_env.pop('PODFLARE_AGENT_FD', None)
        full_env.update(env)
        if fd_from_env:  # the channel stays where it is; PODFLARE_AGENT_FD says which fd
            full_env['PODFLARE_AGENT_FD'] = str(child.fileno())
            argv = [PYTHON, AGENT]
        else:
            argv = [PYTHON, '-c', TRAMPOLINE, str(child.fileno()), PYTHON, AGENT]
        self.proc = subprocess.Popen(argv, pass_fds=[child.fileno()], env=full_env,
                                     stdin=subprocess.DEVNULL)
        child.close()
        self.buf = b''
        self.by_id: dict[Any, deque] = defaultdict(deque)
        self.next_id = 0
        self.hello = self.recv_for(None, timeout=15)

    def close(self) -> int:
        try:
            self.sock.close()
            return self.proc.wait(timeout=10)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    # ---- wire ---------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else (json.dumps(obj) + '\n').encode()
        self.sock.sendall(data)

    def _read_one(self, timeout: float) -> dict:
        while b'\n' not in self.buf:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError('agent closed the channel')
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def recv_for(self, msg_id: Any, timeout: float = 10) -> dict:
        """The next message about request msg_id (None: messages without an id)."""
        deadline = time.monotonic() + timeout
        while not self.by_id[msg_id]:
            msg = self._read_one(max(0.01, deadline - time.monotonic()))
            self.by_id[msg.get('id')].append(msg)
        return self.by_id[msg_id].popleft()

    def request(self, op: str, **fields: Any) -> dict:
        self.next_id += 1
        self.send({'id': self.next_id, 'op': op, **fields})
        return self.recv_for(self.next_id)

    def start(self, code: str, language: str = 'python', **fields: Any) -> int:
        self.next_id += 1
        self.send({'id': self.next_id, 'op': 'exec', 'language': language, 'code': code, **fields})
        return self.next_id

    def events(self, exec_id: int, timeout: float = 10) -> list[dict]:
        out = []
        while True:
            msg = self.recv_for(exec_id, timeout)
            msg['t'] = time.monotonic()
            out.append(msg)
            if msg.get('type') == 'exit' or 'ok' in msg:
                return out

    def run(self, code: str, language: str = 'python', **fields: Any) -> 'Result':
        return Result(self.events(self.start(code, language, **fields)))


class Result:
    def __init__(self, events: list[dict]):
        self.events = events
        self.exit = events[-1]
        self.stdout = ''.join(e['data'] for e in events if e.get('type') == 'stdout')
        self.stderr = ''.join(e['data'] for e in events if e.get('type') == 'stderr')
        self.results = [e for e in events if e.get('type') == 'result']
        errors = [e['data'] for e in events if e.get('type') == 'error']
        self.error = errors[0] if errors else None
        self.code = self.exit.get('code')

    @property
    def main(self) -> dict | None:
        mains = [r['data'] for r in self.results if r['is_main_result']]
        return mains[0] if mains else None

    @property
    def displays(self) -> list[dict]:
        return [r['data'] for r in self.results if not r['is_main_result']]

    def __repr__(self) -> str:
        return f'Result({self.events!r})'


class AgentTestCase(unittest.TestCase):
    agent: Agent

    @classmethod
    def setUpClass(cls) -> None:
        cls.agent = Agent()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.agent.close()

    def run_ok(self, code: str, language: str = 'python', **fields: Any) -> Result:
        res = self.agent.run(code, language, **fields)
        self.assertEqual(res.code, 0, res)
        return res

    def value(self, code: str) -> str:
        main = self.run_ok(code).main
        assert main is not None
        return main['text/plain']


class TestPython(AgentTestCase):
    def test_hello_and_ping(self) -> None:
        hello = self.agent.hello
        self.assertEqual(hello['type'], 'hello')
        self.assertEqual(hello['version'], PROTOCOL['agent_protocol_version'])
        self.assertEqual(hello['pid'], self.agent.proc.pid)  # the trampoline exec'd into the agent
        pong = self.agent.request('ping')
        self.assertEqual(pong, {'id': pong['id'], 'ok': True, 'pid': hello['pid'],
                                'hostname': socket.gethostname()})

    def test_print_and_last_expression(self) -> None:
        res = self.run_ok('print(6*7)')
        self.assertEqual(res.stdout, '42\n')
        self.assertEqual(res.results, [])
        self.assertIsInstance(res.exit['execution_count'], int)
        self.assertFalse(res.exit['state_lost'])
        res = self.run_ok('x = 20\nx + 22')
        self.assertEqual(res.main, {'text/plain': '42'})
        self.assertEqual(self.value('_'), '42')
        self.assertIsNone(self.run_ok('x = 3').main)
        self.assertIsNone(self.run_ok('None').main)
        self.assertEqual(self.run_ok('x;  # hidden').results, [])

    def test_persistent_namespace_and_pickle(self) -> None:
        self.run_ok('class Point:\n    def __init__(self, x): self.x = x\np = Point(3)')
        self.assertEqual(self.value('import pickle; pickle.loads(pickle.dumps(p)).x'), '3')
        self.assertEqual(self.value('__name__'), "'__main__'")
        self.assertEqual(self.value('import sys; sys.modules["__main__"].p.x'), '3')

    def test_execution_count_increments_on_failures(self) -> None:
        first = self.agent.run('1/0').exit['execution_count']
        second = self.agent.run('x =').exit['execution_count']
        third = self.run_ok('1').exit['execution_count']
        self.assertEqual([second, third], [first + 1, first + 2])

    def test_exception(self) -> None:
        res = self.agent.run('def f():\n    return 1/0\nf()')
        self.assertEqual(res.code, 1)
        self.assertEqual(res.error['name'], 'ZeroDivisionError')
        self.assertEqual(res.error['value'], 'division by zero')
        tb = res.error['traceback']
        self.assertTrue(tb.startswith('Traceback (most recent call last):\n  File "<cell-'), tb)
        self.assertIn('return 1/0', tb)  # the cell's source lines are shown
        self.assertNotRegex(tb, r'podflare_(agent|worker|common)')
        self.assertEqual(res.stderr, tb)
        kinds = [e['type'] for e in res.events]
        self.assertEqual(kinds[-2:], ['error', 'exit'])
        self.assertEqual(self.value('1 + 1'), '2')  # the interpreter lives on

    def test_syntax_error(self) -> None:
        res = self.agent.run('x = (1,\nprint(x')
        self.assertEqual(res.code, 1)
        self.assertEqual(res.error['name'], 'SyntaxError')
        self.assertIn('<cell-', res.error['traceback'])
        self.assertIn('SyntaxError', res.stderr)

    def test_system_exit(self) -> None:
        for code, expected, stderr in [('import sys; sys.exit(3)', 3, ''), ('raise SystemExit', 0, ''),
                                       ('import sys; sys.exit("bye")', 1, 'bye\n')]:
            res = self.agent.run(code)
            self.assertEqual((res.code, res.error, res.stderr), (expected, None, stderr), res)
        self.assertEqual(self.value('1'), '1')

    def test_input_sees_eof(self) -> None:
        res = self.agent.run('input("name? ")')
        self.assertEqual(res.error['name'], 'EOFError')

    def test_streaming(self) -> None:
        res = self.run_ok('import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.3)')
        outs = [e for e in res.events if e['type'] == 'stdout']
        self.assertEqual(res.stdout, '0\n1\n2\n')
        self.assertGreaterEqual(len(outs), 3)
        self.assertGreater(res.exit['t'] - outs[0]['t'], 0.45)

    def test_fd_level_output(self) -> None:
        code = ('import os, ctypes, subprocess, sys\n'
                'os.write(1, b"raw\\n")\n'
                'os.system("echo from-shell; echo shell-err >&2")\n'
                'ctypes.CDLL(None).printf(b"from-c\\n")\n'
                'subprocess.run(["echo", "from-child"])\n'
                'print("to-stderr", file=sys.stderr)')
        res = self.run_ok(code)
        for text in ('raw\n', 'from-shell\n', 'from-c\n', 'from-child\n'):
            self.assertIn(text, res.stdout)
        self.assertIn('shell-err\n', res.stderr)
        self.assertIn('to-stderr\n', res.stderr)

    def test_output_precedes_results(self) -> None:
        res = self.run_ok('print("a")\ndisplay(1)\nprint("b")\ndisplay(2)\n3')
        seq = [(e['type'], e.get('data') if e['type'] != 'result' else e['data']['text/plain'])
               for e in res.events if e['type'] in ('stdout', 'result')]
        self.assertEqual(seq, [('stdout', 'a\n'), ('result', '1'), ('stdout', 'b\n'), ('result', '2'),
                               ('result', '3')])
        self.assertEqual([r['is_main_result'] for r in res.results], [False, False, True])

    def test_rich_results(self) -> None:
        code = ('class Rich:\n'
                '    def __repr__(self): return "Rich()"\n'
                '    def _repr_html_(self): return "<b>rich</b>"\n'
                '    def _repr_markdown_(self): return "**rich**"\n'
                '    def _repr_png_(self): return b"\\x89PNG"\n'
                '    def _repr_json_(self): return {"a": [1, 2]}\n'
                '    def _repr_latex_(self): return None\n'
                '    def _repr_svg_(self): raise ValueError("no svg")\n'
                'Rich()')
        main = self.run_ok(code).main
        self.assertEqual(main, {'text/plain': 'Rich()', 'text/html': '<b>rich</b>',
                                'text/markdown': '**rich**',
                                'image/png': base64.b64encode(b'\x89PNG').decode(),
                                'application/json': {'a': [1, 2]}})
        code = ('class Bundle:\n'
                '    def _repr_mimebundle_(self, include=None, exclude=None):\n'
                '        return {"text/plain": "B", "application/vnd.x+json": {"k": 1}}, {}\n'
                'Bundle()')
        self.assertEqual(self.run_ok(code).main, {'text/plain': 'B', 'application/vnd.x+json': {'k': 1}})

    def test_failing_repr_is_an_error(self) -> None:
        res = self.agent.run('class Bad:\n    def __repr__(self): raise RuntimeError("nope")\nBad()')
        self.assertEqual(res.code, 1)
        self.assertEqual(res.error['name'], 'RuntimeError')

    def test_display_raw(self) -> None:
        res = self.run_ok('display({"text/plain": "x", "text/html": "<i>x</i>"}, raw=True)')
        self.assertEqual(res.displays, [{'text/plain': 'x', 'text/html': '<i>x</i>'}])

    def test_env_and_cwd_per_exec(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            res = self.run_ok('import os; (os.environ.get("PF_T"), os.getcwd())',
                              env={'PF_T': 'v'}, cwd=tmp)
            self.assertEqual(res.main['text/plain'], repr(('v', tmp)))
        res = self.run_ok('import os; (os.environ.get("PF_T"), os.getcwd())')
        self.assertEqual(res.main['text/plain'], repr((None, self.agent.home)))
        res = self.agent.run('1', cwd='/nonexistent/dir')
        self.assertEqual((res.code, res.error['name']), (1, 'FileNotFoundError'))
        self.assertIn('/nonexistent/dir', res.stderr)

    def test_top_level_await(self) -> None:
        self.assertEqual(self.value('import asyncio\nawait asyncio.sleep(0.01)\nawait asyncio.sleep(0, "done")'),
                         "'done'")

    def test_output_between_execs_goes_to_next_exec(self) -> None:
        self.run_ok('import threading\nthreading.Timer(0.1, lambda: print("late", flush=True)).start()')
        time.sleep(0.4)
        self.assertEqual(self.run_ok('pass').stdout, 'late\n')

    def test_invalid_utf8_output(self) -> None:
        res = self.run_ok('import os; os.write(1, b"a\\xffb\\xe2\\x82"); os.write(1, b"\\xac\\n")')
        self.assertEqual(res.stdout, 'a\ufffdb\u20ac\n')

    def test_conflict(self) -> None:
        first = self.agent.start('import time; time.sleep(5)')
        second = self.agent.start('1')
        reply = self.agent.recv_for(second)
        self.assertEqual(reply['ok'], False)
        self.assertEqual(reply['error']['code'], 'conflict')
        self.assertTrue(self.agent.request('interrupt')['interrupted'])
        self.assertEqual(Result(self.agent.events(first)).code, 130)


class TestInterrupts(AgentTestCase):
    def test_interrupt(self) -> None:
        self.run_ok('kept = 1')
        self.assertEqual(self.agent.request('interrupt')['interrupted'], False)
        exec_id = self.agent.start('import time\nprint("start", flush=True)\ntime.sleep(30)')
        self.assertEqual(self.agent.recv_for(exec_id)['data'], 'start\n')
        time.sleep(0.1)  # let it reach the sleep
        reply = self.agent.request('interrupt')
        self.assertEqual(reply['interrupted'], True)
        res = Result(self.agent.events(exec_id))
        self.assertEqual(res.code, 130)
        self.assertEqual(res.error['name'], 'KeyboardInterrupt')
        self.assertIn('time.sleep(30)', res.error['traceback'])
        self.assertNotRegex(res.error['traceback'], r'podflare_(agent|worker|common)')
        self.assertFalse(res.exit['state_lost'])
        self.assertEqual(self.value('kept'), '1')

    def test_timeout(self) -> None:
        self.run_ok('kept = 2')
        t0 = time.monotonic()
        res = self.agent.run('import time; time.sleep(30)', timeout_ms=300)
        self.assertLess(time.monotonic() - t0, 2)
        self.assertEqual(res.code, 124)
        self.assertEqual(res.error['name'], 'TimeoutError')
        self.assertEqual(res.error['value'], 'execution exceeded timeout_ms=300')
        self.assertIn('TimeoutError: execution exceeded timeout_ms=300', res.stderr)
        self.assertFalse(res.exit['state_lost'])
        self.assertEqual(self.value('kept'), '2')

    def test_timeout_of_stubborn_code_restarts_interpreter(self) -> None:
        self.run_ok('kept = 3')
        code = 'import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)'
        res = self.agent.run(code, timeout_ms=200)
        self.assertEqual(res.code, 124)
        self.assertEqual(res.error['name'], 'TimeoutError')
        self.assertIn('state is lost', res.error['value'])
        self.assertIn('TimeoutError', res.stderr)
        self.assertTrue(res.exit['state_lost'])
        res = self.run_ok('"kept" in globals()')
        self.assertEqual(res.main['text/plain'], 'False')
        self.assertFalse(res.exit['state_lost'])

    def test_interrupt_swallowed_then_killed(self) -> None:
        code = 'import time\nwhile True:\n    try:\n        time.sleep(30)\n    except KeyboardInterrupt:\n        pass'
        exec_id = self.agent.start(code)
        time.sleep(0.2)
        self.assertTrue(self.agent.request('interrupt')['interrupted'])
        res = Result(self.agent.events(exec_id))
        self.assertEqual((res.code, res.error['name']), (130, 'KeyboardInterrupt'))
        self.assertTrue(res.exit['state_lost'])

    def test_worker_exit_and_crash(self) -> None:
        res = self.agent.run('import os; os._exit(5)')
        self.assertEqual((res.code, res.error, res.exit['state_lost']), (5, None, True))
        res = self.agent.run('import os, signal; print("bye", flush=True); os.kill(os.getpid(), signal.SIGSEGV)')
        self.assertEqual(res.code, 128 + signal.SIGSEGV)
        self.assertEqual(res.error['name'], 'InterpreterDied')
        self.assertEqual(res.stdout, 'bye\n')
        self.assertTrue(res.exit['state_lost'])
        self.assertEqual(self.value('6 * 7'), '42')

    def test_idle_worker_death(self) -> None:
        pid = int(self.value('import os; os.getpid()'))
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        res = self.run_ok('1')
        self.assertTrue(res.exit['state_lost'])
        self.assertNotEqual(int(self.value('import os; os.getpid()')), pid)
        self.assertFalse(self.run_ok('1').exit['state_lost'])

    def test_user_fork(self) -> None:
        res = self.run_ok('import os\npid = os.fork()\nif pid == 0:\n    print("child", flush=True); os._exit(0)\n'
                          'os.waitpid(pid, 0)[1]')
        self.assertEqual((res.stdout, res.main['text/plain']), ('child\n', '0'))


class TestBash(AgentTestCase):
    def test_bash(self) -> None:
        res = self.agent.run('echo hi; echo err >&2; exit 3', 'bash')
        self.assertEqual((res.stdout, res.stderr, res.code), ('hi\n', 'err\n', 3))
        self.assertIsNone(res.exit['execution_count'])
        self.assertFalse(res.exit['state_lost'])

    def test_bash_env_and_cwd(self) -> None:
        self.assertEqual(self.run_ok('echo "$PF_X"', 'bash', env={'PF_X': 'y'}).stdout, 'y\n')
        self.assertEqual(self.run_ok('pwd', 'bash').stdout, self.agent.home + '\n')
        self.assertEqual(self.run_ok('pwd', 'bash', cwd='/tmp').stdout, '/tmp\n')
        self.run_ok('import os; os.chdir("/tmp")')
        self.assertEqual(self.run_ok('pwd', 'bash').stdout, '/tmp\n')  # follows the interpreter
        self.run_ok(f'os.chdir({self.agent.home!r})')
        res = self.agent.run('pwd', 'bash', cwd='/nonexistent')
        self.assertEqual(res.code, 1)
        self.assertIn('/nonexistent', res.stderr)

    def test_bash_stdin_is_devnull(self) -> None:
        self.assertEqual(self.run_ok('cat; echo end', 'bash').stdout, 'end\n')

    def test_bash_timeout_and_interrupt(self) -> None:
        t0 = time.monotonic()
        res = self.agent.run('sleep 30', 'bash', timeout_ms=200)
        self.assertLess(time.monotonic() - t0, 2)
        self.assertEqual((res.code, res.error['name']), (124, 'TimeoutError'))
        exec_id = self.agent.start('echo go; sleep 30; echo never', 'bash')
        self.assertEqual(self.agent.recv_for(exec_id)['data'], 'go\n')
        self.assertTrue(self.agent.request('interrupt')['interrupted'])
        res = Result(self.agent.events(exec_id))
        self.assertEqual(res.code, 130)
        self.assertNotIn('never', res.stdout)
        res = self.agent.run("trap '' INT; sleep 30", 'bash', timeout_ms=100)  # ignores SIGINT: killed
        self.assertEqual(res.code, 124)

    def test_bash_background_job_does_not_block(self) -> None:
        t0 = time.monotonic()
        self.run_ok('(sleep 0.3; echo late) & echo now', 'bash')
        self.assertLess(time.monotonic() - t0, 0.25)
        time.sleep(0.5)
        self.assertEqual(self.run_ok('true', 'bash').stdout, 'late\n')


class TestBadInput(AgentTestCase):
    """Input the agent cannot run is refused with a clear error, and the agent stays usable."""

    def test_nul_byte_in_bash_code(self) -> None:
        reply = self.agent.run('echo a\0b', 'bash').exit
        self.assertEqual((reply['ok'], reply['error']['code']), (False, 'bad_request'), reply)
        self.assertIn('NUL', reply['error']['message'])
        self.assertEqual(self.run_ok('echo next', 'bash').stdout, 'next\n')
        self.assertEqual(self.run_ok('print("next")').stdout, 'next\n')

    def test_nul_byte_in_python_code_is_a_syntax_error(self) -> None:
        res = self.agent.run('print(1)\0')
        self.assertEqual(res.code, 1, res)
        self.assertIn(res.error['name'], ('SyntaxError', 'ValueError'))
        self.assertIn('null bytes', res.error['value'])
        self.assertEqual(self.run_ok('print("next")').stdout, 'next\n')

    def test_lone_surrogates(self) -> None:
        for language in ('bash', 'python'):
            reply = self.agent.run('echo \ud800' if language == 'bash' else 'print("\ud800")', language).exit
            self.assertEqual((reply['ok'], reply['error']['code']), (False, 'bad_request'), reply)
            self.assertIn('surrogate', reply['error']['message'])
        self.assertEqual(self.run_ok('echo next', 'bash').stdout, 'next\n')

    def test_huge_single_line_of_output(self) -> None:
        size = 20 * 1024 * 1024
        res = self.run_ok(f"import sys; sys.stdout.write('x' * {size})")
        self.assertEqual(len(res.stdout), size)
        res = self.run_ok(f"head -c {size} /dev/zero | tr '\\0' y", 'bash')
        self.assertEqual(len(res.stdout), size)
        self.assertEqual(self.run_ok('echo next', 'bash').stdout, 'next\n')

    def test_huge_request_line_is_refused_and_the_agent_goes_on(self) -> None:
        self.agent.send(b'{"id": 5, "op": "ping", "pad": "' + b'x' * (65 * 1024 * 1024) + b'"}\n')
        reply = self.agent.recv_for(None, timeout=30)
        self.assertEqual((reply['ok'], reply['error']['code']), (False, 'bad_request'))
        self.assertTrue(self.agent.request('ping')['ok'])


class TestFiles(AgentTestCase):
    def upload(self, path: str, chunks: list[bytes], **fields: Any) -> dict:
        begin = self.agent.request('upload_begin', path=path, **fields)
        self.assertTrue(begin['ok'], begin)
        for chunk in chunks:
            reply = self.agent.request('upload_chunk', handle=begin['handle'],
                                       data=base64.b64encode(chunk).decode())
            self.assertTrue(reply['ok'], reply)
        return self.agent.request('upload_end', handle=begin['handle'])

    def test_upload_read_stat_list_remove(self) -> None:
        root = os.path.join(self.agent.home, 'up')
        path = os.path.join(root, 'a', 'data.bin')
        body = bytes(range(256)) * 100
        end = self.upload(path, [body[:10000], body[10000:]])
        self.assertEqual(end['size'], len(body))
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), body)
        self.assertEqual([n for n in os.listdir(os.path.dirname(path))], ['data.bin'])  # no temp left

        r = self.agent.request('file_read', path=path, offset=0, length=20000)
        self.assertEqual((base64.b64decode(r['data']), r['eof'], r['size']), (body[:20000], False, len(body)))
        r = self.agent.request('file_read', path=path, offset=20000, length=20000)
        self.assertEqual((base64.b64decode(r['data']), r['eof']), (body[20000:], True))
        r = self.agent.request('file_read', path=path, offset=len(body), length=10)
        self.assertEqual((r['data'], r['eof']), ('', True))

        st = self.agent.request('stat', path=path)['stat']
        self.assertEqual((st['name'], st['path'], st['type'], st['size'], st['mode']),
                         ('data.bin', path, 'file', len(body), 0o644))
        self.assertAlmostEqual(st['mtime'], os.stat(path).st_mtime, places=3)

        os.symlink('a', os.path.join(root, 'link'))
        with open(os.path.join(root, 'b.txt'), 'w') as f:
            f.write('b')
        entries = self.agent.request('list', path=root)['entries']
        self.assertEqual([(e['name'], e['type']) for e in entries],
                         [('a', 'dir'), ('b.txt', 'file'), ('link', 'symlink')])

        r = self.agent.request('remove', path=os.path.join(root, 'a'))
        self.assertEqual(r['error']['code'], 'bad_request')
        self.assertTrue(self.agent.request('remove', path=os.path.join(root, 'a'), recursive=True)['ok'])
        self.assertTrue(self.agent.request('remove', path=os.path.join(root, 'link'))['ok'])
        self.assertTrue(os.path.isdir(root))
        self.assertEqual(os.listdir(root), ['b.txt'])

    def test_upload_mode_relative_path_and_abort(self) -> None:
        end = self.upload('rel/script.sh', [b'#!/bin/sh\necho ok\n'], mode=0o755)
        self.assertTrue(end['ok'], end)
        path = os.path.join(self.agent.home, 'rel', 'script.sh')
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o755)
        self.assertEqual(self.run_ok('rel/script.sh', 'bash').stdout, 'ok\n')

        begin = self.agent.request('upload_begin', path='rel/aborted')
        self.agent.request('upload_chunk', handle=begin['handle'], data=base64.b64encode(b'x').decode())
        self.assertTrue(self.agent.request('upload_end', handle=begin['handle'], abort=True)['ok'])
        self.assertEqual(os.listdir(os.path.dirname(path)), ['script.sh'])

    def test_mkdir(self) -> None:
        deep = os.path.join(self.agent.home, 'm', 'n', 'o')
        self.assertTrue(self.agent.request('mkdir', path=deep)['ok'])
        self.assertTrue(self.agent.request('mkdir', path=deep)['ok'])  # exists: fine
        self.assertTrue(os.path.isdir(deep))
        r = self.agent.request('mkdir', path=os.path.join(self.agent.home, 'x', 'y'), parents=False)
        self.assertEqual(r['error']['code'], 'not_found')
        with open(os.path.join(self.agent.home, 'afile'), 'w'):
            pass
        self.assertEqual(self.agent.request('mkdir', path='afile')['error']['code'], 'conflict')

    def test_errors(self) -> None:
        home = self.agent.home
        cases = [
            ('file_read', {'path': '/nonexistent/file', 'offset': 0, 'length': 1}, 'not_found'),
            ('file_read', {'path': home, 'offset': 0, 'length': 1}, 'bad_request'),
            ('file_read', {'path': home, 'offset': -1, 'length': 1}, 'bad_request'),
            ('stat', {'path': 'a\0b'}, 'bad_request'),
            ('stat', {'path': ''}, 'bad_request'),
            ('stat', {'path': '/nonexistent'}, 'not_found'),
            ('list', {'path': '/etc/hostname'}, 'bad_request'),
            ('remove', {'path': '/nonexistent'}, 'not_found'),
            ('upload_chunk', {'handle': 'nope', 'data': ''}, 'bad_request'),
            ('upload_begin', {'path': home}, 'bad_request'),
        ]
        for op, fields, code in cases:
            reply = self.agent.request(op, **fields)
            self.assertEqual((reply['ok'], reply['error']['code']), (False, code), (op, fields, reply))
        if os.geteuid() != 0:
            self.assertEqual(self.agent.request('list', path='/root')['error']['code'], 'forbidden')

    def test_files_work_while_exec_runs(self) -> None:
        exec_id = self.agent.start('import time; time.sleep(0.5); print("done")')
        t0 = time.monotonic()
        end = self.upload('during.txt', [b'hello'])
        self.assertEqual(end['size'], 5)
        self.assertTrue(self.agent.request('stat', path='during.txt')['ok'])
        self.assertLess(time.monotonic() - t0, 0.3)
        self.assertEqual(Result(self.agent.events(exec_id)).stdout, 'done\n')


class TestProtocol(AgentTestCase):
    def test_bad_requests(self) -> None:
        self.agent.send(b'this is not json\n')
        reply = self.agent.recv_for(None)
        self.assertEqual((reply['ok'], reply['error']['code']), (False, 'bad_request'))
        self.agent.send({'id': 77, 'op': 'frobnicate'})
        self.assertEqual(self.agent.recv_for(77)['error']['code'], 'bad_request')
        self.agent.send({'id': 78, 'op': 'exec', 'language': 'cobol', 'code': ''})
        self.assertEqual(self.agent.recv_for(78)['error']['code'], 'bad_request')
        self.agent.send({'id': 79, 'op': 'exec', 'language': 'python', 'code': '1', 'timeout_ms': 'soon'})
        self.assertEqual(self.agent.recv_for(79)['error']['code'], 'bad_request')
        self.agent.send({'op': 'ping'})
        self.assertEqual(self.agent.recv_for(None)['error']['code'], 'bad_request')
        self.agent.send(b'\n[1, 2]\n')
        self.assertEqual(self.agent.recv_for(None)['error']['code'], 'bad_request')
        self.assertTrue(self.agent.request('ping')['ok'])

    def test_round_trip_latency(self) -> None:
        samples = []
        for _ in range(200):
            t0 = time.perf_counter()
            res = self.agent.run('print(6*7)')
            samples.append(time.perf_counter() - t0)
            self.assertEqual(res.stdout, '42\n')
        p50 = statistics.median(samples) * 1e6
        p90 = statistics.quantiles(samples, n=10)[-1] * 1e6
        sys.stderr.write(f'\n  print(6*7) round trip: p50 {p50:.0f} us, p90 {p90:.0f} us (200 calls)\n')
        self.assertLess(p50, 5000)


class TestProtocolDocument(unittest.TestCase):
    """The agent speaks what packages/protocol defines: its constants come from the generated
    podflare_protocol.json (test/protocol-spec.test.ts checks that copy against the TypeScript)."""

    AGENT_DIR = os.path.dirname(AGENT)

    def document(self) -> dict[str, Any]:
        with open(os.path.join(self.AGENT_DIR, 'podflare_protocol.json'), encoding='utf-8') as f:
            return json.load(f)

    def test_hello_carries_the_documented_version(self) -> None:
        agent = Agent()
        try:
            self.assertEqual(agent.hello['type'], 'hello')
            self.assertEqual(agent.hello['version'], self.document()['agent_protocol_version'])
        finally:
            agent.close()

    def test_timeout_exit_code_is_the_documented_one(self) -> None:
        agent = Agent()
        try:
            res = agent.run('import time; time.sleep(30)', timeout_ms=300)
            self.assertEqual(res.code, self.document()['exit_codes']['timeout'])
        finally:
            agent.close()

    def test_every_error_code_the_agent_sends_is_in_the_table(self) -> None:
        import re
        patterns = [r"AgentError\('(\w+)'", r"'code': '(\w+)'", r"return '(\w+)', str\(exc\)"]
        used: set[str] = set()
        for name in os.listdir(self.AGENT_DIR):
            if name.endswith('.py'):
                with open(os.path.join(self.AGENT_DIR, name), encoding='utf-8') as f:
                    text = f.read()
                for pattern in patterns:
                    used.update(re.findall(pattern, text))
        self.assertGreaterEqual(len(used), 5, used)  # the scan found the agent's codes at all
        self.assertEqual(used - set(self.document()['errors']), set())


class TestLifecycle(unittest.TestCase):
    def test_eof_stops_agent_and_worker(self) -> None:
        agent = Agent()
        worker = int(agent.run('import os; os.getpid()').main['text/plain'])
        bash = agent.start('sleep 30 & echo $!', 'bash')
        bg = int(Result(agent.events(bash)).stdout)
        self.assertEqual(agent.close(), 0)
        time.sleep(0.1)
        for pid in (worker, bg):
            self.assertFalse(_alive(pid), pid)

    def test_preload(self) -> None:
        agent = Agent(fd_from_env=True, PODFLARE_PRELOAD='wave, no_such_module_xyz,')
        try:
            self.assertEqual(agent.run('import sys; "wave" in sys.modules').main['text/plain'], 'True')
        finally:
            agent.close()

    def test_zygote_preload_leaves_no_trace(self) -> None:
        """A zygote's list is imported and then taken out of the environment (its fork children
        must look like fresh sandboxes), and what it loaded is out of the collector's reach."""
        agent = Agent(fd_from_env=True, PODFLARE_ZYGOTE_PRELOAD='wave,no_such_module_xyz')
        try:
            code = 'import sys, os, gc; ("wave" in sys.modules, "PODFLARE_ZYGOTE_PRELOAD" in os.environ, gc.get_freeze_count() > 0)'
            self.assertEqual(agent.run(code).main['text/plain'], '(True, False, True)')
        finally:
            agent.close()


def _alive(pid: int) -> bool:
    """True if pid runs (a zombie does not count)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@unittest.skipUnless(HAS_MPL, 'matplotlib is not installed')
class TestMatplotlib(AgentTestCase):
    def assert_png(self, bundle: dict) -> None:
        self.assertTrue(base64.b64decode(bundle['image/png']).startswith(b'\x89PNG\r\n\x1a\n'))

    def test_show(self) -> None:
        res = self.run_ok('import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint(plt.get_fignums())')
        self.assertEqual(len(res.displays), 1)
        self.assert_png(res.displays[0])
        self.assertEqual(res.displays[0]['text/plain'], '<Figure size 640x480 with 1 Axes>')
        self.assertEqual(res.stdout, '[]\n')
        kinds = [e['type'] for e in res.events]
        self.assertLess(kinds.index('result'), kinds.index('stdout'))

    def test_open_figures_shown_at_end(self) -> None:
        res = self.run_ok('import matplotlib.pyplot as plt\nfig1 = plt.figure(); plt.plot([1])\n'
                          'fig2 = plt.figure(); plt.bar([1], [2]);')
        self.assertEqual(len(res.displays), 2)
        self.assertIsNone(res.main)
        self.assertEqual(self.value('plt.get_fignums()'), '[]')

    def test_figure_as_last_expression(self) -> None:
        res = self.run_ok('import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nfig')
        self.assertEqual(res.displays, [])
        self.assert_png(res.main)
        res = self.run_ok('from matplotlib.figure import Figure\nf = Figure()\nf.add_subplot().plot([1])\nf')
        self.assert_png(res.main)

    def test_backend_not_leaked_to_children(self) -> None:
        # A Python started by user code cannot import our backend: it must not be told to use it.
        res = self.run_ok('import matplotlib, os, subprocess, sys\n'
                          'print(matplotlib.get_backend(), os.environ.get("MPLBACKEND"))\n'
                          'child = "import matplotlib.pyplot as plt; plt.figure(); print(plt.get_backend())"\n'
                          'subprocess.run([sys.executable, "-c", child], check=True)')
        lines = res.stdout.splitlines()
        self.assertEqual(lines[0], 'module://podflare_mpl_backend None')
        self.assertNotIn('podflare', lines[1])


@unittest.skipUnless(HAS_PANDAS, 'pandas is not installed')
class TestPandas(AgentTestCase):
    def test_dataframe_html(self) -> None:
        main = self.run_ok('import pandas as pd\npd.DataFrame({"a": [1, 2]})').main
        self.assertIn('<table', main['text/html'])
        self.assertIn('a', main['text/plain'])


if __name__ == '__main__':
    unittest.main()
