"""Background processes in the agent (agent/podflare_processes.py), driven over the channel."""
from __future__ import annotations

import os
import re
import shutil
import time
import unittest

from test_agent import Agent, AgentTestCase


def read_all(agent: Agent, pid: int, offset: int = 0, timeout: float = 20) -> tuple[str, dict]:
    """Everything from `offset` until the process has ended and its output is read."""
    text = ''
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = agent.request('proc_read', pid=pid, offset=offset, wait_ms=2000)
        assert reply['ok'], reply
        text += ''.join(c['data'] for c in reply['chunks'])
        offset = reply['next']
        if reply['eof']:
            return text, reply
    raise AssertionError(f'process {pid} did not finish: {text[-200:]!r}')


class TestProcesses(AgentTestCase):
    def start(self, cmd: str, **fields) -> int:
        reply = self.agent.request('proc_start', cmd=cmd, **fields)
        self.assertTrue(reply['ok'], reply)
        return reply['process']['pid']

    def test_runs_beside_execs_and_keeps_output(self) -> None:
        pid = self.start('for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 7')
        # Execs are not blocked by it.
        self.assertEqual(self.agent.run('print(6*7)').stdout, '42\n')
        text, last = read_all(self.agent, pid)
        self.assertEqual(last['process']['exit_code'], 7)
        self.assertEqual(sorted(text.split()), sorted(['out1', 'err1', 'out2', 'err2', 'out3', 'err3']))
        # A reconnecting reader from offset 0 gets the same again.
        again, _ = read_all(self.agent, pid)
        self.assertEqual(again, text)

    def test_stdin_cwd_env(self) -> None:
        pid = self.start('read line; echo "got $line in $PWD with $FOO"', cwd='/tmp', env={'FOO': 'bar'})
        self.assertTrue(self.agent.request('proc_write', pid=pid, data='hello\n')['ok'])
        text, _ = read_all(self.agent, pid)
        self.assertEqual(text, 'got hello in /tmp with bar\n')

    def test_signal_kills_the_group(self) -> None:
        pid = self.start('sleep 300 & sleep 300')
        time.sleep(0.3)
        self.assertTrue(self.agent.request('proc_signal', pid=pid, signal='SIGKILL')['delivered'])
        _, last = read_all(self.agent, pid)
        self.assertEqual(last['process']['exit_code'], 128 + 9)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            self.fail('the background sleep survived the kill of its group')

    def test_log_is_bounded_and_the_sandbox_stays_responsive(self) -> None:
        pid = self.start('yes 0123456789 | head -c 5000000; echo END', log_chars=4096)
        self.assertEqual(self.agent.run('print(1)').stdout, '1\n')
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # nobody reads while it writes 5 MB: it must not stall
            listed = {p['pid']: p for p in self.agent.request('proc_list')['processes']}
            if not listed[pid]['running']:
                break
            time.sleep(0.1)
        text, last = read_all(self.agent, pid)
        self.assertLessEqual(len(text), 4096)
        self.assertTrue(text.endswith('END\n'))
        first = self.agent.request('proc_read', pid=pid, offset=0)
        self.assertEqual(first['lost'], 5_000_004 - 4096)

    def test_errors(self) -> None:
        self.assertEqual(self.agent.request('proc_read', pid=999999)['error']['code'], 'not_found')
        self.assertEqual(self.agent.request('proc_start', cmd='')['error']['code'], 'bad_request')
        self.assertEqual(self.agent.request('proc_start', cmd='true', cwd='/nonexistent')['error']['code'], 'bad_request')
        pid = self.start('sleep 30')
        self.assertEqual(self.agent.request('proc_signal', pid=pid, signal='SIGNOPE')['error']['code'], 'bad_request')
        self.agent.request('proc_signal', pid=pid, signal='SIGTERM')

    def test_listed(self) -> None:
        pid = self.start('sleep 30')
        listed = {p['pid']: p for p in self.agent.request('proc_list')['processes']}
        self.assertTrue(listed[pid]['running'])
        self.assertEqual(listed[pid]['cmd'], 'sleep 30')
        self.agent.request('proc_signal', pid=pid, signal='SIGKILL')


