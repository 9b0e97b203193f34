"""The client's side of pulling a job's large outputs, against a worker that is a stranger.

A hostile worker answers with wrong bytes, wrong sizes, a manifest of its own making, paths
outside the working directory: each is refused with an error naming the file, and no half or
foreign file ever takes an output's name. A lost or corrupt chunk is fetched again alone; a pull
that starts again resumes after the chunks its part file holds. Most tests drive
``receive_file``/``OutputPuller`` with the worker's answers made here; the last one runs the
real pull tasks on a real Dask worker whose outbox holds tampered bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastaidask.backend import check_network
from snakemake_executor_plugin_vastaidask.retrieval import (
    MAX_REFETCHES,
    OutputRefused,
    check_manifest,
    destination,
    part_path,
    receive_file,
    unpack_directory,
)
from snakemake_executor_plugin_vastaidask.settings import ExecutorSettings
from snakemake_executor_plugin_vastaidask.staging import Chunk, unpack_results

CHUNK = 1 << 20
WORKER = "tls://203.0.113.7:41000"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(data: bytes, chunk: int = CHUNK) -> list:
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return [_sha(data), len(data), [[_sha(p), len(p)] for p in pieces]]


class Worker:
    """A worker's answers to chunk requests: ``data``'s bytes, unless a test says otherwise."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: Counter[int] = Counter()
        self.answers: dict[tuple[int, int], object] = {}  # (chunk index, attempt) -> bytes or exception

    def __call__(self, c: Chunk, attempt: int) -> bytes:
        self.asked[c.index] += 1
        answer = self.answers.get((c.index, attempt), self.answers.get((c.index, -1)))
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            return answer  # type: ignore[return-value]
        return self.data[c.offset:c.offset + c.size]


@pytest.fixture
def data() -> bytes:
    return os.urandom(5 * CHUNK + 1234)


def _receive(tmp_path: Path, data: bytes, worker: Worker, manifest: list | None = None):
    out = check_manifest("out/big.bin", manifest or _manifest(data), ["out/big.bin"], CHUNK, WORKER)
    dest = destination(tmp_path, out.path, WORKER)
    lines: list[str] = []
    return dest, out, lambda: receive_file(dest, out, worker, WORKER, note=lines.append), lines


def test_a_corrupt_chunk_is_fetched_again_alone_and_the_file_is_whole(tmp_path: Path, data: bytes) -> None:
    worker = Worker(data)
    bad = bytearray(data[2 * CHUNK:3 * CHUNK])
    bad[7] ^= 0xFF
    worker.answers[(2, 0)] = bytes(bad)
    dest, _out, receive, lines = _receive(tmp_path, data, worker)
    report = receive()
    assert dest.read_bytes() == data
    assert worker.asked == Counter({0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1}), "only the corrupt chunk was asked again"
    assert report.refetched == ["out/big.bin chunk 3/6"]
    assert report.bytes == len(data) and report.chunks == 6
    assert lines == ["out/big.bin chunk 3/6 (1.0 MB) fetched again alone: its bytes do not hash to "
                     f"{_sha(data[2 * CHUNK:3 * CHUNK])[:12]}"]
    assert list(dest.parent.iterdir()) == [dest], "no part file left behind"


def test_a_cut_link_mid_pull_costs_the_chunk_it_cut_only(tmp_path: Path, data: bytes) -> None:
    worker = Worker(data)
    worker.answers[(4, 0)] = ConnectionResetError("the tunnel dropped")
    dest, _out, receive, _lines = _receive(tmp_path, data, worker)
    report = receive()
    assert dest.read_bytes() == data
    assert worker.asked[4] == 2 and sum(worker.asked.values()) == 7
    assert report.refetched == ["out/big.bin chunk 5/6"]


def test_wrong_bytes_every_time_fail_naming_the_file_and_leave_no_half_output(tmp_path: Path, data: bytes) -> None:
    worker = Worker(data)
    worker.answers[(3, -1)] = b"\0" * CHUNK
    dest, out, receive, _lines = _receive(tmp_path, data, worker)
    with pytest.raises(OutputRefused) as refused:
        receive()
    message = str(refused.value)
    assert "'out/big.bin'" in message and WORKER in message and "chunk 4/6" in message, message
    assert f"failed {MAX_REFETCHES + 1} times" in message and "do not hash" in message, message
    assert worker.asked[3] == MAX_REFETCHES + 1, "retries are bounded"
    assert not dest.exists(), "Snakemake must never see a half file under the output's name"
    assert part_path(dest, out.sha).read_bytes() == data[:3 * CHUNK], "the intact chunks stay for a resume"


