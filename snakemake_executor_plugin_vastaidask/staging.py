"""Content-addressed file staging over the Dask connection (client side).

Every file a job needs (the workflow's source archive, each input) is named by its
SHA-256. The bytes enter the cluster once per run under the key ``vastaidask-blob-<sha>``
(scattered to a worker when one is registered, else as a task holding them, which the
first worker to arrive computes); a job's payload names only the hashes and keys, never
a blob's future (a dependency would keep a GPU job out of the demand that rents
instances while the blob task waits for a worker). On the worker (``remote.py``)
a blob already in the worker's disk cache is used as is, so a worker that has a file
never receives it twice; a missing one is fetched by key from the worker holding it,
through that worker's own connections (no client runs on a worker). Small results come back
as a tar that is unpacked here with tarfile's ``data`` filter (only the job's declared outputs
and logs), large outputs are pulled chunk by chunk (``retrieval.py``); all are restamped, so
outputs are never older than their inputs.

A file larger than ``CHUNK_BYTES`` travels in chunks, each its own blob keyed by its own
SHA-256: the client streams it from disk (one chunk in its memory at a time, from a thread
of its own, so a 1 GB input neither fills the client's memory nor holds up Snakemake), the
worker assembles it in its cache checking every chunk and then the whole file, and resumes
at the first chunk it lacks. A chunk that is lost (its holder gone) or that a worker finds
corrupt (it asks on the scheduler's event topic ``RESEND_TOPIC``) is sent again alone,
under the next generation of its key (``<key>-r1``, ...), at most ``MAX_RESENDS`` times.

A temp() output (one Snakemake deletes once its consumers are done) stays on the worker that
made it: the client keeps a stand-in file (Snakemake checks that outputs exist) and, when a
later job needs it, a task pinned to that worker serves each chunk from its cache; the
consumer's worker fetches them from there as it fetches any chunk, so the bytes go worker to
worker (directly in ``network="direct"``) and never through the staging here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
#: Files above this size travel in chunks of this size unless the executor says otherwise
#: (``--vastaidask-chunk-mb``, whose default this is; measured in benchmarks/snakemake_chunks.py).
CHUNK_BYTES = 32 << 20
#: A chunk is sent again at most this many times (a worker asking for more is not believed).
MAX_RESENDS = 3
#: The scheduler's event topic on which a worker asks for a chunk again (``remote.py``).
RESEND_TOPIC = "vastaidask-resend"
#: How often the sending thread looks for lost chunks and resend requests.
RESEND_POLL_S = 0.5
#: The first line of the local stand-in of an output kept on a worker (``Stager.keep``).
PLACEHOLDER_MAGIC = b"vastaidask: this temp() output stayed on a worker"
#: A stand-in is never larger than this (a file that is, is data).
PLACEHOLDER_MAX_BYTES = 4096


def remote_function(name: str = "run_job") -> Any:
    """``remote.<name>`` compiled under a module name nobody can import: it travels by value.

    The scheduler unpickles task graphs, and neither it (on a remote machine) nor the
    workers can be assumed to import this plugin; cloudpickle carries a function by value
    exactly when its module is not importable.
    """
    source_path = Path(__file__).with_name("remote.py")
    module = types.ModuleType("snakemake_vastaidask_remote_by_value")
    module.__file__ = str(source_path)
    exec(compile(source_path.read_text(), str(source_path), "exec"), module.__dict__)  # noqa: S102
    return getattr(module, name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """One piece of a chunked file: where it lies in the file and the hash of its bytes."""

    index: int
    offset: int
    size: int
    sha: str


@dataclass(frozen=True)
class StagedInput:
    """One input as the worker rebuilds it: workdir-relative path, blob hash, file or dir,
    and for a chunked file its chunks (the whole-file hash is ``sha``)."""

    path: str
    sha: str
    kind: str  # "file" | "dir"
    mtime_ns: int
    chunks: tuple[Chunk, ...] = ()

    @property
    def blob_shas(self) -> list[str]:
        """The blobs a job holds references on for this input."""
        return [c.sha for c in self.chunks] if self.chunks else [self.sha]

    def manifest(self) -> list[Any]:
        """The payload's entry: path, hash, kind, mtime, [[chunk hash, size], ...]."""
        return [self.path, self.sha, self.kind, self.mtime_ns, [[c.sha, c.size] for c in self.chunks]]


