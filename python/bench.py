"""Hot exec round trip through the Python SDK: ``run_code("print(6*7)")`` over one kept-alive
connection, repeated; prints p50/p90/p99 (target: p50 <= 4 ms).

    PYTHONPATH=python /usr/bin/python3 python/bench.py                 # server at PODFLARE_HOST
    PYTHONPATH=python /usr/bin/python3 python/bench.py --start-server  # starts one (tests/server.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from podflare import Client, Sandbox  # noqa: E402


def percentile(sorted_ms: list, p: float) -> float:
    if not sorted_ms:
        return float("nan")
    k = max(0, min(len(sorted_ms) - 1, int(round(p / 100 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=None, help="server URL (default: PODFLARE_HOST or http://127.0.0.1:7070)")
    ap.add_argument("--api-key", default=None, help="API key (default: PODFLARE_API_KEY)")
    ap.add_argument("-n", type=int, default=1000, help="measured round trips (default 1000)")
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured round trips first (default 50)")
    ap.add_argument("--start-server", action="store_true", help="start a server for the run (needs the built CLI)")
    args = ap.parse_args()

    server = None
    host, key = args.host, args.api_key
    if args.start_server:
        from tests.server import TestServer

        server = TestServer().start()
        host, key = server.url, None
    try:
        client = Client(host=host, api_key=key)
        with Sandbox(client=client) as sbx:
            for _ in range(args.warmup):
                sbx.run_code("print(6*7)")
            times = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                r = sbx.run_code("print(6*7)")
                times.append((time.perf_counter() - t0) * 1000)
                if r.stdout != "42\n":
                    print(f"unexpected output: {r!r}", file=sys.stderr)
                    return 1
        times.sort()
        p50 = percentile(times, 50)
        print(f"run_code('print(6*7)') x{args.n} over a kept-alive connection ({client.host}):")
        print(f"  p50 {p50:.2f} ms  p90 {percentile(times, 90):.2f} ms  p99 {percentile(times, 99):.2f} ms  "
              f"min {times[0]:.2f} ms  mean {statistics.fmean(times):.2f} ms  max {times[-1]:.2f} ms")
        print(f"  TCP connections opened: {client.connections_opened}")
        print(f"  target p50 <= 4 ms: {'met' if p50 <= 4 else 'NOT met'}")
        client.close()
        return 0
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