def test_a_pull_that_starts_again_resumes_after_the_intact_chunks(tmp_path: Path, data: bytes) -> None:
    worker = Worker(data)
    dest, out, receive, _lines = _receive(tmp_path, data, worker)
    dest.parent.mkdir(parents=True)
    # an earlier pull cut mid-way: two whole chunks, then half of the third
    part_path(dest, out.sha).write_bytes(data[:2 * CHUNK + CHUNK // 2])
    report = receive()
    assert dest.read_bytes() == data
    assert report.resumed_chunks == 2 and report.chunks == 4
    assert set(worker.asked) == {2, 3, 4, 5}, "the chunks it had were not asked again"


def test_a_part_file_with_a_bad_chunk_resumes_only_before_it(tmp_path: Path, data: bytes) -> None:
    worker = Worker(data)
    dest, out, receive, _lines = _receive(tmp_path, data, worker)
    dest.parent.mkdir(parents=True)
    tampered = bytearray(data[:3 * CHUNK])
    tampered[CHUNK + 5] ^= 1
    part_path(dest, out.sha).write_bytes(bytes(tampered))
    report = receive()
    assert dest.read_bytes() == data and report.resumed_chunks == 1


@pytest.mark.parametrize("answer, why", [
    (b"x" * (CHUNK + 1), f"with {CHUNK + 1} bytes, not {CHUNK}"),
    (b"x" * 10, f"with 10 bytes, not {CHUNK}"),
    ({"not": "bytes"}, "came as dict, not bytes"),
], ids=["too long", "too short", "not bytes"])
def test_a_chunk_of_the_wrong_size_or_type_is_refused(tmp_path: Path, data: bytes, answer: object, why: str) -> None:
    worker = Worker(data)
    worker.answers[(0, -1)] = answer
    dest, _out, receive, _lines = _receive(tmp_path, data, worker)
    with pytest.raises(OutputRefused, match=why):
        receive()
    assert not dest.exists()


def test_a_manifest_whose_whole_hash_lies_is_refused_after_the_last_chunk(tmp_path: Path, data: bytes) -> None:
    manifest = _manifest(data)
    manifest[0] = _sha(b"another file")
    worker = Worker(data)
    dest, out, receive, _lines = _receive(tmp_path, data, worker, manifest)
    with pytest.raises(OutputRefused, match="assembled do not hash"):
        receive()
    assert not dest.exists() and not part_path(dest, out.sha).exists()


@pytest.mark.parametrize("sizes, size", [
    ([4 * CHUNK], 4 * CHUNK),                  # one chunk four times the size asked for (client memory)
    ([CHUNK, CHUNK - 1, 1], 2 * CHUNK),         # the right total, cut otherwise
    ([CHUNK, CHUNK], 3 * CHUNK),               # chunks short of the size
    ([], -5),                                  # a negative size
])
def test_chunk_sizes_other_than_the_ones_asked_for_are_refused_before_any_fetch(sizes: list[int], size: int) -> None:
    manifest = ["a" * 64, size, [["b" * 64, n] for n in sizes]]
    with pytest.raises(OutputRefused, match="chunk sizes") as refused:
        check_manifest("out/big.bin", manifest, ["out/big.bin"], CHUNK, WORKER)
    assert "'out/big.bin'" in str(refused.value) and WORKER in str(refused.value)


@pytest.mark.parametrize("entry, why", [
    ("nonsense", "malformed"),
    (["a" * 64, "many", []], "malformed"),
    (["../../etc/passwd", CHUNK, [["b" * 64, CHUNK]]], "not a SHA-256"),
    (["a" * 64, CHUNK, [["B" * 64, CHUNK]]], "not a SHA-256"),
    (["a" * 64, CHUNK, [["b" * 64, CHUNK]], "symlink"], "malformed"),
])
def test_a_malformed_manifest_is_refused(entry: object, why: str) -> None:
    with pytest.raises(OutputRefused, match=why):
        check_manifest("out/big.bin", entry, ["out/big.bin"], CHUNK, WORKER)


@pytest.mark.parametrize("rel", ["Snakefile", "../outside.bin", "/etc/cron.d/evil", "out/../../x", "out/big.bin/"])
def test_only_declared_outputs_come_back(rel: str) -> None:
    with pytest.raises(OutputRefused, match="declares no such output") as refused:
        check_manifest(rel, _manifest(b"x"), ["out/big.bin"], CHUNK, WORKER)
    assert repr(rel) in str(refused.value)


@pytest.mark.parametrize("rel", ["../outside.bin", "/tmp/evil", "out/../../x", "."])
def test_a_declared_path_outside_the_workdir_is_refused(tmp_path: Path, rel: str) -> None:
    with pytest.raises(OutputRefused, match="not inside the working directory"):
        destination(tmp_path / "wd", rel, WORKER)


def test_a_symlink_leading_out_of_the_workdir_is_not_followed(tmp_path: Path, data: bytes) -> None:
    wd, elsewhere = tmp_path / "wd", tmp_path / "elsewhere"
    wd.mkdir()
    elsewhere.mkdir()
    (wd / "out").symlink_to(elsewhere)
    with pytest.raises(OutputRefused, match="symlink leads its directory out") as refused:
        destination(wd, "out/big.bin", WORKER)
    assert "'out/big.bin'" in str(refused.value)
    assert list(elsewhere.iterdir()) == []


def test_an_output_written_over_a_symlink_replaces_the_link_not_its_target(tmp_path: Path, data: bytes) -> None:
    wd = tmp_path / "wd"
    (wd / "out").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (wd / "out" / "big.bin").symlink_to(victim)
    out = check_manifest("out/big.bin", _manifest(data), ["out/big.bin"], CHUNK, WORKER)
    dest = destination(wd, out.path, WORKER)
    receive_file(dest, out, Worker(data), WORKER)
    assert victim.read_bytes() == b"keep me"
    assert not dest.is_symlink() and dest.read_bytes() == data


def _tar(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar of regular files (bytes) and symlinks (str: the link's target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, body in members:
            info = tarfile.TarInfo(name)
            if isinstance(body, str):
                info.type, info.linkname = tarfile.SYMTYPE, body
                tf.addfile(info)
            else:
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_the_inline_tar_refuses_a_file_the_job_does_not_declare_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text("rule a: ...")
    tar = _tar([("a.txt", b"fine"), ("Snakefile", b"rule evil: ...")])
    with pytest.raises(ValueError, match="'Snakefile', which is not an output or log of the job"):
        unpack_results(tar, tmp_path, ["a.txt", "logs/a.log"])
    assert (tmp_path / "Snakefile").read_text() == "rule a: ..."
    assert not (tmp_path / "a.txt").exists(), "nothing of a refused tar is unpacked"


def test_the_inline_tar_unpacks_declared_files_and_directory_outputs(tmp_path: Path) -> None:
    tar = _tar([("a.txt", b"fine"), ("dir_out/x/y.txt", b"inside a directory output")])
    assert unpack_results(tar, tmp_path, ["a.txt", "dir_out"]) == ["a.txt", "dir_out/x/y.txt"]
    assert (tmp_path / "dir_out/x/y.txt").read_bytes() == b"inside a directory output"


@pytest.mark.parametrize("link", ["/etc/passwd", "../../outside"])
def test_the_inline_tar_refuses_a_symlink_leading_out(tmp_path: Path, link: str) -> None:
    with pytest.raises(ValueError, match="'a.txt', refused"):
        unpack_results(_tar([("a.txt", link)]), tmp_path, ["a.txt"])
    assert not (tmp_path / "a.txt").is_symlink()


def test_a_directory_output_is_unpacked_beside_and_moved_into_place_whole(tmp_path: Path) -> None:
    tar = tmp_path / "wd" / ".idx.x.vastaidask-tar"
    tar.parent.mkdir()
    tar.write_bytes(_tar([("res/idx/a.bin", b"a"), ("res/idx/sub/b.bin", b"b"), ("res/idx/link", "a.bin")]))
    dest = tmp_path / "wd" / "res" / "idx"
    dest.parent.mkdir()
    unpack_directory(tar, dest, "res/idx", WORKER)
    assert (dest / "sub/b.bin").read_bytes() == b"b" and (dest / "link").read_bytes() == b"a"
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["res"], "no tar nor unpacking dir left"


@pytest.mark.parametrize("members, why", [
    ([("res/idx/a.bin", b"a"), ("Snakefile", b"evil")], "'Snakefile', which lies outside the directory"),
    ([("res/idx/a.bin", b"a"), ("res/idxother/x", b"evil")], "lies outside the directory"),
    ([("res/idx/link", "/etc/passwd")], "'res/idx/link'"),
    ([("res/idx/link", "../../../../outside")], "'res/idx/link'"),
    ([("res/idx", b"a file, not a directory")], "no directory of that name"),
], ids=["foreign file", "sibling prefix", "absolute link", "link out", "not a directory"])
def test_a_directory_tar_with_anything_outside_it_is_refused(tmp_path: Path, members: list, why: str) -> None:
    wd = tmp_path / "wd"
    (wd / "res").mkdir(parents=True)
    (wd / "Snakefile").write_text("rule a: ...")
    tar = wd / "res" / ".idx.x.vastaidask-tar"
    tar.write_bytes(_tar(members))
    with pytest.raises(OutputRefused, match=why) as refused:
        unpack_directory(tar, wd / "res" / "idx", "res/idx", WORKER)
    assert "'res/idx'" in str(refused.value) and WORKER in str(refused.value)
    assert (wd / "Snakefile").read_text() == "rule a: ..."
    assert sorted(p.name for p in (wd / "res").iterdir()) == [], "nothing of a refused directory is left"


def test_a_bad_network_value_is_refused_naming_it_and_the_choices() -> None:
    with pytest.raises(ValueError) as refused:
        check_network(ExecutorSettings(network="fast"))
    assert str(refused.value).startswith("--vastaidask-network='fast' is not a network mode: give one of "
                                         "tunnel, direct, auto"), refused.value
    for good in (None, "tunnel", "direct", "auto"):
        check_network(ExecutorSettings(network=good))


def test_a_worker_whose_outbox_holds_other_bytes_fails_the_pull_naming_the_file(tmp_path: Path) -> None:
    """The real pull tasks on a real Dask worker: its outbox copy was changed after it was hashed
    (root on the instance). Every attempt is refused, the error names the file, the user's
    directory gets no file of that name, and the worker's outbox is deleted all the same."""
    from distributed import Client, LocalCluster

    from snakemake_executor_plugin_vastaidask.retrieval import OutputPuller

    data = os.urandom(3 * CHUNK)
    manifest = _manifest(data)
    cache = tmp_path / "cache"
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        [(address, info)] = client.scheduler_info()["workers"].items()
        outbox = cache / f"worker-{info['name']}" / "outbox" / "smk-x-1-1"
        outbox.mkdir(parents=True)
        tampered = bytearray(data)
        tampered[CHUNK + 1] ^= 0xFF
        (outbox / manifest[0]).write_bytes(bytes(tampered))
        wd = tmp_path / "wd"
        wd.mkdir()
        puller = OutputPuller(client, wd, CHUNK, str(cache))
        with pytest.raises(OutputRefused) as refused:
            puller.pull("smk-x-1-1", address, {"big.bin": manifest}, ["big.bin"])
        assert "'big.bin'" in str(refused.value) and "chunk 2/3" in str(refused.value), refused.value
        assert not (wd / "big.bin").exists()
        assert not outbox.exists(), "the worker deleted its outbox"
        # the same outbox, honest this time, from the same part file: only the rest crosses
        outbox.mkdir(parents=True)
        (outbox / manifest[0]).write_bytes(data)
        report = puller.pull("smk-x-1-1", address, {"big.bin": manifest}, ["big.bin"])
        assert (wd / "big.bin").read_bytes() == data
        assert (report.resumed_chunks, report.chunks) == (1, 2)


def test_a_pull_from_a_worker_that_left_fails_at_once_naming_the_file(tmp_path: Path) -> None:
    """The worker holding the outbox was lost (preempted, released): the pull says so within
    seconds, instead of waiting for a task pinned to a worker that will never come back."""
    import time

    from distributed import Client, LocalCluster

    from snakemake_executor_plugin_vastaidask.retrieval import OutputPuller

    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        gone = next(iter(client.scheduler_info()["workers"]))
        client.retire_workers([gone], close_workers=True)
        t0 = time.monotonic()
        with pytest.raises(OutputRefused, match="that worker is gone with the file") as refused:
            OutputPuller(client, tmp_path, CHUNK, str(tmp_path / "cache")).pull(
                "smk-x-1-1", gone, {"big.bin": _manifest(os.urandom(2 * CHUNK))}, ["big.bin"])
        assert time.monotonic() - t0 < 10
        assert "'big.bin'" in str(refused.value) and gone in str(refused.value)
        assert not (tmp_path / "big.bin").exists()