@dataclass(frozen=True)
class ChunkedFile:
    """A file a worker holds, as it names it: workdir-relative path, hash, size, chunks."""

    path: str
    sha: str
    size: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class KeptOutput(ChunkedFile):
    """An output that stayed on the worker that produced it: its hash, size, chunks, and where."""

    worker: str


def is_placeholder(path: Path) -> bool:
    """Whether ``path`` is the local stand-in of an output kept on a worker."""
    try:
        if path.stat().st_size > PLACEHOLDER_MAX_BYTES:
            return False
        with open(path, "rb") as f:
            return f.read(len(PLACEHOLDER_MAGIC)) == PLACEHOLDER_MAGIC
    except OSError:
        return False


def chunk_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, tuple[Chunk, ...]]:
    """(whole-file SHA-256, its chunks), read from disk one chunk at a time."""
    whole = hashlib.sha256()
    chunks = []
    with open(path, "rb") as f:
        offset = 0
        while data := f.read(chunk_bytes):
            whole.update(data)
            chunks.append(Chunk(len(chunks), offset, len(data), sha256_bytes(data)))
            offset += len(data)
    return whole.hexdigest(), tuple(chunks)


@dataclass
class _Piece:
    """A chunk the sending thread owns while a job references it: where to read it, the
    generation of its key (one more per resend) and the future holding it (None: to send)."""

    path: Path
    chunk: Chunk
    label: str
    generation: int = 0
    future: Any = None
    corrupt_once: bool = False
    #: the file changed on disk since it was hashed: never sent (the job fails, said once)
    stale: bool = False


