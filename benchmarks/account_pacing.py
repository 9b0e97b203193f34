"""Two clusters and a `dask-vastai ls` loop on one account: shared pacing or 429 back-off?

Question (issue 11): Vast rate-limits the account, not the process. Two clusters of the same
user and a `dask-vastai ls` loop beside them must neither fail nor show a 429. Compare the two
ways to get there, in one process run each, same emulator settings (strict profile, Vast's
per-endpoint intervals):

* ``shared``: one per-endpoint schedule per account, in a small file every process locks
  (``vastai.api.shared-pacing: true``, the default);
* ``backoff``: each process paces only itself and retries 429s (``shared-pacing: false``).

Reported: the 429s the emulator answered, calls made, how long the two clusters took to come
up and to finish, the `ls` runs and their failures.

    python benchmarks/account_pacing.py [--instances 2] [--ls-seconds 40]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LS_LOOP = textwrap.dedent(
    """
    import subprocess, sys, time
    url, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    end, runs, failures = time.monotonic() + seconds, 0, 0
    while time.monotonic() < end:
        p = subprocess.run([sys.executable, "-m", "dask_vastai.cli", "ls", "--api-url", url, "--api-key", key],
                           capture_output=True, text=True)
        runs += 1
        failures += p.returncode != 0
    print("RUNS", runs, "FAILURES", failures)
    """
)


def run(shared: bool, instances: int, ls_seconds: float) -> dict[str, float]:
    import dask.config
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai.emulator import Emulator

    def square(x: int) -> int:
        return x * x

    cache = tempfile.mkdtemp(prefix="pacing-cache-")
    env = {**os.environ, "XDG_CACHE_HOME": cache, "DASK_VASTAI__API__SHARED_PACING": str(shared).lower(),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    os.environ["XDG_CACHE_HOME"] = cache
    state = Path(tempfile.mkdtemp(prefix="pacing-"))
    with Emulator(runtime="sandbox", boot_delay_s=0.5, rate_limits=True, state_dir=state, profile="strict",
                  variants={"direct_blocked": "none", "proxy_broken": "none"}) as emu:
        loop = subprocess.Popen([sys.executable, "-c", LS_LOOP, emu.url, emu.api_key, str(ls_seconds)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        up: dict[str, float] = {}

        def one(name: str) -> int:
            started = time.monotonic()
            with VastAICluster(gpu="RTX_3090", n=instances, api_url=emu.url, api_key=emu.api_key, name=name,
                               boot_timeout=240, quiet=True) as cluster, Client(cluster) as client:
                up[name] = time.monotonic() - started
                return sum(client.gather(client.map(square, range(10), resources={"GPU": 1})))

        started = time.monotonic()
        with dask.config.set({"vastai.api.shared-pacing": shared}), ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, ["one", "two"]))
        elapsed = time.monotonic() - started
        out, _ = loop.communicate(timeout=ls_seconds + 120)
        runs, failures = map(int, re.search(r"RUNS (\d+) FAILURES (\d+)", out).groups())  # type: ignore[union-attr]
        requests = emu.requests
    assert results == [285, 285]
    return {"429s": sum(r["status"] == 429 for r in requests), "calls": len(requests),
            "up_s": max(up.values()), "both_s": elapsed, "ls_runs": runs, "ls_failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2, help="instances per cluster")
    parser.add_argument("--ls-seconds", type=float, default=40.0, help="how long the ls loop runs")
    args = parser.parse_args()
    print("| pacing | 429s | calls | both clusters up | both done | ls runs | ls failures |")
    print("|---|---|---|---|---|---|---|")
    for shared in (True, False):
        r = run(shared, args.instances, args.ls_seconds)
        print(f"| {'shared file' if shared else 'per process + back-off'} | {r['429s']} | {r['calls']} | "
              f"{r['up_s']:.1f} s | {r['both_s']:.1f} s | {r['ls_runs']} | {r['ls_failures']} |", flush=True)


if __name__ == "__main__":
    main()
