"""fork(5) of a parent holding a 200 MB DataFrame, timed at the Python SDK (bench/fork-python.ts).

Prints one line: ``fork5 p50 <ms> ms p99 <ms> ms n <runs>``. Stdlib only (with python/ on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import time

from podflare import Client, Sandbox

DF_CODE = 'import numpy as np, pandas as pd\ndf = pd.DataFrame(np.random.rand(3_276_800, 8))\nprint(df.shape)'


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--host', required=True)
    ap.add_argument('-n', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=2)
    args = ap.parse_args()
    client = Client(host=args.host)
    times = []
    with Sandbox(client=client) as parent:
        assert parent.run_code(DF_CODE, timeout_ms=180_000, request_timeout=200).stdout == '(3276800, 8)\n'
        for i in range(args.warmup + args.n):
            time.sleep(0.5)  # the previous children's teardown out of the way, as the TS measure waits for it
            t0 = time.perf_counter()
            kids = parent.fork(5)
            ms = (time.perf_counter() - t0) * 1000
            for k in kids:
                k.close()
            if i >= args.warmup:
                times.append(ms)
    times.sort()
    p = lambda q: times[min(len(times) - 1, max(0, int(q / 100 * len(times) + 0.5) - 1))]  # noqa: E731
    print(f'fork5 p50 {p(50):.2f} ms p99 {p(99):.2f} ms n {len(times)}')
    client.close()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
