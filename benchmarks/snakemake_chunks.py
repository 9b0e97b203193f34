"""Client memory and time to stage a 1 GB Snakemake input, by chunk size.

One rule reads a 1 GB input on a worker and writes its sha256 (checked here). Each run is a
fresh ``python -m snakemake --executor vastaidask`` whose peak RSS (``ru_maxrss`` of the child,
read by a wrapper process of its own) is the client's memory; every run starts with an empty
worker cache, so the whole file crosses each time. Rows:

- ``baseline``: the same rule on a 1 KB input: what snakemake and the plugin take anyway;
- ``chunk N MB``: ``--vastaidask-chunk-mb N``;
- ``whole``: chunks larger than the file, i.e. the file sent in one piece (the old staging);
- ``rented``: the default chunk size against the emulator (one rented sandbox, TLS inside
  the SSH tunnel, the scheduler in the client's process, the emulator in a process of its own).

Attached rows use a ``LocalCluster`` of 2 worker processes started by this script, so the
scheduler is not in the measured process there.

    python -m benchmarks.snakemake_chunks [--size-mb 1024] [--no-rented]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helpers.peak_rss import random_file, run_measured  # noqa: E402

SNAKEFILE = """
rule digest:
    input: "big.bin"
    output: "digest.txt"
    resources: gpu=1
    shell: "sha256sum {input} | cut -d' ' -f1 > {output}"
"""

def run(workdir: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one snakemake run from a clean state; raises on failure."""
    for stale in (".snakemake", "cache"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    (workdir / "digest.txt").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    out, usage = run_measured([sys.executable, "-m", "snakemake", "--jobs", "1", *args], workdir, env, 1800)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return wall, usage.peak_rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--chunks", default="8,16,32,64")
    parser.add_argument("--no-rented", action="store_true")
    opts = parser.parse_args()
    from distributed import LocalCluster

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-chunks-") as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        for wd in (small, big):
            wd.mkdir()
            (wd / "Snakefile").write_text(SNAKEFILE)
        (small / "big.bin").write_bytes(b"x" * 1024)
        sha = random_file(big / "big.bin", opts.size_mb)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                          resources={"GPU": 1, "CPU": 1, "MEMORY": 8e9}) as cluster:
            def attached(wd: Path, chunk_mb: int) -> list[str]:
                return ["--executor", "vastaidask", "--vastaidask-scheduler-address", cluster.scheduler_address,
                        "--vastaidask-worker-cache-dir", str(wd / "cache"), "--vastaidask-chunk-mb", str(chunk_mb)]

            wall, rss = run(small, attached(small, 32))
            rows.append({"run": "baseline (1 KB input)", "wall_s": wall, "peak_rss_mb": rss})
            for chunk_mb in [int(x) for x in opts.chunks.split(",")] + [2 * opts.size_mb]:
                wall, rss = run(big, attached(big, chunk_mb))
                assert (big / "digest.txt").read_text().strip() == sha
                label = "whole (one piece)" if chunk_mb > opts.size_mb else f"chunk {chunk_mb} MB"
                rows.append({"run": label, "wall_s": wall, "peak_rss_mb": rss})
                print(json.dumps(rows[-1]), flush=True)
        if not opts.no_rented:
            from benchmarks.emulator_process import EmulatorProcess

            with EmulatorProcess() as emu:
                wall, rss = run(big, ["--executor", "vastaidask", "--vastaidask-api-url", emu.url,
                                      "--vastaidask-api-key", emu.api_key, "--vastaidask-max-instances", "1",
                                      "--vastaidask-boot-timeout", "300"])
                assert (big / "digest.txt").read_text().strip() == sha
                rows.append({"run": "rented (emulator, chunk 32 MB, boot included)", "wall_s": wall,
                             "peak_rss_mb": rss})
    print(f"\n{opts.size_mb} MB input; client = the snakemake process (peak RSS, MiB)")
    for row in rows:
        print(f"  {row['run']:<48} {row['peak_rss_mb']:8.0f} MiB {row['wall_s']:7.1f} s")


if __name__ == "__main__":
    main()
