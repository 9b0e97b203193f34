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
   cache is fetched under the key the client gave it, from the worker holding it: the
   scheduler's ``who_has`` and the holder's ``get_data``, over this worker's own
   connections (waiting, outside the worker's thread pool, for a blob still in the task
   that holds it until a worker computes it). It is written to the cache (evicting least recently used blobs beyond the
   disk quota) and reported back as "fetched": a worker that already has a file never
   receives it again.
2. Run ``python -m snakemake ... --mode remote`` (the client's command) in its own process
   group, with the client's interpreter first on ``PATH`` and the job's environment. By
   default it is forked from this worker's warm runner (``warm_runner.py``: a process that
   has already imported snakemake and its plugins, started on the worker's first job and
   gone with the worker), which saves the 2-3 s an interpreter takes to import them; where
   that cannot be used (see ``_warm_refusal``) the command starts as a fresh process, and
   the job's log says which and why. The task polls its own key on its worker: once the
   client cancels it (or the worker closes), the process group is killed (Dask's
   cancellation alone lets a running subprocess finish).

No client is made here (no ``get_client()``, ``Event`` or dataset): a dask-vastai cluster
lets its hosts act only as workers, and this code must run there without the cluster's
``allow_worker_clients``.
3. Pack the outputs, logs and benchmarks of every job of the group (on failure: whatever
   logs exist) into a tar returned with the exit code and the tail of the job's output;
   outputs that do not fit in the tar's budget (``inline_bytes``) move to this worker's
   outbox instead, named in the result by hash, size and chunk hashes, and the client pulls
   them chunk by chunk (``outbox_chunk``), then has the outbox deleted (``outbox_discard``).
   Produced files that a later job consumes enter the cache too, so a consumer placed on the
   same worker needs no copy (the others leave no copy on the worker once the client has them);
   the outputs the client marks ``keep_remote`` (intermediates) stay only there: the result
   names them (hash, size, chunk hashes) and ``serve_chunk`` hands their chunks to the worker
   of a later job that needs them.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
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
#: a chunk's copies the client may send (``staging.MAX_RESENDS``), and where a worker asks for
#: one again (``staging.RESEND_TOPIC``): this module cannot import staging
MAX_RESENDS = 3
RESEND_TOPIC = "vastaidask-resend"
#: an outbox (outputs waiting for the client to pull them) older than this lost its client
OUTBOX_MAX_AGE_S = 24 * 3600.0


