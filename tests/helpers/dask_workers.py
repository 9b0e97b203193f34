"""A Dask scheduler with real ``dask worker`` processes of chosen names and resources, which a
test can kill one by one (a lost host) and start again."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping


def start_worker(address: str, name: str, resources: str) -> subprocess.Popen[bytes]:
    """``dask worker`` named ``name`` advertising ``resources`` ("GPU=1 CPU=2"), 2 threads."""
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                             "--nthreads", "2", "--no-dashboard", "--resources", resources],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def scheduler_with(workers: Mapping[str, str]) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """(the scheduler's address, name -> worker process) once every worker registered; all
    stopped on exit (a test may replace a process in the dict: the replacement is stopped too)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster:
        procs = {name: start_worker(cluster.scheduler_address, name, res) for name, res in workers.items()}
        try:
            with Client(cluster.scheduler_address) as client:
                client.wait_for_workers(len(procs), timeout=60)
            yield cluster.scheduler_address, procs
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(timeout=30)
