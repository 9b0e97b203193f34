"""How much does GPU-demand adaptive scaling bill for a bursty load?

Question (issue 5): 3 bursts of 20 GPU tasks of 10 s, 3-minute gaps, 60 s boot. Report the
billed instance-seconds against the seconds that were unavoidable (busy GPU seconds plus
one boot per rental), and against a baseline run in the same process: a fixed cluster of
``maximum`` instances held from the first submission to the last result, which is what a
user pays without adapt.

    python -m benchmarks.adaptive_bursty [--boot 60] [--gap 180] [--task 10] [--tasks 20] [--maximum 4]

Defaults are the issue's numbers (about 25 minutes of wall time for both runs); smaller
numbers give a quick smoke run. The emulator bills from create to destroy, as Vast does.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path


def run(boot_s: float, gap_s: float, task_s: float, tasks: int, bursts: int, maximum: int,
        adaptive: bool, wait_count: int, interval_s: float) -> dict[str, float]:
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai.emulator import Emulator

    def gpu_task(i: int, seconds: float) -> int:
        import time

        time.sleep(seconds)
        return i

    state = Path(tempfile.mkdtemp(prefix="bursty-"))
    with Emulator(runtime="sandbox", boot_delay_s=boot_s, rate_limits=True, state_dir=state) as emu:
        with VastAICluster(
            gpu="RTX_3090", n=0 if adaptive else maximum, api_url=emu.url, api_key=emu.api_key,
            name="bursty", quiet=True, boot_timeout=boot_s * 4 + 120,
        ) as cluster, Client(cluster) as client:
            if adaptive:
                cluster.adapt(minimum=0, maximum=maximum, interval=f"{interval_s}s", wait_count=wait_count)
            t0 = time.time()
            for b in range(bursts):
                futures = client.map(gpu_task, range(tasks), seconds=task_s, resources={"GPU": 1}, pure=False)
                client.gather(futures)
                # The user keeps the results, not the futures: futures pin their data on the
                # workers, and adapt keeps the last instances holding data a client wants.
                del futures
                if b < bursts - 1:
                    time.sleep(gap_s)
            makespan = time.time() - t0
            if adaptive:
                # Let the idle wait release everything, as a user's session would.
                deadline = time.time() + wait_count * interval_s + boot_s + 120
                while emu.instances() and time.time() < deadline:
                    time.sleep(1)
        meter = emu.meter()
    rentals = len(meter["instances"])
    billed = sum(i["seconds"] for i in meter["instances"])
    busy = bursts * tasks * task_s
    return {"rentals": rentals, "billed_s": billed, "busy_s": busy, "boot_s": rentals * boot_s,
            "makespan_s": makespan, "cost_usd": meter["total_usd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boot", type=float, default=60.0)
    parser.add_argument("--gap", type=float, default=180.0)
    parser.add_argument("--task", type=float, default=10.0)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--maximum", type=int, default=4)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--wait-count", type=int, default=24)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-adaptive", action="store_true")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    common = dict(boot_s=args.boot, gap_s=args.gap, task_s=args.task, tasks=args.tasks, bursts=args.bursts,
                  maximum=args.maximum, wait_count=args.wait_count, interval_s=args.interval)
    ours = fixed = None
    if not args.skip_adaptive:
        ours = run(adaptive=True, **common)
        print(f"adaptive: {ours}")
        unavoidable = ours["busy_s"] + ours["boot_s"]
        print(f"adaptive billed {ours['billed_s']:.0f} instance-s for {ours['busy_s']:.0f} busy + "
              f"{ours['boot_s']:.0f} boot s: ratio {ours['billed_s'] / unavoidable:.2f}")
    if not args.skip_baseline:
        fixed = run(adaptive=False, **common)
        print(f"fixed:    {fixed}")
        print(f"fixed {args.maximum} instances billed {fixed['billed_s']:.0f} instance-s")
    if ours and fixed:
        print(f"adaptive/fixed billed instance-seconds = {ours['billed_s'] / fixed['billed_s']:.2f}")


if __name__ == "__main__":
    main()