def _source_of(name: str) -> str:
    """The text of a file next to this module, read where the module is executed (the client):
    it travels with the functions that reference it."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)) as f:
        return f.read()


#: the warm runner's program, run as ``python -c`` on the worker
WARM_RUNNER_SOURCE = _source_of("warm_runner.py")
#: its worker extension's name: a worker kept across runs starts a new runner for new code
WARM_RUNNER_NAME = "vastaidask-warm-runner-" + hashlib.sha256(
    (WARM_RUNNER_SOURCE + _source_of("remote.py")).encode()
).hexdigest()[:12]
#: seconds the runner may take to import snakemake and its plugins (a busy instance)
WARM_READY_TIMEOUT_S = 120.0
#: seconds from a job's request to the runner's fork
WARM_FORK_TIMEOUT_S = 30.0
#: a runner that died is started again this many times per worker, then jobs start plainly
WARM_MAX_STARTS = 3
#: environment variables an interpreter reads as it starts (a forked job would not see a change)
WARM_STARTUP_VARS = ("PYTHON", "LD_")


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


def _fetch_blob(key: str, sha: str | None = None) -> Any:
    """The value of a staged blob's key, from the worker holding it, asked over this worker's
    own connections (the scheduler's ``who_has``, the holder's ``get_data``), never a client.

    A blob put before any worker registered sits in a task until a worker computes it, which
    takes a thread of the pool: this task leaves the pool while it waits (``secede``), so a
    worker with one thread is not stuck on itself. (The job does not depend on that task:
    a GPU job waiting on a dependency is invisible to the GPU demand that rents instances.)

    With ``sha`` (a chunk): every copy the client sent is looked for, the newest first
    (``<key>``, ``<key>-r1``, ... as ``staging.chunk_key`` spells them); a copy that does not
    hash to ``sha`` is refused, never asked for again, and the client is asked, on the
    scheduler's event topic ``RESEND_TOPIC``, to send that chunk again (alone).
    """
    import asyncio

    from distributed import get_worker, rejoin, secede
    from distributed.utils import sync
    from distributed.worker import get_data_from_worker

    worker = get_worker()
    keys = [key] if sha is None else [key] + [f"{key}-r{g}" for g in range(1, MAX_RESENDS + 1)]
    newest_first = list(reversed(list(enumerate(keys))))
    refused: set[tuple[str, str]] = set()

    def accept(value: Any, generation: int, source: str) -> bool:
        if sha is None:
            return True
        if isinstance(value, bytes | bytearray | memoryview) and hashlib.sha256(value).hexdigest() == sha:
            return True
        refused.add((keys[generation], source))
        worker.log_event(RESEND_TOPIC, {
            "sha": sha, "generation": generation, "worker": worker.address,
            "why": f"its copy from {source} does not hash to {sha[:12]}",
        })
        return False

    async def fetch() -> Any:
        deadline = time.monotonic() + BLOB_WAIT_S
        while True:
            for generation, k in newest_first:
                if k in worker.data and (k, "here") not in refused:
                    value = worker.data[k]
                    if accept(value, generation, "this worker"):
                        return value
                    deadline = time.monotonic() + BLOB_WAIT_S
            who_has = await worker.scheduler.who_has(keys=keys)
            for generation, k in newest_first:
                for address in who_has.get(k) or []:
                    if (k, address) in refused:
                        continue
                    try:
                        response = await get_data_from_worker(worker.rpc, [k], address, who=worker.address)
                    except OSError:  # the holder went away mid-fetch (CommClosedError): ask again
                        continue
                    if response.get("status") == "OK" and k in response.get("data", {}):
                        value = response["data"][k]
                        if accept(value, generation, address):
                            return value
                        deadline = time.monotonic() + BLOB_WAIT_S
            if time.monotonic() > deadline:
                raise LookupError(
                    f"staged blob {key} is held by no worker (asked the scheduler for {BLOB_WAIT_S:.0f}s); "
                    "the client releases blobs only when no job needs them"
                    + (f"; copies refused as corrupt: {sorted(refused)}" if refused else "")
                )
            await asyncio.sleep(0.5)

    secede()
    try:
        return sync(worker.loop, fetch)
    finally:
        rejoin()


def _blob_to(blobs: str, sha: str, key: str, dest: str, quota_bytes: int, stats: dict[str, Any],
             chunks: list[list[Any]] | None = None, keys: dict[str, str] | None = None) -> None:
    """Put blob ``sha`` at ``dest``: from the cache when present, else from the cluster once
    (chunk by chunk when ``chunks`` names its chunks and ``keys`` their keys)."""
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
            if chunks:
                _assemble(blobs, sha, chunks, keys or {}, dest, quota_bytes, stats)
                return
            data = _fetch_blob(key)
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


def _verified_prefix(part: str, chunks: list[list[Any]]) -> tuple[int, Any]:
    """(how many leading chunks ``part`` already holds intact, the whole-file hash over them):
    an attempt that stopped mid-way (a worker restarted, a chunk never came) resumes there."""
    whole = hashlib.sha256()
    done = 0
    with contextlib.suppress(FileNotFoundError), open(part, "rb") as f:
        for chunk_sha, size in chunks:
            data = f.read(size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != chunk_sha:
                break
            whole.update(data)
            done += 1
    return done, whole


def _assemble(blobs: str, sha: str, chunks: list[list[Any]], keys: dict[str, str], dest: str,
              quota_bytes: int, stats: dict[str, Any]) -> None:
    """A chunked blob fetched one chunk at a time (each checked by ``_fetch_blob``) into
    ``<sha>.chunks.part`` in the cache, after the intact chunks an earlier attempt left there;
    checked whole, then cached and copied to ``dest`` (assembled at ``dest`` itself, uncached,
    when larger than the whole quota)."""
    total = sum(int(size) for _, size in chunks)
    keep = total <= quota_bytes
    part = os.path.join(blobs, f"{sha}.chunks.part") if keep else dest + ".vastaidask.part"
    if keep:
        _evict_for(blobs, total, quota_bytes)
    done, whole = _verified_prefix(part, chunks)
    offset = sum(int(size) for _, size in chunks[:done])
    with open(part, "r+b" if os.path.exists(part) else "wb") as f:
        f.truncate(offset)
        f.seek(offset)
        for chunk_sha, _size in chunks[done:]:
            data = _fetch_blob(keys[chunk_sha], chunk_sha)
            whole.update(data)
            f.write(data)
            stats["chunks"] = stats.get("chunks", 0) + 1
            del data
    if whole.hexdigest() != sha:
        os.unlink(part)
        raise ValueError(f"staged file {sha} assembled from its chunks does not hash to it: refusing a corrupt input")
    stats["fetched"].append([sha, total])
    stats["resumed_chunks"] = stats.get("resumed_chunks", 0) + done
    if keep:
        os.replace(part, os.path.join(blobs, sha))
        shutil.copyfile(os.path.join(blobs, sha), dest)
    else:
        os.replace(part, dest)
        stats["uncached"] += 1


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


def _cache_outputs(root: str, rels: list[str], blobs: str, quota_bytes: int, keep: set[str],
                   chunk_bytes: int, manifests: dict[str, list[Any]] | None = None,
                   uncached: frozenset[str] = frozenset()) -> dict[str, list[Any]]:
    """Produced files enter the cache, so a consumer on this worker gets them without a copy.

    The outputs in ``keep`` (intermediates the client's disk need not hold) stay here: the
    manifest returned names each one cached (``{rel: [sha, size, [[chunk sha, size], ...]]}``),
    and a consumer's worker fetches their chunks from this worker (``serve_chunk``). One that
    could not be cached (over the quota, not a plain file) is not in it, and travels back.
    ``manifests`` receives every plain file's manifest (read once: a 1 GB output is hashed once).
    The outputs in ``uncached`` (no later job consumes them on a worker) are not cached: once the
    client has them, this worker keeps no copy.
    """
    kept: dict[str, list[Any]] = {}
    for rel in rels:
        path = _safe_join(root, rel)
        if os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                sha, size, chunks = _file_manifest(path, chunk_bytes)
                if manifests is not None:
                    manifests[rel] = [sha, size, chunks]
                if rel in uncached and rel not in keep:
                    continue
                cached = os.path.join(blobs, sha)
                if os.path.exists(cached) or _cache_put(blobs, sha, None, path, quota_bytes):
                    if rel in keep and size > 0:
                        kept[rel] = [sha, size, chunks]
    return kept


def _file_manifest(path: str, chunk_bytes: int) -> tuple[str, int, list[list[Any]]]:
    """(sha256, size, [[chunk sha256, size], ...]) of ``path`` in chunks of ``chunk_bytes``
    (``staging.chunk_file``), in one read."""
    whole = hashlib.sha256()
    out = []
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            whole.update(data)
            out.append([hashlib.sha256(data).hexdigest(), len(data)])
    return whole.hexdigest(), sum(size for _, size in out), out


def _outbox_dir(cache_dir: str | None, key: str) -> str:
    """Where this worker keeps job ``key``'s outputs until the client has pulled them."""
    _address, name = _worker_identity()
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    safe_key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    cache_root = os.path.expanduser(cache_dir or "~/.cache/snakemake-vastaidask")
    return os.path.join(cache_root, f"worker-{safe_name}", "outbox", safe_key)


def _stow_outputs(root: str, rels: list[str], manifests: dict[str, list[Any]], outbox: str,
                  inline_bytes: int, chunk_bytes: int) -> dict[str, list[Any]]:
    """Move the outputs that do not fit in the result's tar into ``outbox`` (``<outbox>/<sha>``),
    for the client to pull chunk by chunk (``outbox_chunk``); their manifests, by path.

    The smallest outputs stay inline while their sum fits in ``inline_bytes`` (a pull costs
    round trips); a symlink always travels in the tar. A directory that does not fit is packed
    into a tar in the outbox (its manifest ends with ``"dir"``), which the client unpacks.
    """
    sizes = {rel: manifests[rel][1] for rel in rels if rel in manifests}
    for rel in rels:
        path = _safe_join(root, rel)
        if rel not in sizes and os.path.isdir(path) and not os.path.islink(path):
            sizes[rel] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    stowed: dict[str, list[Any]] = {}
    budget = inline_bytes
    for rel in sorted(sizes, key=lambda r: sizes[r]):
        if sizes[rel] <= budget:
            budget -= sizes[rel]
            continue
        os.makedirs(outbox, exist_ok=True)
        if rel in manifests:
            os.replace(_safe_join(root, rel), os.path.join(outbox, manifests[rel][0]))
            stowed[rel] = manifests[rel]
            continue
        packed = os.path.join(outbox, f"dir-{len(stowed)}.tar")
        with tarfile.open(packed, "w") as tf:
            tf.add(_safe_join(root, rel), arcname=rel, recursive=True)
        sha, size, chunks = _file_manifest(packed, chunk_bytes)
        os.replace(packed, os.path.join(outbox, sha))
        stowed[rel] = [sha, size, chunks, "dir"]
    return stowed


def outbox_chunk(cache_dir: str | None, key: str, sha: str, offset: int, size: int) -> bytes:
    """One chunk of an output this worker keeps for the client (``_stow_outputs``), as a task's
    result. The client checks its hash and size; this worker is not trusted for them."""
    path = os.path.join(_outbox_dir(cache_dir, key), sha)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def outbox_discard(cache_dir: str | None, key: str) -> None:
    """Delete job ``key``'s outbox: the client has its outputs, or gave up on them."""
    shutil.rmtree(_outbox_dir(cache_dir, key), ignore_errors=True)


def _sweep_outboxes(base: str, max_age_s: float) -> None:
    """Delete outboxes no client pulled for ``max_age_s`` (a client that died mid-run)."""
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(os.path.join(base, "outbox")):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > max_age_s:
                    shutil.rmtree(entry.path, ignore_errors=True)


def serve_chunk(cache_dir: str | None, sha: str, offset: int, size: int) -> bytes:
    """One chunk of a file this worker produced and kept in its cache, as a task's result: the
    worker that consumes it fetches it from here (worker to worker, never through the client).
    The consumer checks the chunk's hash; this worker is not trusted for it."""
    _address, name = _worker_identity()
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    cache_root = os.path.expanduser(cache_dir or "~/.cache/snakemake-vastaidask")
    path = os.path.join(cache_root, f"worker-{safe_name}", "blobs", sha)
    try:
        with open(path, "rb") as f:
            os.utime(path)  # last use, for LRU
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the kept output {sha} is no longer in this worker's cache ({path}): evicted under the quota"
        ) from None


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