class Stager:
    """Hashes local files and keeps each blob in the cluster while a job that needs it is active.

    Every ``stage_*`` call takes a reference on the blob (or on each chunk) for the job being
    prepared and ``release`` drops the job's references; a blob nobody references leaves the
    cluster's memory (the workers' disk caches keep it), so idle instances hold no data the
    adaptive policy would have to keep them for, and a 1 GB input does not sit in RAM all run
    long. A blob needed again later is put again: only workers whose cache lacks it receive it.

    Chunks are sent by a thread of their own once a worker is registered (never as tasks
    waiting for one: a task's bytes would wait in the scheduler, which runs in this process),
    one at a time and read from disk as they go; the same thread resends a lost or corrupt
    chunk, alone. ``note`` receives a line for the user per resend.
    """

    def __init__(self, client: Any, workdir: Path, note: Callable[[str], None] | None = None,
                 chunk_bytes: int = CHUNK_BYTES, cache_dir: str | None = None) -> None:
        if chunk_bytes < 1 << 20:
            raise ValueError(f"chunks of {chunk_bytes} bytes: give --vastaidask-chunk-mb 1 or more")
        self.client = client
        self.workdir = workdir
        self.chunk_bytes = chunk_bytes
        self.cache_dir = cache_dir
        self._kept: dict[str, KeptOutput] = {}
        self._serve: Any = None
        #: bytes of kept outputs that later jobs fetched from the producing worker (not from here)
        self.worker_bytes = 0
        self.note = note or (lambda _line: None)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._manifests: dict[tuple[str, int, int], tuple[str, tuple[Chunk, ...]]] = {}
        self._futures: dict[str, Any] = {}
        self._pieces: dict[str, _Piece] = {}
        self._refs: Counter[str] = Counter()
        self._events_seen = 0.0
        self._sender: threading.Thread | None = None
        self._closed = False
        self.uploaded_bytes = 0
        #: one label per chunk sent again ("big.bin chunk 3/32")
        self.resent: list[str] = []

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
        if is_placeholder(path):
            kept = self._kept.get(rel)
            if kept is None:
                raise FileNotFoundError(
                    f"input {rel!r} is the stand-in of a temp() output that an earlier run kept on an "
                    f"instance, now gone; delete it (rm {rel!r}) so that Snakemake makes it again"
                )
            return self._stage_kept(kept, st.st_mtime_ns)
        if path.is_dir():
            data = _tar_dir(path, rel)
            return StagedInput(rel, self.stage_bytes(data), "dir", st.st_mtime_ns)
        ident = (str(path), st.st_size, st.st_mtime_ns)
        if st.st_size > self.chunk_bytes:
            return self._stage_chunked(rel, path, ident, st.st_mtime_ns)
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

    def _stage_chunked(self, rel: str, path: Path, ident: tuple[str, int, int], mtime_ns: int) -> StagedInput:
        with self._lock:
            manifest = self._manifests.get(ident)
        if manifest is None:
            manifest = chunk_file(path, self.chunk_bytes)
            with self._lock:
                self._manifests[ident] = manifest
        sha, chunks = manifest
        corrupt = _testing_corrupt_chunk()
        with self._lock:
            for c in chunks:
                self._refs[c.sha] += 1
                if c.sha not in self._pieces:
                    self._pieces[c.sha] = _Piece(
                        path, c, f"{rel} chunk {c.index + 1}/{len(chunks)}",
                        corrupt_once=corrupt == (rel, c.index),
                    )
            self._wake.notify_all()
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, name="vastaidask-chunks", daemon=True)
                self._sender.start()
        return StagedInput(rel, sha, "file", mtime_ns, chunks)

    def key(self, sha: str) -> str:
        return BLOB_PREFIX + sha

    # ------------------------------------------------------------- kept outputs
    def keep(self, rel: str, manifest: list[Any], worker: str) -> KeptOutput:
        """Record an output that stayed on ``worker`` (``remote._cache_outputs``'s manifest),
        write its local stand-in, and have that worker serve its chunks at once.

        Snakemake checks that every output exists, and deletes a temp() file's once its
        consumers are done (``sweep_kept`` then lets the chunks go). The stand-in says what it
        is, and staging refuses one it does not know (an earlier run's: its worker is gone).
        The chunks are served now, as tasks whose results stay in that worker's memory, so
        that they are data the cluster sees: an instance holding them that is released while
        another worker stays hands them over first (worker to worker), and one that would
        leave no worker behind is kept.
        """
        sha, size, chunk_list = str(manifest[0]), int(manifest[1]), manifest[2]
        chunks, offset = [], 0
        for i, (chunk_sha, chunk_size) in enumerate(chunk_list):
            chunks.append(Chunk(i, offset, int(chunk_size), str(chunk_sha)))
            offset += int(chunk_size)
        if offset != size:
            raise ValueError(f"worker {worker} kept {rel!r} with chunks of {offset} bytes for a {size}-byte file")
        kept = KeptOutput(rel, sha, size, tuple(chunks), worker)
        path = self.workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        note = {"path": rel, "sha256": sha, "bytes": size, "worker": worker}
        path.write_bytes(PLACEHOLDER_MAGIC + b" (its data is not on this machine)\n" + json.dumps(note).encode() + b"\n")
        if self._serve is None:
            self._serve = remote_function("serve_chunk")
        with self._lock:
            self._kept[rel] = kept
            for c in kept.chunks:  # the kept record's own reference, until sweep_kept
                self._refs[c.sha] += 1
                self._serve_chunk(kept, c)
        return kept

    def _serve_chunk(self, kept: KeptOutput, c: Chunk) -> None:
        """Have the producing worker serve chunk ``c`` unless a live future holds it (lock held)."""
        future = self._futures.get(c.sha)
        if c.sha in self._pieces or (future is not None and future.status not in ("error", "lost", "cancelled")):
            return
        self._futures[c.sha] = self.client.submit(
            self._serve, self.cache_dir, kept.sha, c.offset, c.size, key=self.key(c.sha),
            workers=[kept.worker], allow_other_workers=False, pure=False,
        )

    def sweep_kept(self) -> None:
        """Let go of kept outputs whose stand-in Snakemake deleted (their consumers are done)."""
        with self._lock:
            gone = [rel for rel in self._kept if not (self.workdir / rel).exists()]
        for rel in gone:
            with self._lock:
                kept = self._kept.pop(rel, None)
            if kept is not None:
                self.release(c.sha for c in kept.chunks)

    def _stage_kept(self, kept: KeptOutput, mtime_ns: int) -> StagedInput:
        """Reference a kept output's chunks, served by the worker that made it (or held, since,
        by the worker it handed them to): the consuming worker fetches them from there, never
        through this machine, and checks them."""
        with self._lock:
            lost = [c for c in kept.chunks if c.sha not in self._pieces and (
                self._futures.get(c.sha) is None
                or self._futures[c.sha].status in ("error", "lost", "cancelled"))]
        if lost and kept.worker not in self.client.scheduler_info(n_workers=-1).get("workers", {}):
            # Its instance was lost with the data. Without the stand-in, the next run makes it again.
            (self.workdir / kept.path).unlink(missing_ok=True)
            with self._lock:
                dropped = self._kept.pop(kept.path, None)
            if dropped is not None:
                self.release(c.sha for c in kept.chunks)
            raise FileNotFoundError(
                f"input {kept.path!r} (a temp() output) stayed on worker {kept.worker}, which is gone "
                "(its instance was lost); its stand-in is deleted, so run snakemake again "
                "to make it anew (--vastaidask-no-keep-temp-remote brings temp() outputs back instead)"
            )
        with self._lock:
            for c in kept.chunks:
                self._refs[c.sha] += 1
                self._serve_chunk(kept, c)
            self.worker_bytes += kept.size
        return StagedInput(kept.path, kept.sha, "file", mtime_ns, kept.chunks)

    def release(self, shas: Iterable[str]) -> None:
        """Drop one job's references; blobs nobody references leave the cluster's memory."""
        with self._lock:
            for sha in shas:
                self._refs[sha] -= 1
                if self._refs[sha] <= 0:
                    del self._refs[sha]
                    self._drop(sha)

    def release_all(self) -> None:
        """Forget every blob and stop sending (the run is over)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            for sha in list(self._futures) + list(self._pieces):
                self._drop(sha)
            self._refs.clear()
            sender, self._sender = self._sender, None
        if sender is not None and sender is not threading.current_thread():
            sender.join(timeout=30)

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
        piece = self._pieces.pop(sha, None)
        if piece is not None:
            future = piece.future
        if future is not None:
            with contextlib.suppress(Exception):
                future.release()

    # ------------------------------------------------------------- chunks
    def _send_loop(self) -> None:
        """Send queued chunks (once a worker is registered), then look for chunks to send again."""
        failed = ""  # the last failure said, so that a lasting one is said once
        with contextlib.suppress(Exception):  # requests of an earlier run (same scheduler) are not ours
            self._events_seen = max((stamp for stamp, _ in self.client.get_events(RESEND_TOPIC)), default=0.0)
        while True:
            with self._lock:
                if self._closed:
                    return
                todo = [p for p in self._pieces.values() if p.future is None and not p.stale]
                watched = bool(self._pieces)
            try:
                if todo and self.client.scheduler_info().get("workers"):
                    for piece in todo:
                        self._send(piece)
                if watched:
                    self._repair()
            except Exception as e:  # noqa: BLE001 - a closing client: the jobs report what they miss
                with self._lock:
                    if self._closed:
                        return
                if repr(e) != failed:
                    failed = repr(e)
                    self.note(f"sending chunks failed, retrying: {failed}")
            with self._lock:
                if not self._closed:
                    self._wake.wait(RESEND_POLL_S)

    def _send(self, piece: _Piece) -> None:
        """One chunk from disk into the cluster, under its current generation's key."""
        with open(piece.path, "rb") as f:
            f.seek(piece.chunk.offset)
            data = f.read(piece.chunk.size)
        if sha256_bytes(data) != piece.chunk.sha:
            piece.stale = True
            self.note(f"{piece.label} changed on disk since it was staged; not sending it (its job will fail)")
            return
        if piece.corrupt_once:
            piece.corrupt_once = False
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        key = chunk_key(self.key(piece.chunk.sha), piece.generation)
        future = self.client.scatter({key: data}, direct=False)[key]
        del data
        with self._lock:
            if self._pieces.get(piece.chunk.sha) is piece and piece.future is None:
                piece.future = future
                self.uploaded_bytes += piece.chunk.size
                return
        future.release()  # released (or resent) while it travelled

    def _repair(self) -> None:
        """Send again, alone, each chunk whose holder was lost or that a worker found corrupt."""
        with self._lock:
            lost = [p for p in self._pieces.values()
                    if p.future is not None and p.future.status in ("error", "lost", "cancelled")]
        for piece in lost:
            self._resend(piece, "its holder was lost")
        for stamp, msg in self.client.get_events(RESEND_TOPIC):
            if stamp <= self._events_seen:
                continue
            self._events_seen = stamp
            if not isinstance(msg, dict):
                continue
            with self._lock:
                piece = self._pieces.get(str(msg.get("sha")))
            # Only a complaint about the generation out there now counts: several workers (or
            # one asking twice) name the same bad copy, which is resent once.
            if piece is not None and piece.future is not None and msg.get("generation") == piece.generation:
                self._resend(piece, f"worker {msg.get('worker')}: {msg.get('why')}")

    def _resend(self, piece: _Piece, why: str) -> None:
        with self._lock:
            if self._pieces.get(piece.chunk.sha) is not piece or piece.future is None:
                return
            if piece.generation >= MAX_RESENDS:
                return
            old, piece.future = piece.future, None
            piece.generation += 1
            self.resent.append(piece.label)
            self._wake.notify_all()
        with contextlib.suppress(Exception):
            old.release()
        self.note(f"{piece.label} ({piece.chunk.size / 1e6:.1f} MB) sent again alone: {why}")


