"""Jobs forked from each worker's warm runner, and the fresh start where that cannot be used.

A ``LocalCluster`` of real worker processes stands in for the pool (attach mode). What the
user sees: each job's log (``.snakemake/vastaidask/logs/``) says how it started and, for a
fresh start, why; outputs are right either way; a warm job's processes descend from a
runner that is a child of its own worker (one runner per worker, never shared); Ctrl-C and
a killed worker take the job's whole process group, and nothing of the runner outlives its
worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.checkout import checkout_env
from tests.helpers.long_job import alive, long_job
from tests.helpers.waiting import eventually, wait_until

RUNNER_MARK = "The warm runner"
WARM = "vastaidask: started warm"
PLAIN = "vastaidask: started plain"

_THREE_JOBS = """
rule all:
    input: expand("out/{i}.txt", i=range(3))
rule work:
    output: "out/{i}.txt"
    resources: gpu=1
    shell: "echo $(basename $VASTAIDASK_WORKER_CACHE) {wildcards.i} $(basename $PWD) > {output}"
"""


def snakemake(workdir: Path, address: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "2",
         "--vastaidask-scheduler-address", address,
         "--vastaidask-worker-cache-dir", str(workdir / "cache"), *args],
        cwd=workdir, env={**checkout_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def job_logs(workdir: Path) -> list[str]:
    """Every job log the executor wrote (whatever the layout below ``logs/``)."""
    return [p.read_text() for p in sorted((workdir / ".snakemake" / "vastaidask" / "logs").rglob("*.log"))]


def starts(workdir: Path) -> list[dict]:
    path = workdir / ".snakemake" / "vastaidask" / "transfers.jsonl"
    return [json.loads(line)["start"] for line in path.read_text().splitlines()]


def runners_of(worker_pid: int) -> list[psutil.Process]:
    """The warm runners among a worker process's children."""
    out = []
    for child in psutil.Process(worker_pid).children():
        try:
            if any(RUNNER_MARK in arg for arg in child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def worker_pids(address: str) -> list[int]:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return list(client.run(os.getpid).values())


def test_jobs_start_warm_by_default_one_runner_per_worker(dask_pool: str, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(_THREE_JOBS)
    run = snakemake(tmp_path, dask_pool)
    assert run.returncode == 0, run.stderr[-4000:]
    for i in range(3):
        # the job's environment (the worker's cache, set per job) and working directory are its own
        cache, index, cwd = (tmp_path / "out" / f"{i}.txt").read_text().split()
        assert cache in ("worker-0", "worker-1") and index == str(i)
        assert cwd.startswith("smk-"), cwd
    logs = job_logs(tmp_path)
    assert len(logs) == 3
    for log in logs:
        assert log.startswith(WARM), log[:500]
        assert PLAIN not in log
        assert "Finished jobid" in log  # the remote snakemake's own output follows
    assert {s["mode"] for s in starts(tmp_path)} == {"warm"}
    # one runner per worker that ran a job, a child of that worker, none shared
    pids = worker_pids(dask_pool)
    runners = {pid: runners_of(pid) for pid in pids}
    assert all(len(r) <= 1 for r in runners.values()), runners
    assert sum(len(r) for r in runners.values()) >= 1
    for runner in (r for rs in runners.values() for r in rs):
        # reachable only through the socketpair its worker passed down: no port, no named socket
        assert runner.net_connections(kind="inet") == []
        assert all(not c.laddr and not c.raddr for c in runner.net_connections(kind="unix"))
    # a second run on the same pool reuses the runners: no new process per job
    before = {r.pid for rs in runners.values() for r in rs}
    again = snakemake(tmp_path, dask_pool, "--forceall")
    assert again.returncode == 0, again.stderr[-4000:]
    after = {r.pid for pid in pids for r in runners_of(pid)}
    assert before <= after and all(len(runners_of(pid)) <= 1 for pid in pids)


def assert_started_plain(workdir: Path, why: str) -> None:
    assert len(list((workdir / "out").glob("*.txt"))) == 3
    for log in job_logs(workdir):
        first = log.splitlines()[0]
        assert first.startswith(PLAIN) and why in first, first
        assert WARM not in log
    assert {s["mode"] for s in starts(workdir)} == {"plain"}


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--vastaidask-no-warm-start"], "--vastaidask-no-warm-start"),
        (["--sdm", "apptainer"], "--software-deployment-method apptainer"),
    ],
    ids=["no-warm-start", "sdm-apptainer"],
)
def test_fresh_start_where_warm_cannot_be_used_says_why(dask_pool: str, tmp_path: Path, args: list[str],
                                                        why: str) -> None:
    (tmp_path / "Snakefile").write_text(_THREE_JOBS)
    run = snakemake(tmp_path, dask_pool, *args)
    assert run.returncode == 0, run.stderr[-4000:]
    assert_started_plain(tmp_path, why)


