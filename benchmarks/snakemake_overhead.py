"""Per-job overhead of ``--executor vastaidask`` on a warm pool, against the local executor.

A chain of N trivial jobs (each reads the previous output) run with ``--jobs 1``, so the
makespan is N times the per-job latency (submit -> outputs on disk). Baseline: the same
workflow with ``--cores 1`` (local executor), in the same process. The pool is a warm
``LocalCluster`` attached with ``--vastaidask-scheduler-address`` (staging, Dask hand-off
and the remote ``python -m snakemake`` are all included; SSH tunnels are not).

    python benchmarks/snakemake_overhead.py [N]
"""

from __future__ import annotations

import os
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


def main(n: int) -> None:
    from distributed import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        local_wd, dask_wd = Path(tmp, "local"), Path(tmp, "dask")
        for wd in (local_wd, dask_wd):
            wd.mkdir()
            (wd / "Snakefile").write_text(SNAKEFILE.format(n=n))
        t_local = run(local_wd, "--cores", "1", "--resources", "gpu=1")
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                          resources={"GPU": 1, "CPU": 2, "MEMORY": 8e9}) as cluster:
            t_dask = run(dask_wd, "--executor", "vastaidask", "--jobs", "1",
                         "--vastaidask-scheduler-address", cluster.scheduler_address,
                         "--vastaidask-worker-cache-dir", str(Path(tmp, "cache")))
    print(f"{n} chained jobs: local executor {t_local:.1f}s ({t_local / n:.2f}s/job), "
          f"vastaidask warm pool {t_dask:.1f}s ({t_dask / n:.2f}s/job)")
    print(f"overhead per job: {(t_dask - t_local) / n:.2f}s; ratio vastaidask/local = {t_dask / t_local:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
