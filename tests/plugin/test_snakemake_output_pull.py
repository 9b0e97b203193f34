"""A job's large output comes back to the user's disk in chunks pulled from its worker.

A real ``snakemake --executor vastaidask`` run whose rule writes a 100 MB random file (and a
small one, which comes back inline) with 8 MB chunks: the file arrives whole (its hash is the
one the job computed on the worker), in 13 chunks, never inside the job's result; no part
file is left behind, and the worker keeps no copy (no later job consumes it). Attached to a local Dask pool, and rented from the emulator's sandboxes with
``--vastaidask-network direct``, whose worker must then be the one at the instance's public
address and mapped port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers.checkout import checkout_env
from tests.helpers.peak_rss import run_measured

pytestmark = pytest.mark.slow

BIG_BYTES = 100_000_000
CHUNK_MB = 8

SNAKEFILE = f"""
rule make:
    output: big="out/big.bin", sha="out/big.sha"
    resources: gpu=1
    shell: "head -c {BIG_BYTES} /dev/urandom > {{output.big}}; sha256sum {{output.big}} | cut -d' ' -f1 > {{output.sha}}"
"""


def _check(workdir: Path, run: subprocess.CompletedProcess[str]) -> dict:
    """The output is whole and pulled in chunks; the transfer log's line for the job."""
    import hashlib

    assert run.returncode == 0, run.stderr[-5000:]
    big = workdir / "out/big.bin"
    assert big.stat().st_size == BIG_BYTES
    with open(big, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == (workdir / "out/big.sha").read_text().strip()
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["big.bin", "big.sha"], "no part file left"
    [line] = [json.loads(x) for x in (workdir / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    assert line["pulled_bytes"] == BIG_BYTES and line["pulled_chunks"] == -(-BIG_BYTES // (CHUNK_MB << 20)), line
    assert line["refetched"] == [] and line["resumed_pull_chunks"] == 0, line
    assert line["returned_bytes"] < 100_000, "the big output was not in the job's result"
    return line


def test_a_large_output_is_pulled_in_chunks_from_an_attached_worker(dask_pool: str, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    cache = tmp_path / "cache"
    run, usage = run_measured(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
         "--vastaidask-scheduler-address", dask_pool, "--vastaidask-worker-cache-dir", str(cache),
         "--vastaidask-chunk-mb", str(CHUNK_MB)],
        tmp_path, checkout_env(), 300)
    _check(tmp_path, run)
    assert usage.peak_rss < 300e6, f"peak RSS {usage.peak_rss / 1e6:.0f} MB for a {BIG_BYTES / 1e6:.0f} MB output"
    [worker_dir] = [d for d in cache.iterdir() if any((d / "blobs").iterdir())]
    assert list((worker_dir / "outbox").iterdir()) == [], "the worker deleted its outbox once the client had it"
    sha = (tmp_path / "out/big.sha").read_text().strip()
    assert not (worker_dir / "blobs" / sha).exists(), "no later job consumes it: the worker keeps no copy"


DIR_SNAKEFILE = """
rule index:
    output: directory("res/idx")
    resources: gpu=1
    shell: "mkdir -p {output}/sub; head -c 3000000 /dev/urandom > {output}/a.bin; "
           "head -c 2500000 /dev/urandom > {output}/sub/b.bin; ln -s a.bin {output}/link; "
           "cd {output} && sha256sum a.bin sub/b.bin > SUMS"
"""


def test_a_large_directory_output_comes_back_as_a_pulled_tar(dask_pool: str, tmp_path: Path) -> None:
    """A directory() output over the budget: packed on the worker, pulled in 1 MB chunks, unpacked
    beside its destination and moved into place, its files (hashed on the worker) and symlink intact."""
    import hashlib

    (tmp_path / "Snakefile").write_text(DIR_SNAKEFILE)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
         "--vastaidask-scheduler-address", dask_pool, "--vastaidask-worker-cache-dir", str(tmp_path / "cache"),
         "--vastaidask-chunk-mb", "1"],
        cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    idx = tmp_path / "res/idx"
    sums = dict(reversed(line.split()) for line in (idx / "SUMS").read_text().splitlines())
    assert sums.keys() == {"a.bin", "sub/b.bin"}
    for name, sha in sums.items():
        assert hashlib.sha256((idx / name).read_bytes()).hexdigest() == sha, name
    assert (idx / "link").is_symlink() and (idx / "link").read_bytes() == (idx / "a.bin").read_bytes()
    [line] = [json.loads(x) for x in (tmp_path / ".snakemake/vastaidask/transfers.jsonl").read_text().splitlines()]
    assert line["pulled_bytes"] > 5_500_000 and line["pulled_chunks"] == -(-line["pulled_bytes"] // (1 << 20)), line
    assert line["returned_bytes"] < 100_000, "the directory was not in the job's result"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["idx"], "no tar nor unpacking dir left"


@pytest.mark.sandbox
def test_a_large_output_comes_back_from_a_rented_direct_worker(market, tmp_path: Path) -> None:
    """``--vastaidask-network direct`` reaches the plugin's cluster: the worker that ran the job
    advertised the instance's public address and the host port Vast mapped for it."""
    market.variants.set(destroy_linger_s=0)
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    seen: dict[str, str] = {}  # tls://<public ip>:<mapped port of a direct worker port> -> instance id
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            for row in market.instances():
                for spec, maps in (row.get("ports") or {}).items():
                    if spec != "22/tcp":
                        for m in maps:
                            seen[f"tls://{row['public_ipaddr']}:{m['HostPort']}"] = str(row["id"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "snakemake", "--executor", "vastaidask", "--jobs", "1",
             "--vastaidask-api-url", market.url, "--vastaidask-api-key", market.api_key,
             "--vastaidask-gpu", "RTX_3090", "--vastaidask-max-instances", "1",
             "--vastaidask-boot-timeout", "240", "--vastaidask-chunk-mb", str(CHUNK_MB),
             "--vastaidask-network", "direct"],
            cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=480)
    finally:
        stop.set()
        watcher.join(timeout=10)
    line = _check(tmp_path, run)
    assert line["worker"] in seen, f"{line['worker']} is not a public address and mapped port of {seen}"
    assert market.instances() == []
