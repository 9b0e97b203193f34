"""Per-job overhead of ``--executor vastaidask`` on a warm pool, against the local executor.

A chain of N trivial jobs (each reads the previous output) run with ``--jobs 1``, so the
makespan is N times the per-job latency (submit -> outputs on disk). Baseline: the same
workflow with ``--cores 1`` (local executor), in the same process. Two pools:

- a warm ``LocalCluster`` attached with ``--vastaidask-scheduler-address`` (staging, Dask
  hand-off and the remote ``python -m snakemake`` included; no SSH tunnels);
- the emulator (one rented sandbox instance, TLS inside SSH tunnels, rate limits on); its
  boot is excluded by taking the median hand-off -> outputs-on-disk latency of the jobs
  after the first, which the executor records per job.

    python -m benchmarks.snakemake_overhead [N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SNAKEFILE = """
N = {n}
rule all:
    input: f"chain/{{N - 1}}.txt"
rule first:
    output: "chain/0.txt"
    shell: "echo 0 > {{output}}"
rule step:
    input: lambda wc: f"chain/{{int(wc.i) - 1}}.txt"
    output: "chain/{{i}}.txt"
    wildcard_constraints: i="[1-9][0-9]*"
    resources: gpu=1
    shell: "cat {{input}} > {{output}}; echo {{wildcards.i}} >> {{output}}"
"""


def run(workdir: Path, *args: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return elapsed


def warm_latency(workdir: Path) -> float:
    lines = [json.loads(x) for x in (workdir / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    return statistics.median(t["latency_s"] for t in lines[1:])


def main(n: int) -> None:
    from distributed import LocalCluster

    from dask_vastai.emulator import Emulator

    with tempfile.TemporaryDirectory() as tmp:
        wds = {name: Path(tmp, name) for name in ("local", "dask", "emu")}
        for wd in wds.values():
            wd.mkdir()
            (wd / "Snakefile").write_text(SNAKEFILE.format(n=n))
        t_local = run(wds["local"], "--cores", "1", "--resources", "gpu=1")
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                          resources={"GPU": 1, "CPU": 2, "MEMORY": 8e9}) as cluster:
            t_dask = run(wds["dask"], "--executor", "vastaidask", "--jobs", "1",
                         "--vastaidask-scheduler-address", cluster.scheduler_address,
                         "--vastaidask-worker-cache-dir", str(Path(tmp, "cache")))
        with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=Path(tmp, "st")) as emu:
            t_emu = run(wds["emu"], "--executor", "vastaidask", "--jobs", "1",
                        "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                        "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "1",
                        "--vastaidask-min-instances", "1")
        per_local = t_local / n
        lat_dask, lat_emu = warm_latency(wds["dask"]), warm_latency(wds["emu"])
    print(f"{n} chained jobs, --jobs 1. local executor: {t_local:.1f}s in all, {per_local:.2f}s/job")
    print(f"vastaidask, warm LocalCluster: {t_dask:.1f}s in all; median job latency {lat_dask:.2f}s "
          f"(overhead {lat_dask - per_local:.2f}s/job, ratio {lat_dask / per_local:.1f}x)")
    print(f"vastaidask, emulator instance (tunnels+TLS): {t_emu:.1f}s in all incl. boot; median warm job "
          f"latency {lat_emu:.2f}s (overhead {lat_emu - per_local:.2f}s/job, ratio {lat_emu / per_local:.1f}x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
