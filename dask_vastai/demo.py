"""``dask-vastai demo``: the user story on an embedded emulator, with no setup.

It starts a local Vast marketplace (real sandboxes running OpenSSH and real ``dask
worker`` processes), rents GPU workers from it exactly as from console.vast.ai, runs GPU
tasks on them, and shows what was rented, what it cost and that nothing is left billing.
"""

from __future__ import annotations

import logging
import socket
import sys
import time


def run_demo(*, instances: int = 2, tasks: int = 20, gpu: str = "RTX_3090") -> int:
    """Run the demo; returns the process exit code (0 when every check passed)."""
    from distributed import Client

    def gpu_task(i: int) -> tuple[int, str, str]:
        """What a GPU task on a worker sees: its GPU slot and the box's nvidia-smi."""
        import os
        import subprocess

        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        return i * i, os.environ.get("CUDA_VISIBLE_DEVICES", "?"), smi

    from .cluster import VastAICluster
    from .emulator import Emulator

    # The story is told here; distributed's INFO lines (scheduler start, each connection) are noise.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    print(f"dask-vastai demo: a local Vast marketplace, {instances} x {gpu} workers, {tasks} GPU tasks\n")
    t0 = time.monotonic()
    with Emulator(boot_delay_s=2.0) as emu:
        print(f"emulator: {emu.url} (runtime: {emu.runtime_name})")
        with VastAICluster(
            gpu=gpu, n=instances, api_url=emu.url, api_key=emu.api_key, name="demo", boot_timeout=180
        ) as cluster, Client(cluster) as client:
            print(f"\n{instances} instance(s) registered after {time.monotonic() - t0:.1f}s")
            for row in cluster.instances:
                print(f"  instance {row['id']}: {row['gpu']}, ${row['dph']:.3f}/h, workers {row['workers']}")
            for w in client.scheduler_info()["workers"].values():
                print(f"  worker {w['name']}: resources {w['resources']}")
            futures = client.map(gpu_task, range(tasks), resources={"GPU": 1}, pure=False)
            results = client.gather(futures)
            ok = [r[0] for r in results] == [i * i for i in range(tasks)]
            where = sorted({(r[1], r[2]) for r in results})
            print(f"\n{tasks} GPU tasks: results {'correct' if ok else 'WRONG'}; ran on GPUs {where}")
            print(f"cluster: {cluster!r}")
        cost = cluster.cost  # after close: every rental destroyed, the meter stopped
        meter = emu.meter()
        left = emu.instances()
        print(f"\ncost by the cluster: ${cost:.5f}; billed by the marketplace: ${meter['total_usd']:.5f}")
        print(f"rentals left billing: {len(left)}")
        print(f"host: {socket.gethostname()}, total {time.monotonic() - t0:.1f}s")
        if not ok or left:
            print("demo FAILED", file=sys.stderr)
            return 1
    print("demo passed")
    return 0
