"""Large inputs staged in chunks: streamed from the client's disk, assembled and checked on the
worker, a corrupt chunk sent again alone, the client's memory bounded.

The chunk is corrupted by the ``vastai.testing.staging-corrupt-chunk`` hook: the stager flips a
byte of that chunk the first time it sends it, as a hostile holder or a broken transfer would.
The worker must refuse it, ask again, and assemble the right file from a single resent chunk.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_executor_plugin_vastaidask.staging import CHUNK_BYTES, chunk_file
from tests.helpers.checkout import checkout_env
from tests.helpers.dask_workers import scheduler_with
from tests.helpers.peak_rss import random_file, run_measured
from tests.helpers.waiting import wait_until

_SNAKEFILE = """
rule digest:
    input: "big.bin"
    output: "digest.txt"
    resources: gpu=1
    shell: "sha256sum {input} | cut -d' ' -f1 > {output}; wc -c < {input} >> {output}"
"""

def _run(workdir: Path, args: list[str], corrupt: dict, timeout: float) -> tuple[subprocess.CompletedProcess[str], int]:
    env = {**checkout_env(), "DASK_VASTAI__TESTING__STAGING_CORRUPT_CHUNK": json.dumps(corrupt)}
    run, usage = run_measured([sys.executable, "-m", "snakemake", *args], workdir, env, timeout)
    return run, usage.peak_rss


def _check(workdir: Path, run: subprocess.CompletedProcess[str], sha: str, size: int) -> dict:
    assert run.returncode == 0, run.stderr[-5000:]
    digest, length = (workdir / "digest.txt").read_text().split()
    assert (digest, int(length)) == (sha, size), "the worker assembled the file exactly"
    chunks = -(-size // CHUNK_BYTES)
    resent = re.findall(r"big\.bin chunk (\d+)/(\d+) \([\d.]+ MB\) sent again alone", run.stderr)
    assert resent == [("3", str(chunks))], run.stderr[-5000:]
    [line] = [json.loads(x) for x in (workdir / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    assert line["chunks"] == chunks, "each chunk crossed to the worker once (the corrupt copy was refused)"
    assert [sha, size] in line["fetched"]
    return line


def test_chunk_manifest_streams_the_file(tmp_path: Path) -> None:
    size = 2 * CHUNK_BYTES + (5 << 20)
    sha = random_file(tmp_path / "f", size >> 20)
    whole, chunks = chunk_file(tmp_path / "f")
    assert whole == sha
    assert [c.size for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 5 << 20]
    assert [c.offset for c in chunks] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    assert len({c.sha for c in chunks}) == 3


@pytest.mark.slow
def test_large_input_chunked_over_an_attached_cluster(dask_pool: str, tmp_path: Path) -> None:
    size = 160 << 20
    sha = random_file(tmp_path / "big.bin", size >> 20)
    (tmp_path / "Snakefile").write_text(_SNAKEFILE)
    run, peak = _run(tmp_path, ["--executor", "vastaidask", "--jobs", "1", "--vastaidask-scheduler-address",
                                dask_pool, "--vastaidask-worker-cache-dir", str(tmp_path / "cache")],
                     {"path": "big.bin", "index": 2}, timeout=300)
    _check(tmp_path, run, sha, size)
    # The client (snakemake with the plugin, its scheduler elsewhere) never held the file.
    assert peak < 300e6, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB input"


@pytest.mark.sandbox
@pytest.mark.slow
def test_large_input_chunked_to_a_rented_instance(market, tmp_path: Path) -> None:
    market.variants.set(destroy_linger_s=0)
    size = 256 << 20
    sha = random_file(tmp_path / "big.bin", size >> 20)
    (tmp_path / "Snakefile").write_text(_SNAKEFILE)
    args = ["--executor", "vastaidask", "--jobs", "1", "--vastaidask-api-url", market.url,
            "--vastaidask-api-key", market.api_key, "--vastaidask-gpu", "RTX_3090",
            "--vastaidask-max-instances", "1", "--vastaidask-boot-timeout", "240"]
    run, peak = _run(tmp_path, args, {"path": "big.bin", "index": 2}, timeout=480)
    _check(tmp_path, run, sha, size)
    # The client here also runs the scheduler and the SSH tunnels the chunks cross.
    assert peak < 300e6, f"peak RSS {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB input"
    assert market.instances() == []


@pytest.mark.slow
def test_assembly_resumes_after_the_chunks_a_worker_already_has(dask_pool: str, tmp_path: Path) -> None:
    """A worker that holds the first chunks of a file (an attempt that stopped mid-way, its
    third chunk cut short) fetches only the rest."""
    chunk = 16 << 20
    sha = random_file(tmp_path / "big.bin", 100)
    (tmp_path / "Snakefile").write_text(_SNAKEFILE)
    head = (tmp_path / "big.bin").read_bytes()[: 2 * chunk + (1 << 20)]
    for name in ("0", "1"):  # the pool's two workers: whichever gets the job
        blobs = tmp_path / "cache" / f"worker-{name}" / "blobs"
        blobs.mkdir(parents=True)
        (blobs / f"{sha}.chunks.part").write_bytes(head)
    run = subprocess.run([sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
                          "--vastaidask-scheduler-address", dask_pool, "--vastaidask-chunk-mb", "16",
                          "--vastaidask-worker-cache-dir", str(tmp_path / "cache")],
                         cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    assert (tmp_path / "digest.txt").read_text().split() == [sha, str(100 << 20)]
    [line] = [json.loads(x) for x in (tmp_path / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    assert (line["resumed_chunks"], line["chunks"]) == (2, 5), line


@pytest.mark.slow
def test_chunks_whose_holder_is_lost_are_sent_again_alone(tmp_path: Path) -> None:
    """Worker x dies holding some chunks of a staged file: exactly those are sent again, each
    alone, from this machine's disk, and land on the worker left with the right bytes."""
    from distributed import Client, Future

    from snakemake_executor_plugin_vastaidask.staging import Stager, chunk_key, sha256_bytes

    random_file(tmp_path / "f.bin", 12)
    with scheduler_with({"x": "CPU=1", "y": "CPU=1"}) as (address, procs), Client(address) as client:
        stager = Stager(client, tmp_path, chunk_bytes=1 << 20)
        try:
            staged = stager.stage_path("f.bin")
            keys = [stager.key(c.sha) for c in staged.chunks]
            who = wait_until(lambda: (w := client.who_has()) and all(w.get(k) for k in keys) and w,
                             60, "every chunk held by a worker")
            x = next(a for a, info in client.scheduler_info()["workers"].items() if info["name"] == "x")
            lost = [c for c, k in zip(staged.chunks, keys, strict=True) if x in who[k]]
            assert 0 < len(lost) < len(keys), "the scatter spread the chunks over both workers"
            procs["x"].kill()
            wait_until(lambda: len(stager.resent) >= len(lost), 60, "the lost chunks sent again")
            assert sorted(stager.resent) == sorted(f"f.bin chunk {c.index + 1}/12" for c in lost)
            for c in staged.chunks:
                key = chunk_key(stager.key(c.sha), 1 if c in lost else 0)
                data = wait_until(lambda key=key: Future(key, client).result(timeout=30), 60, f"{key} held again")
                assert sha256_bytes(data) == c.sha
            assert stager.uploaded_bytes == (12 + len(lost)) << 20, "only the lost chunks crossed again"
        finally:
            stager.release_all()
