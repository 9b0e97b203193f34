"""Content-addressed file staging over the Dask connection (client side).

Every file a job needs (the workflow's source archive, each input) is named by its
SHA-256. The bytes enter the cluster once per run under the key ``vastaidask-blob-<sha>``
(scattered to a worker when one is registered, else as a task holding them, which the
first worker to arrive computes); a job's payload names only the hashes and keys, never
a blob's future (a dependency would keep a GPU job out of the demand that rents
instances while the blob task waits for a worker). On the worker (``remote.py``)
a blob already in the worker's disk cache is used as is, so a worker that has a file
never receives it twice; a missing one is fetched by key from the worker holding it,
through that worker's own connections (no client runs on a worker). Results come back as a tar that is unpacked here with tarfile's ``data``
filter and restamped, so outputs are never older than their inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterable
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
    """Hashes local files and keeps each blob in the cluster while a job that needs it is active.

    Every ``stage_*`` call takes a reference on the blob for the job being prepared and
    ``release`` drops the job's references; a blob nobody references leaves the cluster's
    memory (the workers' disk caches keep it), so idle instances hold no data the adaptive
    policy would have to keep them for, and a 1 GB input does not sit in RAM all run long.
    A blob needed again later is put again: only workers whose cache lacks it receive it.
    """

    def __init__(self, client: Any, workdir: Path) -> None:
        self.client = client
        self.workdir = workdir
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._futures: dict[str, Any] = {}
        self._refs: Counter[str] = Counter()
        self.uploaded_bytes = 0

    # ------------------------------------------------------------- staging
    def stage_bytes(self, data: bytes, sha: str | None = None) -> str:
        """Reference ``data`` for one job (putting it into the cluster if absent); its hash."""
        sha = sha or sha256_bytes(data)
        self._acquire(sha, lambda: data)
        return sha

    def stage_path(self, rel: str) -> StagedInput:
        """Reference a workdir-relative input file or directory for one job."""
        path = self.workdir / rel
        if not path.exists():
            raise FileNotFoundError(
                f"input {rel!r} of the job is not on this machine ({path}); with --executor vastaidask "
                "inputs travel from the local disk"
            )
        st = path.stat()
        if path.is_dir():
            data = _tar_dir(path, rel)
            return StagedInput(rel, self.stage_bytes(data), "dir", st.st_mtime_ns)
        ident = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            sha = self._hashes.get(ident)
        if sha is None:
            data = path.read_bytes()
            sha = sha256_bytes(data)
            with self._lock:
                self._hashes[ident] = sha
            self._acquire(sha, lambda: data)
        else:
            self._acquire(sha, path.read_bytes)
        return StagedInput(rel, sha, "file", st.st_mtime_ns)

    def key(self, sha: str) -> str:
        return BLOB_PREFIX + sha

    def release(self, shas: Iterable[str]) -> None:
        """Drop one job's references; blobs nobody references leave the cluster's memory."""
        with self._lock:
            for sha in shas:
                self._refs[sha] -= 1
                if self._refs[sha] <= 0:
                    del self._refs[sha]
                    self._drop(sha)

    def release_all(self) -> None:
        """Forget every blob (the run is over)."""
        with self._lock:
            for sha in list(self._futures):
                self._drop(sha)
            self._refs.clear()

    # ------------------------------------------------------------- upload
    def _acquire(self, sha: str, load: Callable[[], bytes]) -> None:
        with self._lock:
            self._refs[sha] += 1
            future = self._futures.get(sha)
            if future is not None and future.status not in ("error", "lost", "cancelled"):
                return
            data = load()
            key = self.key(sha)
            if self.client.scheduler_info().get("workers"):
                future = self.client.scatter({key: data}, direct=False)[key]
            else:
                # No worker yet (instances booting): the bytes wait in a task that the
                # first worker computes; ``bytes`` is a builtin, importable everywhere.
                future = self.client.submit(bytes, data, key=key, pure=False)
            # A job names it by key and fetches it only on a cache miss (a future passed as
            # an argument would be moved to the worker every time).
            self._futures[sha] = future
            self.uploaded_bytes += len(data)

    def _drop(self, sha: str) -> None:
        future = self._futures.pop(sha, None)
        if future is not None:
            with contextlib.suppress(Exception):
                future.release()


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
