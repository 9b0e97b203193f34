"""Staging pieces of the ``vastaidask`` executor that need no cluster: the worker's cache
(quota, least-recently-used eviction, path safety), the by-value job function, the command."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from snakemake_executor_plugin_vastaidask import remote
from snakemake_executor_plugin_vastaidask.executor import strip_directory
from snakemake_executor_plugin_vastaidask.staging import remote_function, restamp


def test_directory_is_stripped_from_the_job_command() -> None:
    cmd = "python -m snakemake --snakefile 'Snakefile' --directory '/home/u/my wf' --cores all --mode 'remote'"
    assert strip_directory(cmd) == "python -m snakemake --snakefile 'Snakefile' --cores all --mode 'remote'"
    assert "--directory" not in strip_directory("python -m snakemake --directory wf2 --mode remote")


def test_cache_evicts_least_recently_used_under_the_quota(tmp_path: Path) -> None:
    blobs = str(tmp_path)
    for i, sha in enumerate(["a" * 64, "b" * 64, "c" * 64]):
        assert remote._cache_put(blobs, sha, bytes(400), None, quota_bytes=1200)
        os.utime(tmp_path / sha, (time.time() - 100 + i, time.time() - 100 + i))
    # "a" is the oldest; using it (as _blob_to does on a hit) makes "b" the least recent
    os.utime(tmp_path / ("a" * 64))
    assert remote._cache_put(blobs, "d" * 64, bytes(400), None, quota_bytes=1200)
    left = sorted(p.name[0] for p in tmp_path.iterdir())
    assert left == ["a", "c", "d"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 1200
    # a blob larger than the whole quota is not cached (and evicts nothing)
    assert not remote._cache_put(blobs, "e" * 64, bytes(2000), None, quota_bytes=1200)
    assert sorted(p.name[0] for p in tmp_path.iterdir()) == ["a", "c", "d"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside", "a/../../outside"])
def test_staged_paths_cannot_leave_the_job_directory(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="staged path"):
        remote._safe_join(str(tmp_path), bad)


def test_job_function_travels_by_value() -> None:
    fn = remote_function()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(fn)  # not importable by reference...
    blob = cloudpickle.dumps(fn)  # ...so cloudpickle (and distributed) carry its code
    probe = (
        "import sys, cloudpickle; sys.modules['snakemake_executor_plugin_vastaidask'] = None; "
        "f = cloudpickle.loads(sys.stdin.buffer.read()); print(f.__name__, f.__globals__['LOG_TAIL_CHARS'])"
    )
    out = subprocess.run([sys.executable, "-c", probe], input=blob, capture_output=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["run_job", str(remote.LOG_TAIL_CHARS)]


def test_restamp_makes_outputs_newer_than_inputs(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("y")
    old = time.time() - 3600
    os.utime(tmp_path / "d" / "f", (old, old))
    restamp(["d"], tmp_path)
    assert (tmp_path / "d" / "f").stat().st_mtime > (tmp_path / "in.txt").stat().st_mtime - 1
