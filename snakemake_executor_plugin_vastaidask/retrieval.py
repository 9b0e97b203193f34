"""A job's large outputs, pulled from its worker chunk by chunk (client side).

The mirror of input staging (``staging.py``): a job's outputs that do not fit in its result's
tar stay in the worker's outbox (``remote._stow_outputs``), named in the result by hash, size
and chunk hashes; here they are pulled one chunk at a time (the next one already on its way),
each written to a part file next to its destination as it arrives, so the client's memory
holds about two chunks whatever the output's size. Each chunk's size and SHA-256 are checked,
then the whole file's; only a whole, checked file is renamed to its name (Snakemake must never
see a half file as a finished output). A chunk that fails (its task lost, a cut link, bytes
that do not hash right) is fetched again alone, at most ``MAX_REFETCHES`` times, then the job
fails naming the file; a pull that starts again finds the part file and resumes after the
chunks it already holds intact. A directory output too large for the tar comes as a tar of its
own, pulled the same way, unpacked beside its destination and moved into place whole.

The worker is a stranger: its manifest is believed for nothing but where to ask. Only outputs
the job declares are accepted, under workdir-relative paths that stay in the workdir (no
absolute path, no ``..``, no symlink leading out); chunk sizes must be exactly the ones the
client asked for, and every byte is checked against the hashes before the file takes its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .staging import Chunk, ChunkedFile, remote_function

#: A chunk is fetched again at most this many times before the job fails naming its file.
MAX_REFETCHES = 3
#: Chunks requested ahead of the one being written (the client holds about this many more).
PREFETCH_CHUNKS = 1
#: Seconds one chunk may take to arrive before it is asked for again.
CHUNK_TIMEOUT_S = 120.0
#: Seconds the worker is given to delete its outbox before the job is reported all the same.
DISCARD_WAIT_S = 10.0
#: While a chunk is awaited, how often the worker holding it is looked for among the registered
#: ones (a task pinned to a worker that left waits for it forever).
WORKER_CHECK_S = 2.0
#: The part file of an output being pulled: ``.<name>.<sha[:16]>.vastaidask-part`` beside it.
PART_SUFFIX = ".vastaidask-part"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class OutputRefused(Exception):
    """An output a worker sent back was refused (the message names the file, the worker, why)."""


@dataclass(frozen=True)
class PulledOutput(ChunkedFile):
    """An output to pull: a file, or a directory output packed by the worker in a tar (``"dir"``)."""

    kind: str = "file"


@dataclass
class PullReport:
    """What one job's pull did: bytes and chunks that crossed, chunks resumed and fetched again."""

    bytes: int = 0
    chunks: int = 0
    resumed_chunks: int = 0
    refetched: list[str] = field(default_factory=list)


def _refuse(rel: Any, worker: str, why: str) -> OutputRefused:
    return OutputRefused(f"output {rel!r} from worker {worker} refused: {why}")