def chunk_key(key: str, generation: int) -> str:
    """The key of a chunk's ``generation``-th copy (``remote.py`` spells it the same way)."""
    return key if generation == 0 else f"{key}-r{generation}"


def _testing_corrupt_chunk() -> tuple[str, int] | None:
    from dask_vastai._testing import staging_corrupt_chunk

    return staging_corrupt_chunk()


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


def unpack_results(tar_bytes: bytes, workdir: Path, declared: Iterable[str] | None = None) -> list[str]:
    """Unpack a job's results into the workdir (``data`` filter: no absolute paths, no ``..``, no
    link leading out). With ``declared`` (the job's outputs and logs), a member that is none of
    them nor inside one (a directory output) refuses the whole tar before anything is written:
    a worker must not write the user's other files (the Snakefile, a script)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        names = tf.getnames()
        if declared is not None:
            allowed = {os.path.normpath(d) for d in declared}
            for name in names:
                norm = os.path.normpath(name)
                if not any(norm == a or norm.startswith(a + os.sep) for a in allowed):
                    raise ValueError(f"the worker's results hold {name!r}, which is not an output or log of the "
                                     "job: refused (nothing unpacked)")
        try:
            tf.extractall(workdir, filter="data")
        except tarfile.FilterError as e:
            raise ValueError(f"the worker's results hold {e.tarinfo.name!r}, refused: {e}") from None
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
