"""Per-job overhead of ``--executor vastaidask`` on a warm pool, against the local executor.

A chain of N trivial jobs (each reads the previous output) run with ``--jobs 1``, so the
makespan is N times the per-job latency (submit -> outputs on disk). Baseline: the same
workflow with ``--cores 1`` (local executor), in the same process: its per-job time is its
whole run over N, start-up included, as the issue measured it (0.35 s for N=8). A
stricter view is printed too: the marginal cost of one more job in the chain,
(T(N) - T(1)) / (N - 1), for the local executor and for each pool (snakemake's own
scheduling and the status loop included). Pools, all in this one run:

- a warm ``LocalCluster`` attached with ``--vastaidask-scheduler-address`` (staging, Dask
  hand-off and the remote job start included; no SSH tunnels), once with the default warm
  start (each worker forks jobs from its warm runner) and once with
  ``--vastaidask-no-warm-start`` (a fresh ``python -m snakemake`` per job, the old way);
- the emulator (one rented sandbox instance, TLS inside SSH tunnels, rate limits on), warm.

Boots and the runner's own start are excluded (a one-job run starts the runner before
the timed runs; the emulator's latencies are those of the jobs after the first). The
median hand-off -> outputs-on-disk latency is what the executor records per job
(``.snakemake/vastaidask/transfers.jsonl``, with the worker-side seconds and how each job
started).

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
from collections import Counter
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


def job_lines(workdir: Path) -> list[dict]:
    path = workdir / ".snakemake/vastaidask/transfers.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def summary(workdir: Path) -> tuple[float, float, Counter[str]]:
    """(median latency, median worker-side seconds) of the jobs after the first; start modes."""
    lines = job_lines(workdir)
    later = lines[1:]
    modes = Counter((t.get("start") or {}).get("mode", "?") for t in lines)
    return (statistics.median(t["latency_s"] for t in later),
            statistics.median(t["seconds"] for t in later), modes)


def main(n: int) -> None:
    from distributed import LocalCluster

    from dask_vastai.emulator import Emulator

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        def chain(name: str, jobs: int) -> Path:
            wd = Path(tmp, name)
            wd.mkdir()
            (wd / "Snakefile").write_text(SNAKEFILE.format(n=jobs))
            return wd

        local = ["--cores", "1", "--resources", "gpu=1"]
        t = {"local": run(chain("local", n), *local), "local1": run(chain("local1", 1), *local)}
        wds = {}
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                          resources={"GPU": 1, "CPU": 2, "MEMORY": 8e9}) as cluster:
            pool = ["--executor", "vastaidask", "--jobs", "1",
                    "--vastaidask-scheduler-address", cluster.scheduler_address,
                    "--vastaidask-worker-cache-dir", str(Path(tmp, "cache"))]
            run(chain("warm-up", 1), *pool)  # the worker's runner starts here: a warm pool from now on
            for name, extra in (("warm", []), ("plain", ["--vastaidask-no-warm-start"])):
                wds[name] = chain(name, n)
                t[name] = run(wds[name], *pool, *extra)
                t[name + "1"] = run(chain(name + "1", 1), *pool, *extra)
        with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=Path(tmp, "st")) as emu:
            wds["emu"] = chain("emu", n)
            t["emu"] = run(wds["emu"], "--executor", "vastaidask", "--jobs", "1",
                           "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                           "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "1",
                           "--vastaidask-min-instances", "1")
        rows = {name: summary(wds[name]) for name in ("warm", "plain", "emu")}
    per_local = t["local"] / n

    def marginal(name: str) -> float:
        return (t[name] - t[name + "1"]) / (n - 1)

    labels = {"warm": "warm LocalCluster, warm start (default)",
              "plain": "warm LocalCluster, --vastaidask-no-warm-start (the old start)",
              "emu": "emulator instance (tunnels+TLS), warm start"}
    print(f"{n} chained jobs, --jobs 1; load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"local executor: {t['local']:.1f}s in all, {per_local:.2f}s/job; marginal {marginal('local'):.3f}s/job "
          f"(runs of {n} and 1 jobs)")
    for name, (latency, seconds, modes) in rows.items():
        print(f"{labels[name]}: {t[name]:.1f}s in all; median job latency {latency:.2f}s "
              f"({seconds:.2f}s of it on the worker), {latency / per_local:.1f}x the local executor's "
              f"{per_local:.2f}s/job; starts {dict(modes)}")
        if name + "1" in t:
            print(f"    marginal {marginal(name):.3f}s/job, {marginal(name) / marginal('local'):.1f}x the local "
                  f"executor's, overhead over it {marginal(name) - marginal('local'):.3f}s/job")
    print(f"warm vs plain start, same pool: median job latency {rows['plain'][0] / rows['warm'][0]:.1f}x, "
          f"marginal {marginal('plain') / marginal('warm'):.1f}x smaller")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