class _WarmUnavailable(Exception):
    """The warm runner cannot take this job; the message says why (it goes to the job's log)."""


class _RunnerLost(Exception):
    """The warm runner vanished while a job ran (the job's group kills itself then)."""


class _PlainJob:
    """A job started as a fresh process: the watchdog, in a process group of its own."""

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self.proc = proc

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def close(self) -> None:
        self.signal(signal.SIGKILL)  # a job's own children (a script's subprocesses) die with it


class _WarmJob:
    """A job forked by the warm runner, seen through its socket: its pid, then its exit code.

    The runner signals the job's group on request and only while the job is unreaped, so a
    reused pid is never hit; it also kills the group once the job exits, or once this socket
    closes before that.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.pid: int | None = None

    def _message(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            except OSError as e:
                raise _RunnerLost(str(e)) from None
            if not data:
                raise _RunnerLost("its socket closed")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        try:
            self.sock.sendall(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n")
            reply = self._message(WARM_FORK_TIMEOUT_S)
        except (OSError, _RunnerLost) as e:
            raise _WarmUnavailable(f"the warm runner did not take the job ({e})") from None
        if not reply or "pid" not in reply:
            raise _WarmUnavailable(f"the warm runner did not fork the job within {WARM_FORK_TIMEOUT_S:.0f}s: {reply}")
        self.pid = int(reply["pid"])

    def wait(self, timeout: float) -> int | None:
        reply = self._message(timeout)
        return None if reply is None else int(reply["rc"])

    def signal(self, signum: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(json.dumps({"signal": int(signum)}).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


class _WarmRunner:
    """This worker's warm runner (``warm_runner.py``): started on the worker's first job, kept
    in ``worker.extensions`` so that it closes with the worker; it also exits by itself when
    the worker process dies (its end of the socketpair closes). One per worker, never shared.

    A worker outlives a snakemake run, and each run's tasks bring their own copy of this
    module's classes (by value): the object kept on the worker may be another run's copy, so
    what it hands out is built-in (a socket, a reason), never one of its own exceptions.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.env: dict[str, str] = {}
        self.starts = 0
        self.broken: str | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "warm-runner.log")

    def submit(self, env: dict[str, str], log_fd: int) -> tuple[socket.socket | None, str]:
        """(a job socket to the running runner, started here if need be, with the log handed
        over, "") or (None, why the runner cannot take it)."""
        with self.lock:
            try:
                return self._submit(env, log_fd), ""
            except _WarmUnavailable as e:
                return None, str(e)

    def _submit(self, env: dict[str, str], log_fd: int) -> socket.socket:
        self._ensure_running()
        differ = sorted(
            k for k in set(env) | set(self.env)
            if k.startswith(WARM_STARTUP_VARS) and env.get(k) != self.env.get(k)
        )
        if differ:
            raise _WarmUnavailable(
                f"the job's {', '.join(differ)} differs from the warm runner's, and an interpreter reads it as it starts"
            )
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [b"J"], [theirs.fileno(), log_fd])
        except OSError as e:
            ours.close()
            self._stop()
            raise _WarmUnavailable(f"the warm runner stopped taking jobs ({e})") from None
        finally:
            theirs.close()
        return ours

    def _ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            note = f"the warm runner exited with code {self.proc.returncode}"
            self._stop()
            if self.starts >= WARM_MAX_STARTS:
                self.broken = f"{note}, {self.starts} times on this worker (its log: {self.log_path})"
        if self.broken:
            raise _WarmUnavailable(self.broken)
        self.starts += 1
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        try:
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", WARM_RUNNER_SOURCE, str(theirs.fileno()), str(os.getpid())],
                    pass_fds=[theirs.fileno()], cwd=self.base, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
        except OSError as e:
            ours.close()
            raise _WarmUnavailable(f"the warm runner could not start: {e}") from None
        finally:
            theirs.close()
        self.proc, self.control, self.env = proc, ours, env
        job = _WarmJob(ours)  # the same line framing, for the one startup message
        try:
            reply = job._message(WARM_READY_TIMEOUT_S)
        except (_RunnerLost, ValueError):
            reply = {}
        if reply is None or not reply.get("ready"):
            self._stop()
            why = (reply or {}).get("error") or (
                f"not ready within {WARM_READY_TIMEOUT_S:.0f}s" if reply is None else "it exited"
            )
            self.broken = f"the warm runner cannot start: {why} (its log: {self.log_path})"
            raise _WarmUnavailable(self.broken)
        ours.settimeout(None)

    def _stop(self) -> None:
        """Kill the runner (it kills its jobs' groups on SIGTERM) and reap it."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Called by the worker as it closes (``Worker.close`` closes its extensions), on its
        event loop: a job thread holding the lock (the runner still importing) is not waited for."""
        locked = self.lock.acquire(timeout=1.0)
        try:
            self.broken = "this worker is closing"
            self._stop()
        finally:
            if locked:
                self.lock.release()


