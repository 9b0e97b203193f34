"""How much does GPU-demand adaptive scaling bill for a bursty load?

Question (issues 5 and 14): bursts of 20 GPU tasks of 10 s with gaps between them, 60 s
boot. Both runs are timed from the first submission:

* fixed: ``scale(maximum)`` at the first submission (its boot included), held to the last
  result, which is what a user pays without adapt;
* adapt: ``adapt(0, maximum)`` with its defaults (an idle instance goes once idle as long
  as the pool's measured boot time: the ski-rental break-even).

Billed instance-seconds come from the emulator's meter (create to destroy, as Vast bills),
read at the last result for both runs (the user's script closes the cluster there); the
adaptive run then stays open until adapt released everything, and that bill is reported
too. The offline optimum is computed from the adaptive run's own events: busy GPU-seconds
(the tasks' own start and end) + the first boot of each instance (measured rent to
registration) + for every gap and instance min(gap, boot), the gap being the time from a
burst's last result to the next submission.

    python -m benchmarks.adaptive_bursty [--boot 60] [--gap 180] [--task 10] [--tasks 20] [--maximum 4]

Defaults are the issue's numbers (about 21 minutes of wall time for both runs with 3-minute
gaps, 9 with ``--gap 20``); ``--scale 0.5`` halves boot, gaps and tasks together.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def gpu_task(i: int, seconds: float) -> tuple[float, float]:
    import time

    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def billed_s(emu: Any) -> tuple[int, float]:
    """Rentals so far and their instance-seconds, from the marketplace's meter."""
    meter = emu.meter()
    return len(meter["instances"]), sum(i["seconds"] for i in meter["instances"])


def run(boot_s: float, gap_s: float, task_s: float, tasks: int, bursts: int, maximum: int,
        adaptive: bool, interval_s: float | None, wait_count: int | None) -> dict[str, Any]:
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai.emulator import Emulator

    state = Path(tempfile.mkdtemp(prefix="bursty-"))
    with Emulator(runtime="sandbox", boot_delay_s=boot_s, rate_limits=True, state_dir=state) as emu:
        with VastAICluster(
            gpu="RTX_3090", n=0, api_url=emu.url, api_key=emu.api_key, name="bursty", quiet=True,
            boot_timeout=boot_s * 4 + 120,
        ) as cluster, Client(cluster) as client:
            adapt = None
            if adaptive:
                options = {} if interval_s is None else {"interval": f"{interval_s}s"}
                adapt = cluster.adapt(minimum=0, maximum=maximum, wait_count=wait_count, **options)
            bursts_log = []
            busy_s = 0.0
            t0 = time.time()
            if not adaptive:
                cluster.scale(maximum)
            for b in range(bursts):
                submitted = time.time()
                futures = client.map(gpu_task, range(tasks), seconds=task_s, resources={"GPU": 1}, pure=False)
                spans = client.gather(futures)
                # The user keeps the results, not the futures: futures pin their data on the
                # workers, and adapt keeps the last instances holding data a client wants.
                del futures
                bursts_log.append((submitted - t0, time.time() - t0))
                busy_s += sum(end - start for start, end in spans)
                if b < bursts - 1:
                    time.sleep(gap_s)
            makespan = time.time() - t0
            rentals, billed = billed_s(emu)
            out: dict[str, Any] = {
                "rentals": rentals, "billed_s": billed, "busy_s": busy_s, "makespan_s": makespan,
                "bursts": bursts_log, "boots_s": list(cluster.pools.boot_times_s.get("default", [])),
            }
            if adapt is not None:
                # Left open: adapt releases everything once idle for the break-even.
                deadline = time.time() + 4 * boot_s + 300
                while emu.instances() and time.time() < deadline:
                    time.sleep(1)
                out["billed_open_s"] = billed_s(emu)[1]
                out["decisions"] = [(round(t - t0, 1), d) for t, d, _ in adapt.log]
    return out


def optimum_s(run: dict[str, Any], maximum: int) -> dict[str, float]:
    """Busy + first boot + sum over gaps of min(gap, boot) per instance, from the run's events."""
    boots = run["boots_s"]
    boot = statistics.median(boots)
    first_boots = sum(boots[:maximum])
    gaps = [nxt[0] - cur[1] for cur, nxt in zip(run["bursts"], run["bursts"][1:], strict=False)]
    idle = sum(min(gap, boot) for gap in gaps) * maximum
    return {"optimum_s": run["busy_s"] + first_boots + idle, "boot_s": boot, "first_boots_s": first_boots,
            "gaps_s": gaps, "gap_cost_s": idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boot", type=float, default=60.0)
    parser.add_argument("--gap", type=float, default=180.0)
    parser.add_argument("--task", type=float, default=10.0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies boot, gap and task together")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--maximum", type=int, default=4)
    parser.add_argument("--interval", type=float, default=None, help="adapt interval (default: vastai.yaml's)")
    parser.add_argument("--wait-count", type=int, default=None, help="default: the boot-time break-even")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-adaptive", action="store_true")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    common = dict(boot_s=args.boot * args.scale, gap_s=args.gap * args.scale, task_s=args.task * args.scale,
                  tasks=args.tasks, bursts=args.bursts, maximum=args.maximum, interval_s=args.interval,
                  wait_count=args.wait_count)
    print(f"settings: {common}")
    fixed = ours = None
    if not args.skip_baseline:
        fixed = run(adaptive=False, **common)
        print(f"fixed:    {fixed}", flush=True)
    if not args.skip_adaptive:
        ours = run(adaptive=True, **common)
        print(f"adaptive: {ours}", flush=True)
        best = optimum_s(ours, args.maximum)
        print(f"offline optimum from the adaptive run's events: {best}")
        print(f"adaptive: {ours['rentals']} rentals ({ours['rentals'] - args.maximum} re-boots), billed "
              f"{ours['billed_s']:.0f} instance-s to the last result ({ours['billed_open_s']:.0f} left open "
              f"until released); / optimum = {ours['billed_s'] / best['optimum_s']:.2f} "
              f"({ours['billed_open_s'] / best['optimum_s']:.2f} left open)")
    if fixed and ours:
        print(f"fixed {args.maximum}: billed {fixed['billed_s']:.0f} instance-s, makespan {fixed['makespan_s']:.0f} s")
        print(f"adaptive/fixed: billed {ours['billed_s'] / fixed['billed_s']:.3f} "
              f"({ours['billed_open_s'] / fixed['billed_s']:.3f} left open), "
              f"makespan {ours['makespan_s'] / fixed['makespan_s']:.3f}")


if __name__ == "__main__":
    main()
