"""A child process's peak memory, and large incompressible input files, for tests and benchmarks
of the client's memory (the child is the client: ``python -m snakemake`` with the plugin)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: Runs its arguments as a child and writes the child's peak RSS (kB) to the file named first.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def run_measured(args: list[str], cwd: Path, env: Mapping[str, str],
                 timeout: float) -> tuple[subprocess.CompletedProcess[str], int]:
    """(the finished run, its peak RSS in bytes): ``ru_maxrss`` of a wrapper's only child, so
    nothing else this process started counts."""
    with tempfile.NamedTemporaryFile(prefix="peak-rss-") as out:
        run = subprocess.run([sys.executable, "-c", _WRAPPER, out.name, *args], cwd=cwd, env=dict(env),
                             capture_output=True, text=True, timeout=timeout)
        return run, int(Path(out.name).read_text() or 0) * 1024


def random_file(path: Path, size_mb: int) -> str:
    """``size_mb`` MB that do not compress (one random MB, each copy numbered); their SHA-256."""
    whole = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mb):
            data = i.to_bytes(4, "little") + block[4:]
            whole.update(data)
            f.write(data)
    return whole.hexdigest()
