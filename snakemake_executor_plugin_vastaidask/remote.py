"""What runs on the Dask worker for one Snakemake job (or one group of jobs).

The worker cannot be assumed to import this plugin (a rented instance gets the client's
interpreter and site-packages, not its development checkout), so this module is
self-contained: standard library and ``distributed`` only, every helper referenced from
``run_job``. ``staging.remote_function()`` re-executes this file's source under a module
name that is not importable, which makes cloudpickle (and the scheduler, which unpickles
task graphs) carry ``run_job`` and its helpers *by value*.

One job's life on the worker:

1. Make a scratch directory; copy the sources archive and every input into it from the
   worker's content-addressed cache (``<cache>/blobs/<sha256>``). A blob missing from the
   cache arrived as a task dependency (blobs still in a task when the job was handed over)
   or is fetched under the key the client gave it, from the worker holding it: the
   scheduler's ``who_has`` and the holder's ``get_data``, over this worker's own
   connections. It is written to the cache (evicting least recently used blobs beyond the
   disk quota) and reported back as "fetched": a worker that already has a file never
   receives it again.
2. Run ``python -m snakemake ... --mode remote`` (the client's command) in its own process
   group, with the client's interpreter first on ``PATH`` and the job's environment. The
   task polls its own key on its worker: once the client cancels it (or the worker
   closes), the process group is killed (Dask's cancellation alone lets a running
   subprocess finish).

No client is made here (no ``get_client()``, ``Event`` or dataset): a dask-vastai cluster
lets its hosts act only as workers, and this code must run there without the cluster's
``allow_worker_clients``.
3. Pack the outputs, logs and benchmarks of every job of the group (on failure: whatever
   logs exist) into a tar returned with the exit code and the tail of the job's output.
   Produced files enter the cache too, so a consumer placed on the same worker needs no copy.
"""

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Any

#: Runs the job's shell as its child and kills the whole process group when the worker that
#: started it is gone (a SIGKILLed or crashed worker cannot kill it itself): its parent changes.
WATCHDOG = (
    "import os, signal, subprocess, sys\n"
    "parent = int(sys.argv[1])\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "while True:\n"
    "    try:\n"
    "        rc = child.wait(timeout=1.0)\n"
    "        sys.exit(rc if rc >= 0 else 128 - rc)\n"
    "    except subprocess.TimeoutExpired:\n"
    "        if os.getppid() != parent:\n"
    "            os.killpg(0, signal.SIGKILL)\n"
)
LOG_TAIL_CHARS = 8000
FULL_LOG_CAP_BYTES = 2_000_000
CANCEL_POLL_S = 0.5
KILL_GRACE_S = 5.0
#: how long a blob may be held by no worker (moving between workers) before the job fails
BLOB_WAIT_S = 60.0


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_size(blobs: str) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of every cached blob; mtime is the last use (LRU order)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(blobs):
            if entry.is_file() and not entry.name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    out.append((st.st_mtime, st.st_size, entry.path))
    return out


def _evict_for(blobs: str, incoming: int, quota_bytes: int) -> int:
    """Delete least recently used blobs until ``incoming`` more bytes fit under the quota."""
    entries = sorted(_cache_size(blobs))
    total = sum(size for _, size, _ in entries)
    evicted = 0
    for _, size, path in entries:
        if total + incoming <= quota_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            total -= size
            evicted += 1
    return evicted


def _cache_put(blobs: str, sha: str, data: bytes | None, src_path: str | None, quota_bytes: int) -> bool:
    """Store a blob (bytes or a file to copy); False when it is larger than the whole quota."""
    size = len(data) if data is not None else os.path.getsize(src_path or "")
    if size > quota_bytes:
        return False
    _evict_for(blobs, size, quota_bytes)
    part = os.path.join(blobs, f"{sha}.{os.getpid()}.{time.monotonic_ns()}.part")
    if data is not None:
        with open(part, "wb") as f:
            f.write(data)
    else:
        shutil.copyfile(src_path or "", part)
    os.replace(part, os.path.join(blobs, sha))
    return True


