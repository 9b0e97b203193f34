"""A Snakemake job that runs until it is killed, and how a test sees whether a process lives."""

from __future__ import annotations

import os
from pathlib import Path


def long_job(workdir: Path) -> Path:
    """A Snakefile whose one GPU job starts a child sleeping 300 s; the file the child's pid goes to."""
    pidfile = workdir / "remote.pid"
    (workdir / "Snakefile").write_text(
        f'rule long:\n    output: "x"\n    resources: gpu=1\n'
        f'    shell: "sleep 300 & echo $! > {pidfile}; wait"\n'
    )
    return pidfile


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
