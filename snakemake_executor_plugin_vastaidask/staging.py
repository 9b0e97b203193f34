"""Content-addressed file staging over the Dask connection (client side).

Every file a job needs (the workflow's source archive, each input) is named by its
SHA-256. The bytes enter the cluster once per run under the key ``vastaidask-blob-<sha>``
(scattered to a worker when one is registered, else as a task holding them, which the
first worker to arrive computes); a job's payload names only the hashes and keys. On
the worker (``remote.py``) a blob already in the worker's disk cache is used as is, so a
worker that has a file never receives it twice; a missing one is gathered from the
cluster by key. Results come back as a tar that is unpacked here with tarfile's ``data``
filter and restamped, so outputs are never older than their inputs.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOB_PREFIX = "vastaidask-blob-"


def remote_function() -> Any:
    """``remote.run_job`` compiled under a module name nobody can import: it travels by value.

    The scheduler unpickles task graphs, and neither it (on a remote machine) nor the
    workers can be assumed to import this plugin; cloudpickle carries a function by value
    exactly when its module is not importable.
    """
    source_path = Path(__file__).with_name("remote.py")
    module = types.ModuleType("snakemake_vastaidask_remote_by_value")
    module.__file__ = str(source_path)
    exec(compile(source_path.read_text(), str(source_path), "exec"), module.__dict__)  # noqa: S102
    return module.run_job


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StagedInput:
    """One input as the worker rebuilds it: workdir-relative path, blob hash, file or dir."""

    path: str
    sha: str
    kind: str  # "file" | "dir"
    mtime_ns: int


class Stager:
    """Hashes local files, puts each distinct blob into the cluster once, keeps it there."""

    def __init__(self, client: Any, workdir: Path) -> None:
        self.client = client
        self.workdir = workdir
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], tuple[str, bytes | None]] = {}
        self._futures: dict[str, Any] = {}
        self.uploaded_bytes = 0

    # ------------------------------------------------------------- hashing
    def stage_bytes(self, data: bytes) -> str:
        """Put ``data`` into the cluster (once) and return its hash."""
        sha = sha256_bytes(data)
        self._put(sha, data)
        return sha

    def stage_path(self, rel: str) -> StagedInput:
        """Stage a workdir-relative input file or directory; raises with the path when it is missing."""
        path = self.workdir / rel
        if not path.exists():
            raise FileNotFoundError(
                f"input {rel!r} of the job is not on this machine ({path}); with --executor vastaidask "
                "inputs travel from the local disk (or use --default-storage-provider)"
            )
        st = path.stat()
        if path.is_dir():
            data = _tar_dir(path, rel)
            sha = sha256_bytes(data)
            self._put(sha, data)
            return StagedInput(rel, sha, "dir", st.st_mtime_ns)
        ident = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(ident)
        if known is None:
            data = path.read_bytes()
            sha = sha256_bytes(data)
            with self._lock:
                self._hashes[ident] = (sha, None)
            self._put(sha, data)
        else:
            sha = known[0]
            if sha not in self._futures:
                self._put(sha, path.read_bytes())
        return StagedInput(rel, sha, "file", st.st_mtime_ns)

    def key(self, sha: str) -> str:
        return BLOB_PREFIX + sha

    # ------------------------------------------------------------- upload
    def _put(self, sha: str, data: bytes) -> None:
        with self._lock:
            if sha in self._futures:
                return
            key = self.key(sha)
            if self.client.scheduler_info().get("workers"):
                future = self.client.scatter({key: data}, direct=False)[key]
            else:
                # No worker yet (instances booting): the bytes wait in a task that the
                # first worker computes; ``bytes`` is a builtin, importable everywhere.
                future = self.client.submit(bytes, data, key=key, pure=False)
            # Published so that a task can ask for it by name, only on a cache miss
            # (a future passed as an argument would be moved to the worker every time).
            self.client.publish_dataset(future, name=key, override=True)
            self._futures[sha] = future
            self.uploaded_bytes += len(data)

    def release(self) -> None:
        """Unpublish and forget every blob (the run is over)."""
        with self._lock:
            for sha in list(self._futures):
                try:
                    self.client.unpublish_dataset(self.key(sha))
                except Exception:  # noqa: S110 - scheduler already gone at shutdown
                    pass
            self._futures.clear()


def _tar_dir(path: Path, rel: str) -> bytes:
    """A deterministic tar of a directory input (names sorted, times kept) for hashing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                tf.add(full, arcname=str(Path(rel) / full.relative_to(path)), recursive=False)
    return buf.getvalue()


def unpack_results(tar_bytes: bytes, workdir: Path) -> list[str]:
    """Unpack a job's results into the workdir (``data`` filter: no absolute paths, no ``..``)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        names = tf.getnames()
        tf.extractall(workdir, filter="data")
    return names


def restamp(paths: Iterable[str], workdir: Path) -> None:
    """Set outputs' mtimes to now, in the order given (topological): a worker's clock or
    tar's preserved times must not make an output look older than its inputs."""
    for rel in paths:
        p = workdir / rel
        if p.is_dir() and not p.is_symlink():
            for root, _dirs, files in os.walk(p):
                for name in files:
                    os.utime(Path(root) / name, None)
            os.utime(p, None)
        elif p.exists():
            os.utime(p, None)
