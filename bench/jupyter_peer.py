"""The peer of Podflare's hot exec: the same statement sent to a local Jupyter kernel (ipykernel).

Started by bench/jupyter.ts with /usr/bin/python3 (Debian's python3-jupyter-client and
python3-ipykernel). The kernel is started with jupyter_client.manager.start_new_kernel(); the timed
part then talks to it over plain synchronous ZeroMQ sockets with jupyter_client's Session (signing
and framing), which is the cheapest way a Python client can drive a kernel: the blocking
KernelClient of jupyter_client 7 wraps asyncio calls per message and would charge its own overhead
to the kernel.

One round trip = send `execute_request` on the shell channel, read iopub until this request's
`status: idle` (its output has been published by then), and check that the output was "42\n". The
shell `execute_reply` is read after the clock stops, so the sockets never back up.

Prints one JSON line on stdout: {"samples_ms": [...], "kernel_pss_bytes": int|null, "versions": {...}}.
"""
import argparse
import json
import sys
import time

import zmq
import jupyter_client
import ipykernel
from jupyter_client.manager import start_new_kernel
from jupyter_client.session import Session


def pss_bytes(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def kernel_pid(km):
    prov = getattr(km, "provisioner", None)
    proc = getattr(prov, "process", None)
    if proc is not None and getattr(proc, "pid", None):
        return proc.pid
    kernel = getattr(km, "kernel", None)
    return getattr(kernel, "pid", None)


class Peer:
    def __init__(self, km):
        info = km.get_connection_info()
        self.session = Session(key=info["key"] if isinstance(info["key"], bytes) else info["key"].encode(),
                               signature_scheme=info["signature_scheme"])
        self.ctx = zmq.Context()
        base = f"{info['transport']}://{info['ip']}:"
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.setsockopt(zmq.IDENTITY, self.session.bsession)
        self.shell.connect(base + str(info["shell_port"]))
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.linger = 0
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(base + str(info["iopub_port"]))

    def recv(self, sock, timeout_s):
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the kernel in time")
        _, msg = self.session.recv(sock, mode=0)
        return msg

    def wait_subscribed(self, timeout_s=30.0):
        """SUB sockets miss what is published before the subscription lands: ping until iopub answers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.session.send(self.shell, "kernel_info_request", content={})
            if self.iopub.poll(500):
                break
        else:
            raise TimeoutError("iopub never delivered a message")
        # Drain whatever is left of the pings on both channels.
        time.sleep(0.2)
        for sock in (self.iopub, self.shell):
            while sock.poll(50):
                self.session.recv(sock, mode=0)

    def execute(self, code, timeout_s=30.0):
        """Returns (elapsed seconds, stdout text)."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        t0 = time.perf_counter()
        msg_id = self.session.send(self.shell, "execute_request", content=content)["header"]["msg_id"]
        out = []
        while True:
            msg = self.recv(self.iopub, timeout_s)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream" and msg["content"].get("name") == "stdout":
                out.append(msg["content"]["text"])
            elif kind == "status" and msg["content"].get("execution_state") == "idle":
                break
        elapsed = time.perf_counter() - t0
        # The execute_reply, outside the timed part.
        while True:
            reply = self.recv(self.shell, timeout_s)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return elapsed, "".join(out)

    def close(self):
        self.shell.close(0)
        self.iopub.close(0)
        self.ctx.term()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--code", default="print(6*7)")
    ap.add_argument("--expect", default="42\n")
    args = ap.parse_args()

    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    peer = None
    try:
        kc.stop_channels()  # the timed part uses its own synchronous sockets
        peer = Peer(km)
        peer.wait_subscribed()
        for _ in range(args.warmup):
            peer.execute(args.code)
        samples = []
        wrong = 0
        for _ in range(args.n):
            elapsed, out = peer.execute(args.code)
            if out != args.expect:
                wrong += 1
            samples.append(elapsed * 1000.0)
        pid = kernel_pid(km)
        result = {
            "samples_ms": samples,
            "wrong_output": wrong,
            "kernel_pid": pid,
            "kernel_pss_bytes": pss_bytes(pid) if pid else None,
            "versions": {
                "python": sys.version.split()[0],
                "jupyter_client": jupyter_client.__version__,
                "ipykernel": ipykernel.__version__,
                "pyzmq": zmq.__version__,
            },
        }
        print(json.dumps(result), flush=True)
    finally:
        if peer is not None:
            peer.close()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
