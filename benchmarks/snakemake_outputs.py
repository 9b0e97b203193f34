"""Client memory and time to bring a 1 GiB Snakemake output back, pulled in chunks or in one tar.

One rule writes a 1 GiB incompressible file on a worker (and its sha256, checked here against
the file that arrived). Each run is a fresh ``python -m snakemake --executor vastaidask`` whose
peak RSS (``ru_maxrss`` of the child, read by a wrapper process of its own) is the client's
memory. Rows:

- ``baseline``: the same rule writing 1 KiB: what snakemake and the plugin take anyway;
- ``pulled, chunk N MB``: ``--vastaidask-chunk-mb N``: the output stays in the worker's outbox
  and is pulled chunk by chunk;
- ``one tar``: chunks (hence the inline budget) larger than the file: the output comes back
  inside the job's result, as every output did before (the switch the input benchmark uses too);
- ``rented``: the default chunk size against the emulator (one rented sandbox, TLS inside the
  SSH tunnel, the scheduler in the client's process, the emulator in a process of its own).

Then what a pull costs a small output (why small ones stay inline): the time ``OutputPuller``
takes for a 1 KiB file in a local worker's outbox (a chunk task and the outbox's deletion),
which the inline tar does not spend (it rides in the result the client fetches anyway).

    python -m benchmarks.snakemake_outputs [--size-mb 1024] [--chunks 8,32] [--no-rented]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers.peak_rss import run_measured  # noqa: E402


def snakefile(size_bytes: int) -> str:
    return f"""
rule make:
    output: big="big.out", sha="big.sha"
    resources: gpu=1
    shell: "head -c {size_bytes} /dev/urandom > {{output.big}}; sha256sum {{output.big}} | cut -d' ' -f1 > {{output.sha}}"
"""


def run(workdir: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one snakemake run from a clean state; raises on failure or
    when the output that arrived is not the one the worker hashed."""
    for stale in (".snakemake", "cache", "big.out", "big.sha"):
        path = workdir / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    out, usage = run_measured([sys.executable, "-m", "snakemake", "--jobs", "1", *args], workdir, env, 1800)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    with open(workdir / "big.out", "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != (workdir / "big.sha").read_text().strip():
            raise RuntimeError("the output that arrived is not the one the worker wrote")
    return wall, usage.peak_rss / 2**20


def small_pull_ms(repeats: int = 30) -> list[float]:
    """Milliseconds ``OutputPuller.pull`` takes for a 1 KiB output in a local worker's outbox."""
    from distributed import Client, LocalCluster

    from snakemake_executor_plugin_vastaidask.retrieval import OutputPuller

    data = os.urandom(1024)
    sha = hashlib.sha256(data).hexdigest()
    manifest = [sha, len(data), [[sha, len(data)]]]
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp, \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        [(address, info)] = client.scheduler_info()["workers"].items()
        puller = OutputPuller(client, Path(tmp), 32 << 20, str(Path(tmp) / "cache"))
        for k in range(repeats):
            outbox = Path(tmp) / "cache" / f"worker-{info['name']}" / "outbox" / f"job-{k}"
            outbox.mkdir(parents=True)
            (outbox / sha).write_bytes(data)
            t0 = time.perf_counter()
            puller.pull(f"job-{k}", address, {"small.out": manifest}, ["small.out"])
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--chunks", default="8,32")
    parser.add_argument("--no-rented", action="store_true")
    opts = parser.parse_args()
    from distributed import LocalCluster

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        for wd, size in ((small, 1024), (big, opts.size_mb << 20)):
            wd.mkdir()
            (wd / "Snakefile").write_text(snakefile(size))
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                          resources={"GPU": 1, "CPU": 1, "MEMORY": 8e9}) as cluster:
            def attached(wd: Path, chunk_mb: int) -> list[str]:
                return ["--executor", "vastaidask", "--vastaidask-scheduler-address", cluster.scheduler_address,
                        "--vastaidask-worker-cache-dir", str(wd / "cache"), "--vastaidask-chunk-mb", str(chunk_mb)]

            wall, rss = run(small, attached(small, 32))
            rows.append({"run": "baseline (1 KiB output)", "wall_s": wall, "peak_rss_mb": rss})
            for chunk_mb in [int(x) for x in opts.chunks.split(",")] + [2 * opts.size_mb]:
                wall, rss = run(big, attached(big, chunk_mb))
                label = "one tar (the old return)" if chunk_mb > opts.size_mb else f"pulled, chunk {chunk_mb} MB"
                rows.append({"run": label, "wall_s": wall, "peak_rss_mb": rss})
                print(json.dumps(rows[-1]), flush=True)
        if not opts.no_rented:
            from benchmarks.emulator_process import EmulatorProcess

            with EmulatorProcess() as emu:
                wall, rss = run(big, ["--executor", "vastaidask", "--vastaidask-api-url", emu.url,
                                      "--vastaidask-api-key", emu.api_key, "--vastaidask-max-instances", "1",
                                      "--vastaidask-boot-timeout", "300"])
                rows.append({"run": "rented (emulator, pulled, chunk 32 MB, boot included)", "wall_s": wall,
                             "peak_rss_mb": rss})
                print(json.dumps(rows[-1]), flush=True)
    pulls = small_pull_ms()
    print(f"\n{opts.size_mb} MiB output; client = the snakemake process (peak RSS, MiB)")
    for row in rows:
        print(f"  {row['run']:<56} {row['peak_rss_mb']:8.0f} MiB {row['wall_s']:7.1f} s")
    print(f"pulling a 1 KiB output instead of returning it inline: median {statistics.median(pulls):.1f} ms, "
          f"max {max(pulls):.1f} ms over {len(pulls)} pulls (local worker)")


if __name__ == "__main__":
    main()