def _fetch_blob(key: str) -> Any:
    """The value of a staged blob's key, from the worker holding it, asked over this worker's
    own connections (the scheduler's ``who_has``, the holder's ``get_data``), never a client."""
    import asyncio

    from distributed import get_worker
    from distributed.utils import sync
    from distributed.worker import get_data_from_worker

    worker = get_worker()

    async def fetch() -> Any:
        deadline = time.monotonic() + BLOB_WAIT_S
        while True:
            if key in worker.data:
                return worker.data[key]
            holders = (await worker.scheduler.who_has(keys=[key])).get(key) or []
            for address in holders:
                response = await get_data_from_worker(worker.rpc, [key], address, who=worker.address)
                if response.get("status") == "OK" and key in response.get("data", {}):
                    return response["data"][key]
            if time.monotonic() > deadline:
                raise LookupError(
                    f"staged blob {key} is held by no worker (asked the scheduler for {BLOB_WAIT_S:.0f}s); "
                    "the client releases blobs only when no job needs them"
                )
            await asyncio.sleep(0.5)

    return sync(worker.loop, fetch)


def _blob_to(blobs: str, sha: str, key: str, dest: str, quota_bytes: int, stats: dict[str, Any],
             delivered: dict[str, Any]) -> None:
    """Put blob ``sha`` at ``dest``: from the cache when present, else from the cluster once
    (``delivered``: blobs that came as task dependencies)."""
    cached = os.path.join(blobs, sha)
    lock_path = os.path.join(blobs, f"{sha}.lock")
    # One fetch per blob per worker even when several of its jobs start together.
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                shutil.copyfile(cached, dest)
                os.utime(cached)  # last use, for LRU
                stats["hits"] += 1
                return
            except FileNotFoundError:
                pass
            data = delivered[sha] if sha in delivered else _fetch_blob(key)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"staged blob {key} arrived as {type(data).__name__}, expected bytes")
            data = bytes(data)
            if hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"staged blob {key} does not hash to {sha}: refusing a corrupt input")
            stats["fetched"].append([sha, len(data)])
            if not _cache_put(blobs, sha, data, None, quota_bytes):
                stats["uncached"] += 1
            with open(dest, "wb") as f:
                f.write(data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _safe_join(root: str, rel: str) -> str:
    """``root/rel`` refusing absolute paths and ``..`` escapes (inputs come from a manifest)."""
    if os.path.isabs(rel):
        raise ValueError(f"staged path {rel!r} is absolute; only workdir-relative files travel")
    path = os.path.normpath(os.path.join(root, rel))
    if path != root and not path.startswith(root + os.sep):
        raise ValueError(f"staged path {rel!r} leaves the job directory")
    return path


def _extract(tar_path: str, dest: str) -> None:
    mode = "r:xz" if tar_path.endswith(".xz") else "r:*"
    with tarfile.open(tar_path, mode) as tf:
        tf.extractall(dest, filter="data")


def _pack(root: str, rels: list[str]) -> tuple[bytes, list[str]]:
    """A tar of the workdir-relative ``rels`` that exist (directories recursively)."""
    buf = io.BytesIO()
    missing = []
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for rel in dict.fromkeys(rels):
            path = _safe_join(root, rel)
            if os.path.lexists(path):
                tf.add(path, arcname=rel, recursive=True)
            else:
                missing.append(rel)
    return buf.getvalue(), missing


def _cache_outputs(root: str, rels: list[str], blobs: str, quota_bytes: int) -> None:
    """Produced files enter the cache, so a consumer on this worker gets them without a copy."""
    for rel in rels:
        path = _safe_join(root, rel)
        if os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                sha = _sha256_file(path)
                if not os.path.exists(os.path.join(blobs, sha)):
                    _cache_put(blobs, sha, None, path, quota_bytes)


def _cancelled() -> bool:
    """Whether the client cancelled this task (its key left this worker) or the worker closes."""
    try:
        from distributed import get_worker
        from distributed.utils import thread_state

        worker = get_worker()
        key = thread_state.key
    except (ImportError, ValueError, AttributeError):  # run outside a worker (tests of this module)
        return False
    if worker.status.name in ("closing", "closed", "failed"):
        return True
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=KILL_GRACE_S)