def test_a_job_whose_interpreter_would_start_differently_starts_fresh(dask_pool: str, tmp_path: Path) -> None:
    """The runner imported under the worker's environment; a job seeing another PYTHON*
    variable (read by an interpreter as it starts) gets an interpreter of its own."""
    from distributed import Client

    warm_up = tmp_path / "warm-up"
    warm_up.mkdir()
    (warm_up / "Snakefile").write_text(_THREE_JOBS)
    assert snakemake(warm_up, dask_pool).returncode == 0  # both workers' runners started
    with Client(dask_pool, set_as_default=False) as client:
        client.run(lambda: os.environ.update(PYTHONWARNINGS="ignore::DeprecationWarning"))
        try:
            (tmp_path / "Snakefile").write_text(_THREE_JOBS)
            run = snakemake(tmp_path, dask_pool)
        finally:
            client.run(lambda: os.environ.pop("PYTHONWARNINGS", None))
    assert run.returncode == 0, run.stderr[-4000:]
    assert_started_plain(tmp_path, "the job's PYTHONWARNINGS differs from the warm runner's")


def _started_job(workdir: Path, address: str) -> tuple[subprocess.Popen[str], int, psutil.Process]:
    """snakemake running the long job; the job's ``sleep`` and the runner it was forked from."""
    pidfile = long_job(workdir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
         "--vastaidask-scheduler-address", address, "--vastaidask-worker-cache-dir", str(workdir / "cache")],
        cwd=workdir, env=checkout_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 90, "the job to start on a worker")
    sleeper = int(pidfile.read_text())
    ancestors = psutil.Process(sleeper).parents()
    # a forked job keeps its runner's command line: the runner is the outermost of them
    marked = [p for p in ancestors if any(RUNNER_MARK in a for a in p.cmdline())]
    assert marked, f"the job was not forked from a warm runner: {[p.cmdline()[:3] for p in ancestors]}"
    runner = marked[-1]
    # its own session and process group, led by the forked job (the runner's child)
    job = next(p for p in ancestors if p.ppid() == runner.pid)
    assert os.getsid(sleeper) == job.pid == os.getpgid(sleeper)
    return proc, sleeper, runner


def test_ctrl_c_kills_a_warm_jobs_process_group_and_the_runner_stays(dask_pool: str, tmp_path: Path) -> None:
    proc, sleeper, runner = _started_job(tmp_path, dask_pool)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if not eventually(lambda: not alive(sleeper), 20, interval_s=0.2):
            pytest.fail(f"the warm job's child {sleeper} outlived Ctrl-C")
        assert alive(runner.pid), "the runner serves the worker's next jobs"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_runner_killed_mid_job_takes_the_job_and_the_next_job_starts_warm_again(dask_pool: str, tmp_path: Path) -> None:
    proc, sleeper, runner = _started_job(tmp_path, dask_pool)
    try:
        runner.kill()
        if not eventually(lambda: not alive(sleeper), 20, interval_s=0.2):
            pytest.fail(f"the warm job's child {sleeper} outlived its runner")
        assert proc.wait(timeout=60) != 0
        (log,) = job_logs(tmp_path)
        assert "the warm runner vanished while the job ran" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "Snakefile").write_text('rule a:\n    output: "y"\n    resources: gpu=1\n    shell: "touch {output}"\n')
    again = snakemake(tmp_path, dask_pool)
    assert again.returncode == 0, again.stderr[-3000:]
    assert starts(tmp_path)[-1]["mode"] == "warm"


def test_a_killed_worker_takes_its_warm_job_and_runner_with_it(tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      resources={"GPU": 1, "CPU": 1, "MEMORY": 8e9}) as cluster:
        (worker_pid,) = worker_pids(cluster.scheduler_address)
        proc, sleeper, runner = _started_job(tmp_path, cluster.scheduler_address)
        try:
            assert runner.ppid() == worker_pid, "the runner is its own worker's child"
            os.kill(worker_pid, signal.SIGKILL)
            if not eventually(lambda: not alive(sleeper), 20, interval_s=0.2):
                pytest.fail(f"the warm job's child {sleeper} outlived its SIGKILLed worker")
            if not eventually(lambda: not alive(runner.pid), 20, interval_s=0.2):
                pytest.fail(f"the warm runner {runner.pid} outlived its SIGKILLed worker")
        finally:
            proc.kill()
            proc.wait(timeout=30)


def test_a_closed_worker_stops_its_runner(tmp_path: Path) -> None:
    from distributed import LocalCluster

    (tmp_path / "Snakefile").write_text('rule a:\n    output: "y"\n    resources: gpu=1\n    shell: "touch {output}"\n')
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      resources={"GPU": 1, "CPU": 1, "MEMORY": 8e9}) as cluster:
        (worker_pid,) = worker_pids(cluster.scheduler_address)
        run = snakemake(tmp_path, cluster.scheduler_address)
        assert run.returncode == 0, run.stderr[-3000:]
        (runner,) = runners_of(worker_pid)
    if not eventually(lambda: not alive(runner.pid), 20, interval_s=0.2):
        pytest.fail(f"the warm runner {runner.pid} outlived its closed worker")


def test_a_failure_shows_the_jobs_own_lines_not_the_warm_start_note() -> None:
    from snakemake_executor_plugin_vastaidask.joblog import job_output

    log = "vastaidask: started warm (forked from this worker's warm snakemake runner)\nCUDA out of memory\n"
    assert job_output(log, "smk-x-1-1") == "CUDA out of memory"
    plain = "vastaidask: started plain (a fresh python -m snakemake): --vastaidask-no-warm-start\nboom\n"
    assert "started plain" in job_output(plain, "smk-x-1-1"), "a fresh start's reason stays in view"