def _worker_runner(base: str) -> _WarmRunner:
    """This worker's warm runner, registered on first use; ``_WarmUnavailable`` outside a worker."""
    try:
        from distributed import get_worker
        from distributed.utils import sync

        worker = get_worker()
    except (ImportError, ValueError):
        raise _WarmUnavailable("not running in a Dask worker") from None
    runner = worker.extensions.get(WARM_RUNNER_NAME)
    if runner is None:
        async def register() -> Any:  # on the worker's loop: it iterates its extensions there
            return worker.extensions.setdefault(WARM_RUNNER_NAME, _WarmRunner(base))

        try:
            runner = sync(worker.loop, register)
        except Exception as e:  # noqa: BLE001 - a closing worker: start plainly
            raise _WarmUnavailable(f"the worker could not keep a warm runner ({e!r})") from None
    return runner


def _warm_refusal(payload: dict[str, Any], env: dict[str, str]) -> str | None:
    """Why this job cannot be forked from the warm runner, or None when it can."""
    if not payload.get("warm_args"):
        return payload.get("warm_refused") or "the client asked for a plain start"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return f"{sys.platform} has no fork or descriptor passing"
    python = payload.get("warm_python") or "python"
    found = python if os.sep in python else shutil.which(python, path=env.get("PATH"))
    here = os.path.abspath(sys.executable)
    if (
        not found
        or os.path.dirname(os.path.abspath(found)) != os.path.dirname(here)
        or os.path.realpath(found) != os.path.realpath(here)
    ):
        return f"the job's {python} ({found}) is not the interpreter of this worker ({here})"
    return None