def check_manifest(rel: Any, entry: Any, declared: Iterable[str], chunk_bytes: int, worker: str) -> PulledOutput:
    """The worker's manifest entry for ``rel`` (``[sha, size, [[chunk sha, size], ...]]``, then
    ``"dir"`` for a directory's tar) as a ``PulledOutput``, or ``OutputRefused`` saying what is
    wrong with it."""
    if not isinstance(rel, str) or rel not in set(declared):
        raise _refuse(rel, worker, "the job declares no such output (only declared outputs come back)")
    try:
        sha, size, raw_chunks, *kind = entry
        if kind not in ([], ["dir"]):
            raise ValueError(kind)
        size = int(size)
        pairs = [(str(c_sha), int(c_size)) for c_sha, c_size in raw_chunks]
    except (TypeError, ValueError):
        raise _refuse(rel, worker, f"its manifest is malformed ({str(entry)[:200]})") from None
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha) or not all(_SHA256.fullmatch(c) for c, _ in pairs):
        raise _refuse(rel, worker, "its manifest names a hash that is not a SHA-256")
    expected = [chunk_bytes] * (size // chunk_bytes) + ([size % chunk_bytes] if size % chunk_bytes else [])
    if size < 0 or [n for _, n in pairs] != expected:
        raise _refuse(rel, worker, f"its manifest's chunk sizes {[n for _, n in pairs][:8]} do not cut "
                      f"{size} bytes into chunks of {chunk_bytes}")
    chunks, offset = [], 0
    for i, (c_sha, c_size) in enumerate(pairs):
        chunks.append(Chunk(i, offset, c_size, c_sha))
        offset += c_size
    return PulledOutput(rel, sha, size, tuple(chunks), kind[0] if kind else "file")


def destination(workdir: Path, rel: str, worker: str, kind: str = "file") -> Path:
    """Where output ``rel`` goes: below ``workdir``, reached through no symlink that leads out."""
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise _refuse(rel, worker, "its path is not inside the working directory")
    dest = workdir / norm
    existing = dest.parent
    while not existing.exists():
        existing = existing.parent
    root = os.path.realpath(workdir)
    real = os.path.realpath(existing)
    if real != root and not real.startswith(root + os.sep):
        raise _refuse(rel, worker, f"a symlink leads its directory out of the working directory (to {real})")
    if kind == "file" and dest.is_dir() and not dest.is_symlink():
        raise _refuse(rel, worker, "a directory of that name exists here")
    return dest


def part_path(dest: Path, sha: str) -> Path:
    """The part file an output is written to until it is whole (named by hash: a part of another
    version of the file is never resumed)."""
    return dest.with_name(f".{dest.name}.{sha[:16]}{PART_SUFFIX}")


def _intact_prefix(part: Path, chunks: tuple[Chunk, ...]) -> tuple[int, Any]:
    """(how many leading chunks ``part`` already holds intact, the whole-file hash over them)."""
    whole = hashlib.sha256()
    done = 0
    with contextlib.suppress(FileNotFoundError), open(part, "rb") as f:
        for c in chunks:
            data = f.read(c.size)
            if len(data) != c.size or hashlib.sha256(data).hexdigest() != c.sha:
                break
            whole.update(data)
            done += 1
    return done, whole


def receive_file(dest: Path, out: ChunkedFile, fetch: Callable[[Chunk, int], bytes], worker: str,
                 report: PullReport | None = None, note: Callable[[str], None] | None = None) -> PullReport:
    """Write ``out`` to ``dest`` from ``fetch(chunk, attempt)``: each chunk checked, the whole file
    checked, renamed into place only when whole; resumes after the chunks a part file holds."""
    report = report or PullReport()
    note = note or (lambda _line: None)
    part = part_path(dest, out.sha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    done, whole = _intact_prefix(part, out.chunks)
    report.resumed_chunks += done
    offset = sum(c.size for c in out.chunks[:done])
    with open(part, "r+b" if part.exists() else "wb") as f:
        f.truncate(offset)
        f.seek(offset)
        for c in out.chunks[done:]:
            label = f"{out.path} chunk {c.index + 1}/{len(out.chunks)}"
            why = ""
            for attempt in range(MAX_REFETCHES + 1):
                if attempt:
                    report.refetched.append(label)
                    note(f"{label} ({c.size / 1e6:.1f} MB) fetched again alone: {why}")
                try:
                    data = fetch(c, attempt)
                except OutputRefused:
                    raise
                except Exception as e:  # noqa: BLE001 - a lost task or cut link: fetch it again
                    why = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                if not isinstance(data, bytes | bytearray | memoryview):
                    why = f"it came as {type(data).__name__}, not bytes"
                elif len(data) != c.size:
                    why = f"it came with {len(data)} bytes, not {c.size}"
                elif hashlib.sha256(data).hexdigest() != c.sha:
                    why = f"its bytes do not hash to {c.sha[:12]}"
                else:
                    break
            else:
                raise _refuse(out.path, worker, f"{label} failed {MAX_REFETCHES + 1} times, last: {why}; "
                              f"the chunks received so far stay in {part.name} for the next attempt")
            f.write(data)
            whole.update(data)
            report.chunks += 1
            report.bytes += len(data)
            del data
    if whole.hexdigest() != out.sha:
        part.unlink(missing_ok=True)
        raise _refuse(out.path, worker, f"its chunks assembled do not hash to {out.sha[:12]} (the file's hash "
                      "in its manifest)")
    os.replace(part, dest)
    return report


def unpack_directory(tar_path: Path, dest: Path, rel: str, worker: str) -> None:
    """Put the directory output ``rel`` packed in ``tar_path`` at ``dest``: unpacked beside it
    (``data`` filter; every member inside ``rel``), then moved into place whole."""
    norm = os.path.normpath(rel)
    unpacked = dest.with_name(f".{dest.name}.vastaidask-dir")
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir()
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for name in tf.getnames():
                if os.path.normpath(name) != norm and not os.path.normpath(name).startswith(norm + os.sep):
                    raise _refuse(rel, worker, f"its tar holds {name!r}, which lies outside the directory")
            try:
                tf.extractall(unpacked, filter="data")
            except tarfile.FilterError as e:
                raise _refuse(rel, worker, f"its tar holds {e.tarinfo.name!r}: {e}") from None
        src = unpacked / norm
        if not src.is_dir() or src.is_symlink():
            raise _refuse(rel, worker, "its tar holds no directory of that name")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink(missing_ok=True)
        os.replace(src, dest)
    except tarfile.TarError as e:
        raise _refuse(rel, worker, f"its tar cannot be read ({e})") from None
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        tar_path.unlink(missing_ok=True)


class OutputPuller:
    """Pulls the outputs a worker kept in its outbox, one chunk (plus ``PREFETCH_CHUNKS`` ahead)
    at a time, through tasks pinned to that worker; then has the worker delete its outbox."""

    def __init__(self, client: Any, workdir: Path, chunk_bytes: int, cache_dir: str | None,
                 note: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.workdir = workdir
        self.chunk_bytes = chunk_bytes
        self.cache_dir = cache_dir
        self.note = note or (lambda _line: None)
        self._read = remote_function("outbox_chunk")
        self._discard = remote_function("outbox_discard")
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop every pull under way (the run ends); their part files stay for a later run."""
        self._closed.set()

    def pull(self, key: str, worker: str, manifest: Any, declared: Iterable[str]) -> PullReport:
        """Pull job ``key``'s outbox from ``worker`` into the workdir; ``OutputRefused`` names the
        file when one cannot be had. The outbox is deleted in any case (a retried job makes
        its outputs anew)."""
        report = PullReport()
        declared = list(declared)
        try:
            if not isinstance(manifest, dict):
                raise _refuse("?", worker, f"its list of outputs is a {type(manifest).__name__}, not a mapping")
            outputs = [check_manifest(rel, entry, declared, self.chunk_bytes, worker)
                       for rel, entry in manifest.items()]
            for out in outputs:
                dest = destination(self.workdir, out.path, worker, out.kind)
                target = dest if out.kind == "file" else dest.with_name(f".{dest.name}.{out.sha[:16]}.vastaidask-tar")
                fetcher = _ChunkFetcher(self, key, worker, out)
                try:
                    receive_file(target, out, fetcher, worker, report, self.note)
                finally:
                    fetcher.release()
                if out.kind == "dir":
                    unpack_directory(target, dest, out.path, worker)
            return report
        finally:
            with contextlib.suppress(Exception):
                if worker in self.client.scheduler_info(n_workers=-1).get("workers", {}):
                    from distributed import fire_and_forget, wait

                    discard = self.client.submit(
                        self._discard, self.cache_dir, key, workers=[worker],
                        allow_other_workers=False, pure=False, key=f"vastaidask-discard-{key}")
                    fire_and_forget(discard)  # runs even if the worker is slow to answer
                    wait(discard, timeout=DISCARD_WAIT_S)


class _ChunkFetcher:
    """``fetch(chunk, attempt)`` for ``receive_file``: a chunk's bytes from a task pinned to the
    worker, the next ``PREFETCH_CHUNKS`` requested before this one is awaited."""

    def __init__(self, puller: OutputPuller, key: str, worker: str, out: ChunkedFile) -> None:
        self.puller, self.key, self.worker, self.out = puller, key, worker, out
        self.futures: dict[tuple[int, int], Any] = {}

    def _submit(self, c: Chunk, attempt: int) -> Any:
        if (c.index, attempt) not in self.futures:
            p = self.puller
            self.futures[(c.index, attempt)] = p.client.submit(
                p._read, p.cache_dir, self.key, self.out.sha, c.offset, c.size,
                key=f"vastaidask-pull-{self.key}-{self.out.sha[:12]}-{c.index}-{attempt}",
                workers=[self.worker], allow_other_workers=False, pure=False,
            )
        return self.futures[(c.index, attempt)]

    def __call__(self, c: Chunk, attempt: int) -> bytes:
        out, worker = self.out, self.worker
        if self.puller._closed.is_set():
            raise OutputRefused(f"output {out.path!r}: the run ended while it was pulled from {worker}")
        self._check_worker()
        future = self._submit(c, attempt)
        for ahead in out.chunks[c.index + 1:c.index + 1 + PREFETCH_CHUNKS]:
            self._submit(ahead, 0)
        deadline = time.monotonic() + CHUNK_TIMEOUT_S
        try:
            while True:
                try:
                    return future.result(timeout=min(WORKER_CHECK_S, max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"no answer from {worker} within {CHUNK_TIMEOUT_S:.0f}s") from None
                    self._check_worker()
        finally:
            self.futures.pop((c.index, attempt), None)
            future.release()

    def _check_worker(self) -> None:
        """``OutputRefused`` when the worker holding the file is no longer registered."""
        if self.worker not in self.puller.client.scheduler_info(n_workers=-1).get("workers", {}):
            raise _refuse(self.out.path, self.worker, "that worker is gone with the file (its instance was "
                          "lost or released); the job must run again")

    def release(self) -> None:
        """Let go of chunks requested ahead and never awaited (the pull failed or ended)."""
        for future in self.futures.values():
            with contextlib.suppress(Exception):
                future.release()
        self.futures.clear()
