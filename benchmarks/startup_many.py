"""How long N instances take from ``VastAICluster(n=N)`` to every worker registered.

Question (issue 14, start-up): with the emulator's boot delay 0 and Vast's rate limits on,
the broker used to write each rental's label with its own paced call (1 s apart) and start
watching only once all were written: 16 instances took 24 s, 15 s of it labelling. Now the
rentals are watched and booted while their labels are written. Reported: the time to all
registered, when the last label was written, and the API calls of the run per endpoint,
with the list calls per second of the start-up (they must stay flat in N: one poller).

    python -m benchmarks.startup_many [--instances 16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path
from typing import Any


def run(n: int) -> dict[str, Any]:
    return asyncio.run(_run(n))


async def _run(n: int) -> dict[str, Any]:
    from dask_vastai import VastAICluster
    from dask_vastai.emulator import Emulator

    state = Path(tempfile.mkdtemp(prefix="startup-"))
    emu = Emulator(runtime="sandbox", boot_delay_s=0, rate_limits=True, state_dir=state, profile="strict")
    await emu.start()
    try:
        # Vast's undocumented answers stay strict (a bulk create answered {"success": true}: its
        # rentals are found under the batch label); the host faults, which measure other paths
        # (a silent direct port, a proxy mended by a reboot), are off.
        emu.variants.set(destroy_linger_s=0, direct_blocked="none", proxy_broken="none",
                         bulk_destroy_survivors="none")
        started = time.monotonic()
        t0 = time.time()
        cluster = VastAICluster(gpu="RTX_3090", n=n, api_url=emu.url, api_key=emu.api_key, name="startup",
                                quiet=True, boot_timeout=300, asynchronous=True)
        # When each instance first reached each phase (seconds from the start).
        phases: dict[str, float] = {}

        async def sample() -> None:
            while True:
                for row in list(cluster.instances) if cluster.broker is not None else []:
                    phases.setdefault(str(row.phase), time.monotonic() - started)
                    key = f"{row.phase}:{row.name}"
                    phases.setdefault(key, time.monotonic() - started)
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            await cluster
            up_s = time.monotonic() - started
            up_at = time.time()
            assert len(cluster.scheduler_info["workers"]) == n, cluster.scheduler_info
        finally:
            sampler.cancel()
            await cluster.close()
        calls = [r for r in emu.requests if t0 <= r["time"] <= up_at]
        by_endpoint = collections.Counter(r["endpoint"] for r in calls)
        labels = [r["time"] for r in calls if r["endpoint"] == "update" and r["method"] == "PUT"]
        lists = [r for r in calls if r["endpoint"] == "list"]
        spans = {e: (min(r["time"] for r in calls if r["endpoint"] == e) - t0,
                     max(r["time"] for r in calls if r["endpoint"] == e) - t0) for e in by_endpoint}
        firsts = {p: t for p, t in phases.items() if ":" not in p}
        lasts = {}
        for key, t in phases.items():
            if ":" in key:
                phase = key.split(":", 1)[0]
                lasts[phase] = max(lasts.get(phase, 0.0), t)
        return {
            "spans": spans,
            "phases": {p: (firsts[p], lasts.get(p, firsts[p])) for p in firsts},
            "registered_s": up_s,
            "last_label_s": (max(labels) - t0) if labels else 0.0,
            "list_per_s": len(lists) / max(up_s, 1e-9),
            "calls": sum(by_endpoint.values()),
            "by_endpoint": dict(by_endpoint),
            "429s": sum(1 for r in calls if r["status"] == 429),
        }
    finally:
        await emu.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeline", action="store_true", help="print when each endpoint was first and last called")
    args = parser.parse_args()
    for k in range(args.rounds):
        r = run(args.instances)
        print(f"round {k + 1}: {args.instances} instances registered in {r['registered_s']:.1f} s; last label "
              f"written at {r['last_label_s']:.1f} s; {r['list_per_s']:.2f} list calls/s; {r['calls']} calls "
              f"{r['by_endpoint']}; 429s: {r['429s']}", flush=True)
        if args.timeline:
            for endpoint, (first, last) in sorted(r["spans"].items(), key=lambda kv: kv[1]):
                print(f"    {endpoint:8} {first:6.1f} s .. {last:6.1f} s")
            for phase, (first, last) in sorted(r["phases"].items(), key=lambda kv: kv[1]):
                print(f"    {phase:17} first at {first:5.1f} s, last instance at {last:5.1f} s")


if __name__ == "__main__":
    main()