def _worker_identity() -> tuple[str, str]:
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.address), str(w.name)
    except Exception:  # run outside a worker (tests of this module)
        return "local", "local"


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one staged Snakemake job on this worker; see the module docstring."""
    t0 = time.monotonic()
    address, name = _worker_identity()
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    cache_root = os.path.expanduser(payload.get("cache_dir") or "~/.cache/snakemake-vastaidask")
    base = os.path.join(cache_root, f"worker-{safe_name}")
    blobs = os.path.join(base, "blobs")
    os.makedirs(blobs, exist_ok=True)
    quota = int(payload["cache_quota_bytes"])
    stats: dict[str, Any] = {"hits": 0, "fetched": [], "uncached": 0}
    delivered = payload.get("blobs") or {}
    scratch = os.path.join(base, "jobs", payload["key"])
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    result: dict[str, Any] = {"worker": address, "worker_name": name, "rc": None, "cancelled": False}
    try:
        if payload["sources"] is not None:  # None in bucket mode: the job deploys them itself
            src = os.path.join(scratch, ".vastaidask-sources.tar.xz")
            _blob_to(blobs, payload["sources"], payload["blob_keys"][payload["sources"]], src, quota, stats, delivered)
            _extract(src, scratch)
            os.unlink(src)
        for rel, sha, kind, mtime_ns in payload["inputs"]:
            dest = _safe_join(scratch, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if kind == "dir":  # a tar whose member names are workdir-relative
                tmp = os.path.join(scratch, f".vastaidask-{sha}.tar")
                _blob_to(blobs, sha, payload["blob_keys"][sha], tmp, quota, stats, delivered)
                os.makedirs(dest, exist_ok=True)
                _extract(tmp, scratch)
                os.unlink(tmp)
            else:
                _blob_to(blobs, sha, payload["blob_keys"][sha], dest, quota, stats, delivered)
            os.utime(dest, ns=(mtime_ns, mtime_ns))
        env = dict(os.environ)
        env.update(payload.get("env") or {})
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["VASTAIDASK_WORKER_CACHE"] = base  # persistent conda/apptainer prefixes live here
        log_path = os.path.join(base, "jobs", payload["key"] + ".out")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(os.getpid()), "/bin/sh", "-c", payload["command"]],
                cwd=scratch, env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            # No overall timeout here on purpose: a job runs as long as its rule needs;
            # the loop ends when the process ends or the client cancels (or vanishes).
            next_check = time.monotonic() + CANCEL_POLL_S
            while proc.poll() is None:
                time.sleep(0.05)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CANCEL_POLL_S
                    if _cancelled():
                        result["cancelled"] = True
                        _kill_group(proc)
                        break
            # A job's own children (a script's subprocesses) die with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        result["rc"] = proc.returncode
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - FULL_LOG_CAP_BYTES))
            text = f.read().decode(errors="replace")
        os.unlink(log_path)
        result["output"] = text
        result["log_tail"] = text[-LOG_TAIL_CHARS:]
        wanted = payload["outputs"] + payload["logs"] if proc.returncode == 0 else payload["logs"]
        result["tar"], result["missing"] = _pack(scratch, wanted)
        if proc.returncode == 0:
            _cache_outputs(scratch, payload["outputs"], blobs, quota)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        result["cache"] = stats
        result["seconds"] = time.monotonic() - t0
    return result
