"""The ``vastaidask`` executor against an existing Dask cluster (``--vastaidask-scheduler-address``).

A ``LocalCluster`` whose workers advertise GPU/CPU/MEMORY stands in for the pool; the
workers run each job in their own scratch directory (``--directory`` is stripped), so
every output the user sees went through the staging, never through a shared directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.checkout import EXAMPLE, checkout_env
from tests.helpers.long_job import alive, long_job
from tests.helpers.waiting import eventually


def snakemake(workdir: Path, *args: str, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env={**checkout_env(), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def _vastaidask(address: str, cache: Path, jobs: int = 4) -> list[str]:
    return ["--executor", "vastaidask", "--jobs", str(jobs), "--vastaidask-scheduler-address", address,
            "--vastaidask-worker-cache-dir", str(cache)]


def _transfers(workdir: Path) -> list[dict]:
    path = workdir / ".snakemake" / "vastaidask" / "transfers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_snakemake_help_and_local_runs_with_the_plugin_installed(tmp_path: Path) -> None:
    out = snakemake(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    assert "--vastaidask-scheduler-address" in out.stdout
    assert "--vastaidask-no-datacenter" in out.stdout
    (tmp_path / "Snakefile").write_text('rule a:\n    output: "a.txt"\n    shell: "echo local > {output}"\n')
    run = snakemake(tmp_path, "--cores", "1")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.txt").read_text() == "local\n"


@pytest.mark.slow
def test_example_pipeline_staged_over_dask(dask_pool: str, tmp_path: Path) -> None:
    wd = tmp_path / "wf"
    shutil.copytree(EXAMPLE, wd)
    cache = tmp_path / "cache"
    run = snakemake(wd, *_vastaidask(dask_pool, cache), "--config", "samples=4")
    assert run.returncode == 0, run.stderr[-4000:]
    assert (wd / "results" / "summary.txt").read_text().count("evaluated") == 4
    for i in range(4):
        assert f"sample={i} " in (wd / "train" / f"{i}.txt").read_text()
        assert (wd / "logs" / "train" / f"{i}.log").exists(), "logs of group members come back"
    # nothing was written into the workdir by the jobs themselves: they ran in the cache's scratch
    assert not list(cache.glob("*/jobs/*")), "scratch directories are removed after each job"
    # the shared 1 MB input reached each worker at most once
    import hashlib

    shared_sha = hashlib.sha256((wd / "prepared" / "shared.bin").read_bytes()).hexdigest()
    fetches = Counter(
        t["worker_name"] for t in _transfers(wd) for sha, _n in t["fetched"] if sha == shared_sha
    )
    assert all(n <= 1 for n in fetches.values()), fetches
    assert len(_transfers(wd)) == 1 + 4 + 1  # prepare, 4 groups (train+evaluate), aggregate
    # outputs are never older than their inputs after the restamp
    assert (wd / "results/summary.txt").stat().st_mtime_ns >= (wd / "eval/3.txt").stat().st_mtime_ns
    again = snakemake(wd, *_vastaidask(dask_pool, cache), "--config", "samples=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


_FLAKY = textwrap.dedent(
    """
    rule all:
        input: "out.txt"

    rule flaky:
        output: "out.txt"
        log: "flaky.log"
        resources:
            gpu=1,
            att=lambda wildcards, attempt: attempt,
        shell:
            "echo attempt {resources.att} > {log}; "
            "if [ {resources.att} -lt 2 ]; then echo 'CUDA out of memory (simulated)' >&2; exit 3; fi; "
            "echo ok > {output}"
    """
)


@pytest.mark.slow
def test_failing_job_log_reaches_the_user_and_retries_succeed(dask_pool: str, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(_FLAKY)
    failed = snakemake(tmp_path, *_vastaidask(dask_pool, tmp_path / "cache"))
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    assert "CUDA out of memory (simulated)" in text
    assert "exited with code" in text
    assert (tmp_path / "flaky.log").read_text() == "attempt 1\n", "the failed job's log comes back"
    # settings also come from SNAKEMAKE_VASTAIDASK_* environment variables
    retried = snakemake(
        tmp_path, "--executor", "vastaidask", "--jobs", "2", "--retries", "1",
        "--vastaidask-worker-cache-dir", str(tmp_path / "cache"),
        env={"SNAKEMAKE_VASTAIDASK_SCHEDULER_ADDRESS": dask_pool},
    )
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text() == "ok\n"


def test_job_no_worker_can_run_fails_with_the_resources(dask_pool: str, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(
        'rule big:\n    output: "x"\n    resources: gpu=8\n    shell: "touch {output}"\n'
    )
    run = snakemake(tmp_path, *_vastaidask(dask_pool, tmp_path / "cache"), timeout=60)
    assert run.returncode != 0
    assert "no worker" in run.stderr and "'GPU': 8.0" in run.stderr, run.stderr[-3000:]


def test_sigint_kills_the_remote_process_group(dask_pool: str, tmp_path: Path) -> None:
    pidfile = long_job(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", *_vastaidask(dask_pool, tmp_path / "cache")],
        cwd=tmp_path, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        eventually(lambda: pidfile.exists() and pidfile.read_text().strip(), 60, interval_s=0.2)
        assert pidfile.exists(), "the job never started on the worker"
        pid = int(pidfile.read_text())
        os.kill(pid, 0)  # running
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if not eventually(lambda: not alive(pid), 20, interval_s=0.2):
            pytest.fail(f"the job's child {pid} outlived Ctrl-C")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_worker_takes_its_job_with_it(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    pidfile = long_job(tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      resources={"GPU": 1, "CPU": 1, "MEMORY": 8e9}) as cluster, Client(cluster) as client:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", *_vastaidask(cluster.scheduler_address, tmp_path / "cache")],
            cwd=tmp_path, env=checkout_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            eventually(lambda: pidfile.exists() and pidfile.read_text().strip(), 60, interval_s=0.2)
            pid = int(pidfile.read_text())
            worker_pid = next(iter(client.run(os.getpid).values()))
            os.kill(worker_pid, signal.SIGKILL)
            if not eventually(lambda: not alive(pid), 20, interval_s=0.2):
                pytest.fail(f"the job's child {pid} outlived its SIGKILLed worker")
        finally:
            proc.kill()
            proc.wait(timeout=30)