class TestProcessesDieWithTheAgent(unittest.TestCase):
    def test_no_orphan_after_the_channel_closes(self) -> None:
        agent = Agent()
        reply = agent.request('proc_start', cmd='sleep 300')
        pid = reply['process']['pid']
        agent.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        self.fail('a background process outlived its agent')


if __name__ == '__main__':
    unittest.main()


class TestPty(AgentTestCase):
    def wait_for(self, pid: int, needle: str, offset: int = 0, timeout: float = 20) -> tuple[str, int]:
        text = ''
        deadline = time.monotonic() + timeout
        while not re.search(needle, re.sub(r'\x1b\[[0-9;?]*[a-zA-Z]', '', text)):
            if time.monotonic() > deadline:
                self.fail(f'{needle!r} never came: {text[-300:]!r}')
            reply = self.agent.request('proc_read', pid=pid, offset=offset, wait_ms=1000)
            text += ''.join(c['data'] for c in reply['chunks'])
            offset = reply['next']
        return text, offset

    def test_bash_on_a_terminal_echo_and_resize(self) -> None:
        reply = self.agent.request('proc_start', cmd='exec bash --norc -i', pty={'cols': 100, 'rows': 30})
        self.assertTrue(reply['ok'], reply)
        self.assertTrue(reply['process']['tty'])
        pid = reply['process']['pid']
        _, offset = self.wait_for(pid, '# $')  # the prompt (as root)
        self.agent.request('proc_write', pid=pid, data='echo hi\n')
        self.wait_for(pid, r'echo hi\r\n\r?hi\r\n', offset)
        self.assertTrue(self.agent.request('proc_resize', pid=pid, cols=123, rows=40)['ok'])
        self.agent.request('proc_write', pid=pid, data='tput cols; stty size\n')
        _, offset = self.wait_for(pid, r'[\r\n]123\r\n(.|\n)*40 123', offset)
        self.agent.request('proc_write', pid=pid, data='exit 5\n')
        deadline = time.monotonic() + 10
        while self.agent.request('proc_read', pid=pid, offset=offset)['process']['running']:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.assertEqual(self.agent.request('proc_read', pid=pid, offset=offset)['process']['exit_code'], 5)

    def test_resize_needs_a_terminal(self) -> None:
        pid = self.agent.request('proc_start', cmd='sleep 5')['process']['pid']
        self.assertEqual(self.agent.request('proc_resize', pid=pid, cols=10, rows=10)['error']['code'], 'conflict')
        self.agent.request('proc_signal', pid=pid, signal='SIGKILL')


@unittest.skipUnless(shutil.which('node'), 'needs node (Debian nodejs)')
class TestJavaScript(AgentTestCase):
    def test_state_persists_across_calls(self) -> None:
        self.run_ok('let x = 41', 'javascript')
        self.assertEqual(self.run_ok('x + 1', 'javascript').stdout, '42\n')
        res = self.run_ok('function f(a) { return a * 2 }\nconsole.log("logged", f(x))\nconsole.error("to stderr")', 'javascript')
        self.assertEqual(res.stdout, 'logged 82\n')
        self.assertEqual(res.stderr, 'to stderr\n')
        self.assertEqual(self.run_ok('await Promise.resolve(7)' if False else 'Promise.resolve({a: [1, 2]})', 'javascript').stdout,
                         '{ a: [ 1, 2 ] }\n')

    def test_errors_and_interrupt(self) -> None:
        res = self.agent.run('throw new TypeError("nope")', 'javascript')
        self.assertEqual(res.code, 1)
        self.assertIn('TypeError: nope', res.stderr)
        self.assertEqual(self.run_ok('1 + 1', 'javascript').stdout, '2\n')
        res = self.agent.run('new Promise(() => {})', 'javascript', timeout_ms=500)
        self.assertNotEqual(res.code, 0)