def _shell_words(args: str, cwd: str, env: dict[str, str]) -> list[str]:
    """The arguments as ``/bin/sh`` splits and expands them in the plain start (quotes,
    ``$VASTAIDASK_WORKER_CACHE``), from the shell itself: one ``printf`` per job."""
    out = subprocess.run(
        ["/bin/sh", "-c", "printf '%s\\0' " + args], cwd=cwd, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )
    if out.returncode != 0:
        raise _WarmUnavailable(f"/bin/sh could not expand the job's arguments: {out.stderr.decode(errors='replace')}")
    return [os.fsdecode(word) for word in out.stdout.split(b"\0")[:-1]]


def _start_job(payload: dict[str, Any], cwd: str, env: dict[str, str], log: Any,
               base: str) -> tuple[_PlainJob | _WarmJob, dict[str, Any]]:
    """Start the job, forked from the warm runner where it can be, else as a fresh process;
    the first line of its log says which (and why not warm)."""
    t0 = time.monotonic()
    why = _warm_refusal(payload, env)
    if why is None:
        try:
            argv = _shell_words(payload["warm_args"], cwd, env)
            sock, refused = _worker_runner(base).submit(env, log.fileno())
            if sock is None:
                raise _WarmUnavailable(refused)
            job = _WarmJob(sock)
            try:
                log.write(b"vastaidask: started warm (forked from this worker's warm snakemake runner)\n")
                log.flush()
                job.start(argv, env, cwd)
            except BaseException:
                job.close()
                raise
            return job, {"mode": "warm", "start_s": round(time.monotonic() - t0, 3), "at": time.time()}
        except _WarmUnavailable as e:
            why = str(e)
    log.write(f"vastaidask: started plain (a fresh python -m snakemake): {why}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), "/bin/sh", "-c", payload["command"]],
        cwd=cwd, env=env, stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    return _PlainJob(proc), {"mode": "plain", "why": why, "start_s": round(time.monotonic() - t0, 3),
                             "at": time.time()}


def _stop(job: _PlainJob | _WarmJob) -> int | None:
    """SIGTERM to the job's group, SIGKILL after a grace; its exit code once it is gone."""
    job.signal(signal.SIGTERM)
    rc = job.wait(KILL_GRACE_S)
    if rc is None:
        job.signal(signal.SIGKILL)
        rc = job.wait(KILL_GRACE_S)
    return rc


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
    _sweep_outboxes(base, OUTBOX_MAX_AGE_S)
    quota = int(payload["cache_quota_bytes"])
    stats: dict[str, Any] = {"hits": 0, "fetched": [], "uncached": 0, "chunks": 0, "resumed_chunks": 0}
    scratch = os.path.join(base, "jobs", payload["key"])
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    result: dict[str, Any] = {"worker": address, "worker_name": name, "rc": None, "cancelled": False}
    try:
        if payload["sources"] is not None:  # None in bucket mode: the job deploys them itself
            src = os.path.join(scratch, ".vastaidask-sources.tar.xz")
            _blob_to(blobs, payload["sources"], payload["blob_keys"][payload["sources"]], src, quota, stats)
            _extract(src, scratch)
            os.unlink(src)
        for rel, sha, kind, mtime_ns, *chunked in payload["inputs"]:
            dest = _safe_join(scratch, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if kind == "dir":  # a tar whose member names are workdir-relative
                tmp = os.path.join(scratch, f".vastaidask-{sha}.tar")
                _blob_to(blobs, sha, payload["blob_keys"][sha], tmp, quota, stats)
                os.makedirs(dest, exist_ok=True)
                _extract(tmp, scratch)
                os.unlink(tmp)
            elif chunked and chunked[0]:
                _blob_to(blobs, sha, "", dest, quota, stats, chunked[0], payload["blob_keys"])
            else:
                _blob_to(blobs, sha, payload["blob_keys"][sha], dest, quota, stats)
            os.utime(dest, ns=(mtime_ns, mtime_ns))
        env = dict(os.environ)
        env.update(payload.get("env") or {})
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["VASTAIDASK_WORKER_CACHE"] = base  # persistent conda/apptainer prefixes live here
        log_path = os.path.join(base, "jobs", payload["key"] + ".out")
        rc: int | None = None
        with open(log_path, "wb") as log:
            job, result["start"] = _start_job(payload, scratch, env, log, base)
            try:
                # No overall timeout here on purpose: a job runs as long as its rule needs;
                # the loop ends when the process ends or the client cancels (or vanishes).
                while rc is None:
                    rc = job.wait(CANCEL_POLL_S)
                    if rc is None and _cancelled():
                        result["cancelled"] = True
                        rc = _stop(job)
                        break
            except _RunnerLost as e:
                log.write(f"vastaidask: the warm runner vanished while the job ran ({e}); "
                          "the job's processes were killed with it\n".encode())
                rc = -signal.SIGKILL
            finally:
                job.close()
        result["rc"] = rc
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - FULL_LOG_CAP_BYTES))
            text = f.read().decode(errors="replace")
        os.unlink(log_path)
        result["output"] = text
        result["log_tail"] = text[-LOG_TAIL_CHARS:]
        kept: dict[str, list[Any]] = {}
        stowed: dict[str, list[Any]] = {}
        if rc == 0:
            chunk_bytes = int(payload.get("chunk_bytes") or 1 << 25)
            manifests: dict[str, list[Any]] = {}
            kept = _cache_outputs(scratch, payload["outputs"], blobs, quota, set(payload.get("keep_remote") or ()),
                                  chunk_bytes, manifests, frozenset(payload.get("uncache") or ()))
            if payload.get("pull_outputs"):
                stowed = _stow_outputs(scratch, [p for p in payload["outputs"] if p not in kept], manifests,
                                       _outbox_dir(payload.get("cache_dir"), payload["key"]),
                                       int(payload.get("inline_bytes", chunk_bytes)), chunk_bytes)
        wanted = [p for p in payload["outputs"] if p not in kept and p not in stowed] + payload["logs"] \
            if rc == 0 else payload["logs"]
        result["tar"], result["missing"] = _pack(scratch, wanted)
        result["kept"] = kept
        result["pull"] = stowed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        result["cache"] = stats
        result["seconds"] = time.monotonic() - t0
    return result
