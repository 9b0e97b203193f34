"""Scheduler preload for benchmarks: the wall-clock time each worker registered, one JSON
line per worker appended to the file named by ``$VASTAIDASK_BENCH_REGISTRATIONS``.

The Snakemake executor's scheduler lives inside the ``snakemake`` process; a benchmark sees
its registrations by starting that process with
``DASK_DISTRIBUTED__SCHEDULER__PRELOAD='["benchmarks.registrations"]'`` (Dask's own
preload mechanism), without a line of product code for it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

ENV = "VASTAIDASK_BENCH_REGISTRATIONS"


class Registrations(SchedulerPlugin):
    def __init__(self, path: str) -> None:
        self.path = path

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"worker": worker, "t": time.time()}) + "\n")


def dask_setup(scheduler: Any) -> None:
    if os.environ.get(ENV):
        scheduler.add_plugin(Registrations(os.environ[ENV]))


def read(path: str | os.PathLike[str]) -> list[float]:
    """The registration times in a file the plugin wrote, earliest first."""
    try:
        with open(path) as f:
            return sorted(json.loads(line)["t"] for line in f if line.strip())
    except FileNotFoundError:
        return []
